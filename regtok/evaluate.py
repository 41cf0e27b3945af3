"""Stage 3, the library half: retrieval per prefix, flow transport, prefix probes and reconstruction → a report dict.

``evaluate`` reads features batch by batch (any array-like that slices, e.g. an HDF5 dataset), runs the model
once per prefix length k on each batch, and keeps only what the metrics need: the shared embeddings of the
retrieval prefixes, and per-group register means for the probe rows. No files, no printing.

Register groups at prefix k: ``shared`` = slots [0, min(k, n_shared)), ``private`` = slots [n_shared, k)
(empty, so reported as null, when k <= n_shared), ``all`` = slots [0, k). A group's probe feature is the
mean of its registers (B, d), so every k gives a feature of one width.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from regtok.config import EvalConfig  # noqa: F401 (its home is regtok.config; imported from here too)
from regtok.distributed import resolve_device
from regtok.errors import RegtokError
from regtok.probes import LABEL_TYPES, fit_probe, split_indices
from regtok.retrieval import RECALL_KS, chance_metrics, l2_normalize, paired_ranks, rank_metrics, retrieval_metrics

GROUPS = ("shared", "private", "all")
TIE_RULE = "pessimistic: rank = 1 + #{j != i : s_ij >= s_ii} (a tie counts against the query)"
EmbeddingSink = Callable[[str, int, np.ndarray], None]  # (modality, k, (N, E) float32) in sample order
Log = Callable[[str], None]


def prefix_plan(cfg: EvalConfig, n_registers: int, n_shared: int) -> tuple[list[int], list[int]]:
    """(probe prefixes, retrieval prefixes): the configured ks <= n_registers, and those <= n_shared.

    When no configured k is <= n_shared, retrieval uses k = n_shared (the whole shared embedding).
    """
    ks = sorted({k for k in cfg.prefixes if k <= n_registers})
    if not ks:
        raise RegtokError(f"no prefix in {list(cfg.prefixes)} is <= n_registers ({n_registers})")
    return ks, [k for k in ks if k <= n_shared] or [n_shared]


def evaluate(model: Any, features: Mapping[str, Any], labels: Mapping[str, np.ndarray],
             label_schema: Mapping[str, Mapping[str, Any]], cfg: EvalConfig, *,
             pooled: Mapping[str, Any] | None = None, embeddings_sink: EmbeddingSink | None = None,
             log: Log | None = None) -> dict[str, Any]:
    """Evaluate a RegTok on one split. features: {modality: (N, D) or (N, T, D) array-like}, the model's inputs.

    pooled: the raw pooled features for the cosine baseline (default: ``features`` when they are pooled).
    labels: {name: (N,)}; label_schema: {name: {"type": "categorical" | "continuous", …}} (store manifest).
    Returns the report dict (see pipeline/report.py for the files written from it).
    """
    log = log or (lambda _msg: None)
    a, b = model.modalities
    n = _check_lengths(features, labels, (a, b))
    mcfg = model.cfg
    probe_ks, retr_ks = prefix_plan(cfg, mcfg.n_registers, mcfg.n_shared)
    device = resolve_device(cfg.device)
    probe_rows, train, test = _probe_split(n, cfg)
    enc = _encode_all(model, features, (a, b), probe_ks, retr_ks, probe_rows, cfg, device, log)

    report: dict[str, Any] = {"n": n, "modalities": [a, b], "retrieval": [], "tie_rule": TIE_RULE,
                              "prefixes": {"retrieval": retr_ks, "probes": probe_ks,
                                           "n_shared": mcfg.n_shared}}
    for k in retr_ks:
        log(f"retrieval k={k}")
        report["retrieval"].append({"k": k, **retrieval_metrics(enc.shared[a][k], enc.shared[b][k], cfg.chunk_size,
                                                                device)})
        if embeddings_sink is not None:
            for m in (a, b):
                embeddings_sink(m, k, enc.shared[m][k].numpy())
    report["baselines"] = _baselines(n, pooled if pooled is not None else features, (a, b), cfg, device)
    report["flow"] = _flow(model, enc.shared, (a, b), retr_ks, cfg, device, log)
    report["reconstruction"] = [{"k": k, "modality": m, "cosine": enc.recon[m][k] / n}
                                for k in probe_ks for m in (a, b)]
    probe_labels = {name: torch.as_tensor(np.asarray(col))[probe_rows] for name, col in labels.items()}
    report["probes"], notes = _probes(enc.groups, probe_labels, label_schema, train, test, cfg, mcfg.n_shared, log)
    report["probe_split"] = {"rows": len(probe_rows), "train": len(train), "test": len(test), "seed": cfg.seed,
                             "test_fraction": cfg.probe_test_fraction, "val_fraction_of_train": cfg.probe_val_fraction,
                             "feature": "mean of the group's kept registers (hidden_dim)"}
    report["notes"] = notes
    return report


@dataclass
class _Encoded:
    shared: dict[str, dict[int, Tensor]]  # modality → k → (N, E) float32, retrieval prefixes only
    groups: dict[str, dict[int, dict[str, Tensor]]]  # modality → k → group → (P, d) float32, probe rows only
    recon: dict[str, dict[int, float]]  # modality → k → summed per-sample reconstruction cosine


def _check_lengths(features: Mapping[str, Any], labels: Mapping[str, np.ndarray], mods: Sequence[str]) -> int:
    missing = [m for m in mods if m not in features]
    if missing:
        raise RegtokError(f"features lack modality {missing[0]!r} (have {', '.join(features)})")
    sizes = {len(features[m]) for m in mods} | {len(v) for v in labels.values()}
    if len(sizes) != 1:
        raise RegtokError(f"features and labels disagree on the number of samples: {sorted(sizes)}")
    n = sizes.pop()
    if n < 2:
        raise RegtokError(f"evaluation needs at least 2 samples, got {n}")
    return n


def _probe_split(n: int, cfg: EvalConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Probe rows (a seeded subset of the split, sorted) and the train/test positions within them."""
    cap = cfg.probe_max_samples or n
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[: min(cap, n)].sort().values
    train, test = split_indices(len(rows), cfg.probe_test_fraction, cfg.seed)
    return rows, train, test


