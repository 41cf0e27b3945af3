"""DDP exactness: two gloo ranks, each on half the batch, averaging gradients as DDP does, must reproduce the
single-process full-batch gradient of the same loss (contrastive with MRL, variance/covariance, preservation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from regtok.config import PRESETS, ModelConfig, resolve
from regtok.distributed import gather_with_grad, local_offset
from regtok.losses import variance_covariance
from regtok.model import RegTok

WORLD = 2
BATCH = 8  # global batch; each rank holds BATCH // WORLD rows
INPUTS = {"vision": (1, 12), "tactile": (3, 10)}


def _model() -> RegTok:
    cfg = resolve(ModelConfig, None, PRESETS["tiny"]["model"],
                  {"loss_type": "contrastive", "mrl": True, "nested_dropout_mode": "none"})
    torch.manual_seed(0)
    return RegTok(cfg, INPUTS).double().train()


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"vision": torch.randn(BATCH, 12, generator=g, dtype=torch.float64),
            "tactile": torch.randn(BATCH, 3, 10, generator=g, dtype=torch.float64)}


def _loss(model: RegTok, batch: dict[str, torch.Tensor], rank: int = 0, world: int = 1) -> torch.Tensor:
    """Contrastive (gathered with autograd) + preservation (local mean) + a gathered batch statistic."""
    terms = model.losses(batch, rank=rank, world_size=world)
    outs = model(batch)
    return terms["loss"] + variance_covariance(outs["vision"].shared, world_size=world)["covariance"]


def _grads(model: RegTok) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(r: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WORLD)
    try:
        assert dist.is_initialized() and dist.get_world_size() == WORLD and dist.get_rank() == r
        local = BATCH // WORLD
        assert local_offset(local, r) == r * local
        x = (torch.arange(3.0) + 10 * r).requires_grad_()
        gathered = gather_with_grad(x, WORLD)  # (W*3,)
        (gathered * torch.arange(6.0)).sum().backward()  # rank r's rows get the sum of both ranks' gradients
        assert torch.equal(x.grad, WORLD * torch.arange(3.0) + 3 * r * WORLD)
        model = _model()
        rows = slice(r * local, (r + 1) * local)
        batch = {m: v[rows] for m, v in _batch().items()}
        _loss(model, batch, r, WORLD).backward()
        for p in model.parameters():  # what DDP does: average the gradients over ranks
            dist.all_reduce(p.grad)
            p.grad /= WORLD
        if r == 0:
            torch.save(_grads(model), out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_average_to_the_full_batch_gradient(tmp_path: Path):
    out = tmp_path / "grads.pt"
    init_file = tmp_path / "init"
    # fork, not spawn: no re-import of torch in the children (seconds each on a loaded 2-core machine);
    # the workers use one intra-op thread, so no OpenMP pool is inherited in use.
    mp.start_processes(_worker, args=(str(init_file), str(out)), nprocs=WORLD, join=True, start_method="fork")
    ddp = torch.load(out, weights_only=True)

    model = _model()
    assert not dist.is_initialized()
    _loss(model, _batch()).backward()
    full = _grads(model)
    assert set(ddp) == set(full)
    for name, g in full.items():
        torch.testing.assert_close(ddp[name], g, rtol=1e-9, atol=1e-12, msg=name)
    assert full["log_logit_scale"].abs() > 0
