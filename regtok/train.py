"""The trainer: a function of (model, batches, config, callbacks) → result.

One step: the model's losses (bf16 autocast on CUDA) → backward (DDP averages gradients; the model's contrastive
loss is exact across ranks) → gradient norm and clipping → one sync that reads every loss term (averaged over
ranks) → stop on a non-finite value *before* the update, so the weights on hand are the last good ones → AdamW
step at the learning rate of :func:`lr_at`. Batches, dropout and the learning rate are pure functions of
(seed, epoch, step, rank), and the global RNG state travels in :class:`ResumeState`, so a resumed run ends
bit-identical to an uninterrupted one. Files are the caller's business (``callbacks``).

Epochs in every record are counted from 1, as a person counts them: ``"epoch": e`` is the e-th epoch (the one
in progress in a step record, the one just finished in an epoch record), and the validation before training is
epoch 0. The loop's own index (permutation and dropout seeds) starts at 0.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from regtok.config import TrainConfig
from regtok.data import Batches, derive_seed
from regtok.retrieval import paired_ranks


@dataclass
class ResumeState:
    """What a checkpoint needs beyond the weights to continue exactly: optimizer state, step, global RNG."""

    step: int
    optimizer: dict[str, Any]
    rng: dict[str, Tensor] = field(default_factory=dict)
    best: float = -math.inf  # the best validation score so far (keep_best)


@dataclass
class TrainResult:
    status: str  # "done", "nonfinite", or "stopped" (the callbacks asked to stop after an epoch)
    step: int  # optimizer steps taken
    metrics: dict[str, float]  # the last epoch record (or the failing step's terms)
    message: str = ""


class Callbacks:
    """Hooks the trainer calls; the default does nothing. Only rank 0 should be given one that writes."""

    def on_step(self, step: int, total: int, record: dict[str, float]) -> None:
        """After every optimizer step; ``record`` holds every loss term, lr, grad norm, samples/s."""

    def on_log(self, record: dict[str, Any]) -> None:
        """A metrics line: every ``log_every`` steps (``type`` "step") and at each epoch end (``type`` "epoch")."""

    def on_checkpoint(self, model: nn.Module, state: ResumeState) -> None:
        """Save ``model``'s weights and ``state`` (epoch ends, every ``checkpoint_every`` steps, before a stop)."""

    def on_best(self, model: nn.Module, record: dict[str, Any]) -> None:
        """``model`` has the best validation score so far (``record["val_select"]``); with keep_best only."""

    def should_stop(self, record: dict[str, Any]) -> str | None:
        """After each epoch's checkpoint: a reason to end training now (e.g. a sweep's pruner), or None."""
        return None


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to ``cfg.lr`` over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (fused where available); weight decay on matrices only, by tensor rank alone as nanoGPT: no decay on
    biases, norms, tokens (1-d) or the logit scale (0-d)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    plain = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2)}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device/dtype
        return torch.optim.AdamW(groups, **kwargs)


class LossModule(nn.Module):
    """``model.losses`` on this rank's part of the batch as a forward, so DDP and ``torch.compile`` see the whole
    loss computation."""

    def __init__(self, model: nn.Module, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.model, self.rank, self.world_size = model, rank, world_size

    def forward(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return self.model.losses(batch, generator=generator, rank=self.rank, world_size=self.world_size)


def wrap(model: nn.Module, data: Batches, cfg: TrainConfig) -> nn.Module:
    """The module a step calls: the model's losses, under DDP for more than one rank, compiled on request.

    Every parameter is in the graph of the loss for every config (the model builds only what its loss type uses;
    a zero weight or a detached path leaves the parameter's other paths in the graph; tests/test_model.py checks
    it), so DDP is not asked to search for unused parameters, a graph traversal per step. Were one ever unused,
    DDP would stop at the next step and say so.
    """
    device = data.device
    net: nn.Module = LossModule(model, data.rank, data.world_size)
    if data.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(net, device_ids=ids)
    return torch.compile(net) if cfg.compile else net


def train(model: nn.Module, data: Batches, cfg: TrainConfig, callbacks: Callbacks | None = None,
          val: Batches | None = None, resume: ResumeState | None = None) -> TrainResult:
    """Train ``model`` (already on ``data.device``) for ``cfg.epochs`` epochs of ``data``; see the module doc."""
    cb = callbacks or Callbacks()
    device, world = data.device, data.world_size
    net = wrap(model, data, cfg)
    opt = make_optimizer(model, cfg)
    spe = data.steps_per_epoch
    total = cfg.epochs * spe
    step = 0
    if resume is not None:
        opt.load_state_dict(resume.optimizer)
        set_rng_state(resume.rng, device)
        step = resume.step
    gen = torch.Generator(device=device)
    epoch_record: dict[str, float] = {}
    best = resume.best if resume is not None else -math.inf
    if val is not None and data.rank == 0 and step == 0:  # logged, so a run shows what training changed
        cb.on_log({"type": "start", "step": 0, "epoch": 0, **validate(model, val)})
    while step < total:
        epoch, offset = divmod(step, spe)
        model.train()
        sums: dict[str, float] = {}
        t_epoch = t_log = time.perf_counter()
        for batch in data.epoch(epoch, offset):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg, total)
            gen.manual_seed(derive_seed(cfg.seed, "dropout", step, data.rank))
            record = _gradients(net, opt, batch, gen, cfg, world)
            if not all(math.isfinite(v) for v in record.values()):
                cb.on_checkpoint(model, ResumeState(step, opt.state_dict(), rng_state(device), best))
                bad = ", ".join(f"{k}={v}" for k, v in record.items() if not math.isfinite(v))
                return TrainResult("nonfinite", step, record, f"non-finite loss at step {step} ({bad})")
            opt.step()
            step += 1
            for k, v in record.items():
                sums[k] = sums.get(k, 0.0) + v
            record.update(lr=opt.param_groups[0]["lr"], samples_per_s=data.batch_size / (time.perf_counter() - t_log),
                          epoch=epoch + 1)
            t_log = time.perf_counter()
            cb.on_step(step, total, record)
            if step % cfg.log_every == 0:
                cb.on_log({"type": "step", "step": step, **record})
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step % spe:
                cb.on_checkpoint(model, ResumeState(step, opt.state_dict(), rng_state(device), best))
        seconds = time.perf_counter() - t_epoch
        n_steps = spe - offset
        epoch_record = {k: v / n_steps for k, v in sums.items()}
        epoch_record.update(samples_per_s=n_steps * data.batch_size / seconds, seconds=seconds)
        if val is not None and data.rank == 0:
            epoch_record.update(validate(model, val))
        done = {"step": step, "epoch": epoch + 1, **epoch_record}  # epochs counted from 1 (module docstring)
        cb.on_log({"type": "epoch", **done})
        if val is not None and data.rank == 0:
            best = _track_best(model, done, best, cfg, cb)
        cb.on_checkpoint(model, ResumeState(step, opt.state_dict(), rng_state(device), best))
        reason = cb.should_stop(done) if step < total else None
        if reason:
            return TrainResult("stopped", step, epoch_record, reason)
    return TrainResult("done", step, epoch_record)


def _track_best(model: nn.Module, record: dict[str, Any], best: float, cfg: TrainConfig, cb: Callbacks) -> float:
    """Call ``cb.on_best`` when ``record``'s validation score beats ``best`` (keep_best); the new best."""
    score = record["val_select"]
    if cfg.keep_best and score >= best:  # a tie goes to the later epoch: trained longer, same retrieval
        cb.on_best(model, record)
        return score
    return best


def _gradients(net: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, Tensor], gen: torch.Generator,
               cfg: TrainConfig, world: int) -> dict[str, float]:
    """Forward, backward and clipping (no update); returns every loss term and the gradient norm."""
    device = next(iter(batch.values())).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        terms = net(batch, generator=gen)
    opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    params = [p for group in opt.param_groups for p in group["params"]]
    norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    return _read_terms(terms, norm, world)  # the step's one sync