@torch.no_grad()
def _encode_all(model: Any, features: Mapping[str, Any], mods: Sequence[str], probe_ks: list[int],
                retr_ks: list[int], probe_rows: Tensor, cfg: EvalConfig, device: torch.device, log: Log) -> _Encoded:
    """One pass over the features; for each batch, one forward per prefix length k."""
    model = model.to(device).eval()
    n, n_shared = len(features[mods[0]]), model.cfg.n_shared
    in_probe = torch.zeros(n, dtype=torch.bool)
    in_probe[probe_rows] = True
    shared: dict[str, dict[int, list[Tensor]]] = {m: {k: [] for k in retr_ks} for m in mods}
    groups: dict[str, dict[int, dict[str, list[Tensor]]]] = {m: {k: {} for k in probe_ks} for m in mods}
    recon = {m: dict.fromkeys(probe_ks, 0.0) for m in mods}
    for start in range(0, n, cfg.batch_size):
        end = min(start + cfg.batch_size, n)
        log(f"encode {end}/{n}")
        batch = {m: torch.from_numpy(np.asarray(features[m][start:end])).to(device, torch.float32) for m in mods}
        sel = in_probe[start:end].to(device)  # (B,)
        for k in sorted(set(probe_ks) | set(retr_ks)):
            outs = model(batch, keep=k)
            for m in mods:
                o = outs[m]
                if k in shared[m]:
                    shared[m][k].append(o.shared.float().cpu())
                if k in recon[m]:
                    recon[m][k] += float(_recon_cosine(o.recon, model.encoders[m].as_tokens(batch[m])).sum())
                    for g, feat in _group_means(o.registers[sel], k, n_shared).items():
                        groups[m][k].setdefault(g, []).append(feat)
    return _Encoded(
        shared={m: {k: torch.cat(v) for k, v in per.items()} for m, per in shared.items()},
        groups={m: {k: {g: torch.cat(v) for g, v in gs.items()} for k, gs in per.items()} for m, per in groups.items()},
        recon=recon,
    )


def _group_means(registers: Tensor, k: int, n_shared: int) -> dict[str, Tensor]:
    """registers (B, R, d) → {group: (B, d) float32 cpu} at prefix k; the private group only when k > n_shared."""
    out = {"shared": registers[:, : min(k, n_shared)].mean(1), "all": registers[:, :k].mean(1)}  # (B, d)
    if k > n_shared:
        out["private"] = registers[:, n_shared:k].mean(1)  # (B, d)
    return {g: v.float().cpu() for g, v in out.items()}


