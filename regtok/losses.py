"""Loss functions. Each is pure and returns a dict of named terms (every term gets logged).

Distributed exactness: terms that compare samples across the batch (InfoNCE, variance/covariance, uniformity)
gather embeddings from the ``world_size`` ranks with autograd (:func:`regtok.distributed.gather_with_grad`), so
that DDP's gradient averaging reproduces the single-process full-batch gradient; per-sample terms are local
means. ``rank`` and ``world_size`` are arguments (as open_clip's ``ClipLoss``), never read from global state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from regtok.config import ModelConfig
from regtok.distributed import gather_with_grad, local_offset
from regtok.flow import Velocity, logit_normal


def _fp32(x: Tensor) -> Tensor:
    """At least float32 (bf16/fp16 activations under autocast), float64 kept as is."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def info_nce(a: Tensor, b: Tensor, logit_scale: Tensor, rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
    """Symmetric InfoNCE between paired, L2-normalised embeddings a, b: (B, E) each; logit_scale: () > 0.

    Local rows are scored against the columns of every rank (gathered with autograd); labels are offset
    by ``rank``'s position in the gathered batch. Returns "contrastive" (mean of both directions),
    "contrastive/a_to_b", "contrastive/b_to_a".
    """
    a, b = _fp32(a), _fp32(b)
    b_all = gather_with_grad(b, world_size)  # (N, E), N = world * B
    a_all = gather_with_grad(a, world_size)  # (N, E)
    labels = torch.arange(a.shape[0], device=a.device) + local_offset(a.shape[0], rank)  # (B,)
    logits_ab = logit_scale * a @ b_all.T  # (B, N)
    logits_ba = logit_scale * b @ a_all.T  # (B, N)
    a_to_b = F.cross_entropy(logits_ab, labels)
    b_to_a = F.cross_entropy(logits_ba, labels)
    return {"contrastive": (a_to_b + b_to_a) / 2, "contrastive/a_to_b": a_to_b, "contrastive/b_to_a": b_to_a}


def mrl_info_nce(prefixes: dict[int, tuple[Tensor, Tensor]], logit_scale: Tensor, rank: int = 0,
                 world_size: int = 1) -> dict[str, Tensor]:
    """Matryoshka-style InfoNCE: the mean over prefix lengths k of ``info_nce(a_k, b_k)``.

    prefixes: {k: (a_k, b_k)} with a_k, b_k (B, E) the shared embeddings from the first k shared registers.
    Returns "contrastive" (the mean) and "contrastive/k<k>" for each k.
    """
    terms = {f"contrastive/k{k}": info_nce(a, b, logit_scale, rank, world_size)["contrastive"]
             for k, (a, b) in prefixes.items()}
    terms["contrastive"] = torch.stack(list(terms.values())).mean()
    return terms


def preservation_loss(recon: Tensor, target: Tensor) -> Tensor:
    """1 − cosine(recon, target) over the feature dim, averaged over tokens and batch. (B, T, D) each → ()."""
    recon = _fp32(recon)
    return (1.0 - F.cosine_similarity(recon, target.to(recon.dtype), dim=-1)).mean()


def agreement_loss(a: Tensor, b: Tensor, keep: Tensor) -> Tensor:
    """How far two modalities' shared registers are from holding the same thing: the mean squared difference of
    the kept ones over their mean energy. a, b: (B, S, d) shared registers; keep: (B,) kept prefix. → ().

    Scale-free, so it cannot be lowered by shrinking both; what one modality's registers hold and the other's do
    not (what is specific to it) is what it costs.
    """
    a, b = _fp32(a), _fp32(b)
    w = (torch.arange(a.shape[1], device=a.device) < keep[:, None]).to(a.dtype)[..., None]  # (B, S, 1)
    diff = ((a - b) * w).pow(2).sum()
    energy = ((a.pow(2) + b.pow(2)) * w).sum() / 2
    return diff / energy.clamp_min(1e-12)