def _read_terms(terms: dict[str, Tensor], grad_norm: Tensor, world: int) -> dict[str, float]:
    """Every loss term (mean over ranks) and the gradient norm as floats, in one device→host copy."""
    names = [*terms, "grad_norm"]
    values = torch.stack([*(t.detach().float().reshape(()) for t in terms.values()), grad_norm.detach().float()])
    if world > 1:
        dist.all_reduce(values)
        values /= world  # the gradient norm is the same on every rank, so its mean is itself
    return dict(zip(names, values.tolist(), strict=True))


def full_r1(record: dict[str, Any]) -> float | None:
    """The headline validation number of a record: full-prefix R@1, mean of both directions (None: no validation)."""
    full = [v for k, v in record.items() if k.startswith("val_r1_full_")]
    return sum(full) / len(full) if full else None


VAL_FLOW_STEPS = 4  # Euler steps of the validation transport (flow runs)


@torch.no_grad()
def validate(model: nn.Module, val: Batches) -> dict[str, float]:
    """Cross-modal retrieval R@1 (both directions) at the full register prefix and at k = 1; for a flow run also
    after transport (``val_r1_flow_*``). ``val_select``, the mean R@1 that keep_best ranks checkpoints by, is
    the transported one for flow_matching runs and the full-prefix one otherwise."""
    was_training = model.training
    model.eval()
    a_name, b_name = val.modalities[:2]
    out: dict[str, float] = {}
    for label, keep in (("full", None), ("k1", 1)):
        shared: dict[str, list[Tensor]] = {a_name: [], b_name: []}
        for batch in val.all():
            with torch.autocast(val.device.type, dtype=torch.bfloat16, enabled=val.device.type == "cuda"):
                outputs = model(batch, keep=keep)
            for m in shared:
                shared[m].append(outputs[m].shared.float())
        a, b = torch.cat(shared[a_name]), torch.cat(shared[b_name])  # (N, E) each
        out[f"val_r1_{label}_a_to_b"] = float((paired_ranks(a, b) == 1).double().mean())
        out[f"val_r1_{label}_b_to_a"] = float((paired_ranks(b, a) == 1).double().mean())
        if label == "full" and getattr(model, "flow", None) is not None:
            moved_a = model.transport(a, "a_to_b", VAL_FLOW_STEPS)  # (N, E) in B's space
            moved_b = model.transport(b, "b_to_a", VAL_FLOW_STEPS)
            out["val_r1_flow_a_to_b"] = float((paired_ranks(moved_a.float(), b) == 1).double().mean())
            out["val_r1_flow_b_to_a"] = float((paired_ranks(moved_b.float(), a) == 1).double().mean())
    chosen = "flow" if model.cfg.scored_by_transport else "full"
    out["val_select"] = (out[f"val_r1_{chosen}_a_to_b"] + out[f"val_r1_{chosen}_b_to_a"]) / 2
    model.train(was_training)
    return out


def rng_state(device: torch.device) -> dict[str, Tensor]:
    """The global RNG states a step may touch (CPU, and the CUDA device's)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