def _recon_cosine(recon: Tensor, x: Tensor) -> Tensor:
    """Per-sample cosine between reconstruction (B, T, D) and the module's standardised input (B, T, D). (B,)"""
    return torch.nn.functional.cosine_similarity(recon.float(), x, dim=-1).mean(1)  # (B,)


def _baselines(n: int, pooled: Mapping[str, Any], mods: Sequence[str], cfg: EvalConfig,
               device: torch.device) -> dict[str, Any]:
    """Chance, and the raw pooled features compared by cosine when both modalities' dims match."""
    out: dict[str, Any] = {"chance": {d: chance_metrics(n, RECALL_KS) for d in ("a_to_b", "b_to_a")}}
    shapes = [tuple(pooled[m].shape[1:]) for m in mods]
    if any(len(s) != 1 for s in shapes):
        out["raw_pooled"] = {"skipped": "no pooled features given (the run uses tokens)"}
    elif shapes[0] != shapes[1]:
        out["raw_pooled"] = {"skipped": f"pooled dims differ: {shapes[0][0]} vs {shapes[1][0]}"}
    else:
        xa, xb = (l2_normalize(torch.from_numpy(np.asarray(pooled[m][:]))) for m in mods)  # (N, D)
        out["raw_pooled"] = retrieval_metrics(xa, xb, cfg.chunk_size, device)
    return out


@torch.no_grad()
def _flow(model: Any, shared: dict[str, dict[int, Tensor]], mods: Sequence[str], retr_ks: list[int],
          cfg: EvalConfig, device: torch.device, log: Log) -> list[dict[str, Any]]:
    """Retrieval of flow-transported shared embeddings (at the largest retrieval k), per step count."""
    if not getattr(model, "has_flow", False) or not retr_ks:
        return []
    k = retr_ks[-1]
    ea, eb = shared[mods[0]][k], shared[mods[1]][k]  # (N, E)
    out = []
    for steps in cfg.flow_steps:
        log(f"flow steps={steps}")
        moved_a = _transport(model, ea, "a_to_b", steps, cfg.batch_size, device)  # (N, E), in B's space
        moved_b = _transport(model, eb, "b_to_a", steps, cfg.batch_size, device)
        out.append({"k": k, "steps": steps,
                    "a_to_b": rank_metrics(paired_ranks(moved_a, eb, cfg.chunk_size, device)),
                    "b_to_a": rank_metrics(paired_ranks(moved_b, ea, cfg.chunk_size, device))})
    return out


def _transport(model: Any, x: Tensor, direction: str, steps: int, batch: int, device: torch.device) -> Tensor:
    parts = [model.transport(x[i: i + batch].to(device), direction, steps).float().cpu()
             for i in range(0, len(x), batch)]
    return torch.cat(parts)  # (N, E)


def _probes(groups: dict[str, dict[int, dict[str, Tensor]]], labels: Mapping[str, Tensor],
            schema: Mapping[str, Mapping[str, Any]], train: Tensor, test: Tensor, cfg: EvalConfig, n_shared: int,
            log: Log) -> tuple[list[dict[str, Any]], list[str]]:
    """Every (modality, k, group, label) probe; the private group at k <= n_shared is null (it is empty)."""
    rows: list[dict[str, Any]] = []
    notes = [f"private group is empty for k <= n_shared ({n_shared}); its probes are reported as null"]
    usable = {}
    for name, col in labels.items():
        kind = schema.get(name, {}).get("type")
        if kind not in LABEL_TYPES:
            notes.append(f"label {name!r} skipped: type {kind!r} is not one of {LABEL_TYPES}")
            continue
        classes = schema[name].get("classes")
        usable[name] = (col, kind, len(classes) if classes else None)
    for m, per_k in groups.items():
        for k, feats in per_k.items():
            log(f"probes {m} k={k}")
            for group in GROUPS:
                for name, (col, kind, n_classes) in usable.items():
                    metric = "accuracy" if kind == "categorical" else "r2"
                    entry = {"k": k, "modality": m, "group": group, "label": name, "metric": metric, "value": None}
                    if group in feats:
                        r = fit_probe(feats[group], col, kind, train, test, n_classes, cfg.seed,
                                      cfg.probe_val_fraction)
                        if r is not None:
                            entry.update(value=r.value, chance=r.chance, alpha=r.alpha, n_train=r.n_train,
                                         n_test=r.n_test)
                    rows.append(entry)
    return rows, notes