def variance_covariance(z: Tensor, eps: float = 1e-4, world_size: int = 1) -> dict[str, Tensor]:
    """VICReg-style anti-collapse terms on L2-normalised embeddings z: (B, E), gathered over ``world_size`` ranks.

    z is rescaled by √E so an isotropic spread on the sphere has unit variance per dimension.
    "variance": mean over dims of relu(1 − std); "covariance": squared off-diagonal covariance / E.
    Both are 0 for whitened embeddings and grow as the embeddings collapse to a point or a subspace.
    """
    z = gather_with_grad(_fp32(z), world_size) * math.sqrt(z.shape[1])  # (N, E)
    n, e = z.shape
    zc = z - z.mean(dim=0, keepdim=True)  # (N, E)
    std = torch.sqrt(zc.pow(2).sum(dim=0) / (n - 1) + eps)  # (E,)
    cov = zc.T @ zc / (n - 1)  # (E, E)
    off = cov - torch.diag(torch.diagonal(cov))  # (E, E)
    return {"variance": F.relu(1.0 - std).mean(), "covariance": off.pow(2).sum() / e}


def uniformity(z: Tensor, t: float = 2.0, world_size: int = 1) -> Tensor:
    """Wang & Isola's uniformity of L2-normalised z (B, E), gathered over ``world_size`` ranks:
    log mean_{i≠j} exp(−t‖z_i − z_j‖²).

    Lowest when the embeddings spread over the sphere, 0 when they collapse to a point; unlike a per-dimension
    variance hinge it does not ask weak directions to be as spread as strong ones.
    """
    z_all = gather_with_grad(_fp32(z), world_size)  # (N, E)
    n = z_all.shape[0]
    sq = (2 - 2 * z_all @ z_all.T).clamp_min(0)  # (N, N) squared distances of unit vectors
    off = ~torch.eye(n, dtype=torch.bool, device=z.device)
    return torch.logsumexp(-t * sq[off], dim=0) - math.log(n * (n - 1))


def flow_matching_loss(
    velocity: Velocity, x_a: Tensor, x_b: Tensor, generator: torch.Generator | None, stop_grad_target: bool = True,
    t: Tensor | None = None,
) -> dict[str, Tensor]:
    """Rectified flow both ways: x_t = (1−t)·x_0 + t·x_1, target x_1 − x_0, t ~ logit-normal, squared error.

    x_a, x_b: (B, E) shared embeddings. Direction 0 transports A→B (x_0 = x_a), direction 1 B→A.
    With ``stop_grad_target`` the endpoint x_1 is detached, so each encoder is trained only as a source:
    it cannot lower the loss by moving the target. The squared error is summed over E, averaged over B.
    ``t`` (2B,) overrides the draw from ``generator`` (rows [0, B) are A→B, [B, 2B) B→A).
    Returns "flow" (mean of both directions), "flow/a_to_b", "flow/b_to_a".
    """
    bsz = x_a.shape[0]
    x_a, x_b = _fp32(x_a), _fp32(x_b)
    x0 = torch.cat([x_a, x_b])  # (2B, E)
    x1 = torch.cat([x_b, x_a])  # (2B, E)
    if stop_grad_target:
        x1 = x1.detach()
    direction = torch.cat([torch.zeros(bsz, dtype=torch.long), torch.ones(bsz, dtype=torch.long)]).to(x_a.device)
    t = logit_normal(2 * bsz, generator, x_a.device, x_a.dtype) if t is None else t  # (2B,)
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1  # (2B, E)
    err = (velocity(xt, t, direction) - (x1 - x0)).pow(2).sum(dim=-1)  # (2B,)
    a_to_b, b_to_a = err[:bsz].mean(), err[bsz:].mean()
    return {"flow": (a_to_b + b_to_a) / 2, "flow/a_to_b": a_to_b, "flow/b_to_a": b_to_a}


def total_loss(terms: dict[str, Tensor], cfg: ModelConfig) -> Tensor:
    """The scalar to backpropagate, from the named terms, per ``cfg.loss_type``.

    contrastive: contrastive; flow_matching: flow + anti-collapse; combined: contrastive + flow_weight ×
    (flow + anti-collapse). Every type adds preservation_weight × preservation (and agreement_weight × agreement).
    """
    loss = cfg.preservation_weight * terms["preservation"]
    if cfg.agreement_weight > 0:
        loss = loss + cfg.agreement_weight * terms["agreement"]
    if cfg.uses_contrastive:
        loss = loss + terms["contrastive"]
    if cfg.uses_flow:
        flow = terms["flow"] + cfg.flow_var_weight * terms["variance"] + cfg.flow_cov_weight * terms["covariance"]
        flow = flow + cfg.flow_uniformity_weight * terms["uniformity"]
        loss = loss + cfg.flow_scale * flow
    return loss
