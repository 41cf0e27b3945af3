"""Learning on a planted problem: a shared latent seen through two noisy modality-specific linear maps.

Each modality's input is [z + σ·ε_m, p_m] @ W_m: z (16-d) is shared, p_m (8-d) private, ε_m noise. A tiny model
trained for a few hundred steps of each loss type must retrieve the partner far above chance, and (with 8-wide
register bottlenecks, register_dim=8, one register cannot hold all of z) the full prefix must beat a 1-register
prefix. These models start from random reads (no init_reads), so what they retrieve is learnt by the losses.
The flow-only run must do so without collapsing: no contrastive term holds it up.
"""

from __future__ import annotations

import pytest
import torch

from regtok.config import PRESETS, ModelConfig, resolve
from regtok.model import RegTok

D_SHARED, D_PRIVATE, D_IN, NOISE = 16, 8, 32, 0.3
STEPS, BATCH, N_TEST = 200, 64, 256
CHANCE = 1 / N_TEST
# The register stream these thresholds were set on: 64 wide, two blocks, 8-wide register bottlenecks.
OLD_TINY = {"hidden_dim": 64, "embed_dim": 64, "n_layers": 2, "mlp_ratio": 4.0, "register_dim": 8}


class Planted:
    """The generative process: fixed random mixing matrices, fresh samples per call."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.mix = [torch.randn(D_SHARED + D_PRIVATE, D_IN, generator=g) for _ in range(2)]

    def sample(self, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        z = torch.randn(n, D_SHARED, generator=g)  # (n, 16)
        views = []
        for w in self.mix:
            view = torch.cat([z + NOISE * torch.randn(n, D_SHARED, generator=g),
                              torch.randn(n, D_PRIVATE, generator=g)], dim=1)  # (n, 24)
            views.append(view @ w)  # (n, 32)
        return {"vision": views[0], "tactile": views[1]}


def recall_at_1(query: torch.Tensor, gallery: torch.Tensor) -> float:
    """Fraction of rows whose nearest gallery row (cosine) is its partner."""
    return (query @ gallery.T).argmax(dim=1).eq(torch.arange(len(query))).float().mean().item()


def spread(x: torch.Tensor) -> dict[str, float]:
    """How spread unit embeddings (N, E) are: mean pairwise cosine, trace of the covariance (1 − |mean|² for
    unit vectors; 0 when collapsed to a point), and the participation ratio of its eigenvalues (scale-free)."""
    eig = torch.linalg.eigvalsh(torch.cov(x.T)).clamp(min=0)  # (E,)
    return {"mean_cosine": (x @ x.T).mean().item(), "total_variance": eig.sum().item(),
            "participation_ratio": (eig.sum() ** 2 / eig.pow(2).sum()).item()}


def train(loss_type: str, **overrides) -> tuple[RegTok, dict[str, torch.Tensor]]:
    cfg = resolve(ModelConfig, None, PRESETS["tiny"]["model"],
                  {**OLD_TINY, "loss_type": loss_type, "read_init": "random", **overrides})
    torch.manual_seed(0)
    model = RegTok(cfg, {"vision": (1, D_IN), "tactile": (1, D_IN)}).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    problem, g = Planted(0), torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        loss = model.losses(problem.sample(BATCH, g), generator=g)["loss"]
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.fit_decoders(problem.sample(1024, g))  # as the trainer does with the weights it keeps
    return model.eval(), problem.sample(N_TEST, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("loss_type", ["contrastive", "flow_matching", "combined"])
def test_learns_the_planted_problem(loss_type):
    # trained inside the test (not a module fixture) so that conftest's thread setting is already in force
    model, test = train(loss_type)
    with torch.no_grad():
        check_retrieval_and_prefix_order(model, test)
        if model.has_flow:
            check_transport_and_spread(model, test)


def check_retrieval_and_prefix_order(model: RegTok, test: dict[str, torch.Tensor]) -> None:
    full = model.cfg.n_registers
    r1, recon = {}, {}
    for k in (1, full):
        outs = model(test, keep=k)
        r1[k] = recall_at_1(outs["vision"].shared, outs["tactile"].shared)
        recon[k] = (1 - torch.cosine_similarity(outs["vision"].recon[:, 0], test["vision"], dim=-1)).mean().item()
    assert r1[full] > 40 * CHANCE, r1
    assert r1[full] > r1[1] + 0.05, r1
    # the private registers carry what the shared ones do not: reconstruction improves with the prefix
    assert recon[full] < 0.7 * recon[1], recon


def check_transport_and_spread(model: RegTok, test: dict[str, torch.Tensor]) -> None:
    outs = model(test)
    a, b = outs["vision"].shared, outs["tactile"].shared  # (N, E)
    for x in (a, b):
        assert spread(x)["mean_cosine"] < 0.5 and spread(x)["total_variance"] > 0.3, spread(x)
        assert spread(x)["participation_ratio"] > 4, spread(x)
    assert recall_at_1(model.transport(a, "a_to_b", steps=10), b) > 40 * CHANCE
    assert recall_at_1(model.transport(b, "b_to_a", steps=10), a) > 40 * CHANCE


def test_flow_without_anti_collapse_terms_collapses():
    """The control for the spread test: with every anti-collapse term off, flow-only training collapses."""
    # read_dim=0: without the linear read, so that nothing but the trained path carries the input
    model, test = train("flow_matching", flow_var_weight=0.0, flow_cov_weight=0.0, flow_uniformity_weight=0.0,
                        read_dim=0)
    with torch.no_grad():
        outs = model(test)
        a, b = outs["vision"].shared, outs["tactile"].shared
        assert spread(a)["mean_cosine"] > 0.9 and spread(a)["total_variance"] < 0.1
        assert recall_at_1(model.transport(a, "a_to_b", steps=10), b) < 10 * CHANCE


@torch.no_grad()
def test_untrained_model_is_at_chance():
    """The control for the thresholds above: the same evaluation before training."""
    cfg = resolve(ModelConfig, None, PRESETS["tiny"]["model"])
    torch.manual_seed(0)
    model = RegTok(cfg, {"vision": (1, D_IN), "tactile": (1, D_IN)}).eval()
    test = Planted(0).sample(N_TEST, torch.Generator().manual_seed(1))
    outs = model(test)
    assert recall_at_1(outs["vision"].shared, outs["tactile"].shared) < 10 * CHANCE
