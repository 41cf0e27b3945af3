"""Linear Stage-2 baselines, fitted on a training split and scored on the evaluated split.

A register module is worth running only if it beats the simplest methods on the same cache, so every
evaluation fits two of them on the run's training store, on the same feature kind:

- ``cca``: regularised linear CCA. The ridge (relative to the mean variance) and the number of canonical
  components are chosen by R@1 on a seeded validation part of the training split, then refitted on all of it.
- ``linear_infonce``: one linear map per modality to an ``embed_dim``-wide, L2-normalised embedding, trained
  with the symmetric InfoNCE loss and a learnable temperature (the run's batch size and epochs).

Inputs are standardised per dimension; token features are flattened and reduced by a PCA fitted on the
training split (at most ``max_dim`` dimensions), so both baselines see one vector per sample. Everything is a
pure function of the arrays and a seed: no files, no printing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from regtok.retrieval import paired_ranks, retrieval_metrics

CCA_RIDGES = (1e-3, 1e-2, 1e-1, 1.0)  # times the mean per-dimension variance
CCA_COMPONENTS = (8, 16, 32, 64, 128, 256, 512)


@dataclass
class Reducer:
    """Standardise, then project on the top principal components of the training rows: (N, …) → (N, K)."""

    mean: Tensor  # (F,)
    std: Tensor  # (F,)
    components: Tensor | None  # (F, K) or None when F <= max_dim (standardisation only)

    @classmethod
    def fit(cls, x: Tensor, max_dim: int) -> Reducer:
        x = x.reshape(len(x), -1).double()  # (N, F)
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        z = (x - mean) / std
        comps = None
        if z.shape[1] > max_dim:
            k = min(max_dim, z.shape[0] - 1)
            # Top-k right singular vectors; the Gram form is exact and cheap when N < F.
            if z.shape[0] < z.shape[1]:
                evals, evecs = torch.linalg.eigh(z @ z.T)  # (N,), (N, N), ascending
                top = evecs[:, -k:].flip(1) / evals[-k:].flip(0).clamp_min(1e-12).sqrt()  # (N, k)
                comps = z.T @ top  # (F, k), orthonormal columns
            else:
                comps = torch.linalg.eigh(z.T @ z)[1][:, -k:].flip(1)  # (F, k)
        return cls(mean, std, comps)

    def __call__(self, x: Tensor) -> Tensor:
        z = (x.reshape(len(x), -1).double() - self.mean) / self.std  # (N, F)
        return (z if self.components is None else z @ self.components).float()  # (N, K)


@dataclass
class CCA:
    """Canonical projections (D_a, K) and (D_b, K) of reduced features, and the chosen hyper-parameters."""

    proj_a: Tensor
    proj_b: Tensor
    ridge: float
    components: int

    @classmethod
    def fit(cls, xa: Tensor, xb: Tensor, ridge: float, components: int) -> CCA:
        """Ridge-regularised CCA of centred (N, D_a), (N, D_b) by whitening and one SVD."""
        pa, pb, _, _, _ = _canonical(xa, xb, ridge, components)
        return cls(pa, pb, ridge, pa.shape[1])

    def embed(self, xa: Tensor, xb: Tensor) -> tuple[Tensor, Tensor]:
        return F.normalize(xa @ self.proj_a, dim=-1), F.normalize(xb @ self.proj_b, dim=-1)  # (N, K) each


CCA_POWERS = (0.0, 1.0, 2.0, 4.0)


def weighted_cca(xa: Tensor, xb: Tensor, n_dirs: int, val_fraction: float,
                 seed: int) -> tuple[Tensor, Tensor, dict[str, float]]:
    """The ``n_dirs`` leading canonical directions, each weighted by its canonical correlation ρ^power.

    Weighting replaces a hard choice of the component count: weak (noisy) directions fade instead of being cut,
    so every prefix of the directions is a usable embedding. The ridge and the power (0 = plain CCA) are chosen
    by R@1 on a seeded validation part of the rows, then the directions are refitted on all of them.
    Returns (D_a, n), (D_b, n) float32 projections of centred inputs, strongest first, and what was chosen.
    """
    val, fit = _val_split(len(xa), val_fraction, seed)
    best = (-1.0, CCA_RIDGES[0], CCA_POWERS[0])
    for ridge in CCA_RIDGES:
        pa, pb, ma, mb, rho = _canonical(xa[fit], xb[fit], ridge, n_dirs)
        ea, eb = (xa[val] - ma) @ pa, (xb[val] - mb) @ pb
        for power in CCA_POWERS:
            w = rho**power
            score = mean_r1(F.normalize(ea * w, dim=-1), F.normalize(eb * w, dim=-1))
            if score > best[0]:
                best = (score, ridge, power)
    score, ridge, power = best
    pa, pb, _, _, rho = _canonical(xa, xb, ridge, n_dirs)
    w = rho**power
    return pa * w, pb * w, {"ridge": ridge, "power": power, "val_r1": score,
                            "rho": [round(float(r), 4) for r in rho[:4]]}


def _val_split(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded (validation, fit) row indices: at least 2 validation rows."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(2, int(round(n * val_fraction)))
    return order[:n_val], order[n_val:]


def _canonical(xa: Tensor, xb: Tensor, ridge: float, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The k leading canonical directions of ridge CCA: projections of centred inputs (D_a, k), (D_b, k)
    float32, the column means (D_a,), (D_b,) and the canonical correlations (k,), strongest first."""
    a, b = xa.double(), xb.double()
    ma, mb = a.mean(0), b.mean(0)
    a, b = a - ma, b - mb
    wa, wb = (_inv_sqrt(x.T @ x / len(a), ridge) for x in (a, b))  # (D, D) each
    u, rho, vh = torch.linalg.svd(wa @ (a.T @ b / len(a)) @ wb, full_matrices=False)
    k = min(k, len(rho))
    return (wa @ u[:, :k]).float(), (wb @ vh[:k].T).float(), ma.float(), mb.float(), rho[:k].float()


def _inv_sqrt(c: Tensor, ridge: float) -> Tensor:
    """(C + ridge · mean(diag C) · I)^(-1/2) of a symmetric PSD matrix."""
    reg = c + ridge * c.diagonal().mean() * torch.eye(len(c), dtype=c.dtype)
    evals, evecs = torch.linalg.eigh(reg)
    return evecs @ torch.diag(evals.clamp_min(1e-12).rsqrt()) @ evecs.T


def mean_r1(a: Tensor, b: Tensor) -> float:
    """Mean over both directions of paired R@1 (pessimistic ties)."""
    return float(((paired_ranks(a, b) == 1).double().mean() + (paired_ranks(b, a) == 1).double().mean()) / 2)


def select_cca(xa: Tensor, xb: Tensor, val_fraction: float, seed: int) -> tuple[CCA, dict[str, float]]:
    """CCA with ridge and components chosen on a validation part of (xa, xb), refitted on all rows."""
    val, fit = _val_split(len(xa), val_fraction, seed)
    best: tuple[float, float, int] = (-1.0, CCA_RIDGES[0], CCA_COMPONENTS[0])
    for ridge in CCA_RIDGES:
        full = CCA.fit(xa[fit], xb[fit], ridge, max(CCA_COMPONENTS))
        for k in CCA_COMPONENTS:
            if k > full.proj_a.shape[1] and k != CCA_COMPONENTS[0]:
                break
            trial = CCA(full.proj_a[:, :k], full.proj_b[:, :k], ridge, k)
            score = mean_r1(*trial.embed(xa[val], xb[val]))
            if score > best[0]:
                best = (score, ridge, k)
    score, ridge, k = best
    return CCA.fit(xa, xb, ridge, k), {"val_r1": score, "ridge": ridge, "components": k, "val_rows": len(val)}


def fit_linear_infonce(xa: Tensor, xb: Tensor, embed_dim: int, epochs: int, batch_size: int, seed: int,
                       lr: float = 1e-3, weight_decay: float = 0.01,
                       init_temperature: float = 0.07) -> tuple[Tensor, Tensor]:
    """Linear maps (D_a, E), (D_b, E) trained with symmetric InfoNCE on (N, D_a), (N, D_b); AdamW, cosine lr."""
    g = torch.Generator().manual_seed(seed)
    xa, xb = xa.float(), xb.float()
    wa = torch.nn.Parameter(torch.randn(xa.shape[1], embed_dim, generator=g) / math.sqrt(xa.shape[1]))
    wb = torch.nn.Parameter(torch.randn(xb.shape[1], embed_dim, generator=g) / math.sqrt(xb.shape[1]))
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
    opt = torch.optim.AdamW([{"params": [wa, wb], "weight_decay": weight_decay},
                             {"params": [log_scale], "weight_decay": 0.0}], lr=lr)
    n = len(xa)
    bs = max(2, min(batch_size, n))
    steps_per_epoch = max(1, n // bs)
    total = max(1, epochs * steps_per_epoch)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            ea, eb = F.normalize(xa[idx] @ wa, dim=-1), F.normalize(xb[idx] @ wb, dim=-1)  # (B, E)
            logits = log_scale.clamp(max=math.log(100.0)).exp() * ea @ eb.T  # (B, B)
            labels = torch.arange(len(idx))
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return wa.detach(), wb.detach()


@dataclass(frozen=True)
class BaselineConfig:
    """How the baselines are fitted: reduction width, validation part for CCA, the linear head's schedule."""

    max_dim: int = 512
    val_fraction: float = 0.2
    embed_dim: int = 64
    epochs: int = 20
    batch_size: int = 256
    seed: int = 0


def fit_and_score(train: dict[str, Tensor], test: dict[str, Tensor], modalities: tuple[str, str],
                  cfg: BaselineConfig, chunk_size: int = 4096, device: torch.device | None = None,
                  log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Fit every baseline on ``train`` and score it on ``test``; {name: {"a_to_b", "b_to_a", "fit": {…}}}.

    train, test: {modality: (N, D) or (N, T, D)} of one feature kind. Rows are paired across modalities.
    """
    log = log or (lambda _msg: None)
    a, b = modalities
    red = {m: Reducer.fit(train[m], cfg.max_dim) for m in (a, b)}
    tr = {m: red[m](train[m]) for m in (a, b)}  # (N_train, K)
    te = {m: red[m](test[m]) for m in (a, b)}  # (N_test, K)
    reduced = {"input_dims": {m: int(tr[m].shape[1]) for m in (a, b)}, "train_rows": int(len(tr[a]))}
    log("baseline: linear CCA")
    cca, chosen = select_cca(tr[a], tr[b], cfg.val_fraction, cfg.seed)
    out: dict[str, dict] = {"cca": {**retrieval_metrics(*cca.embed(te[a], te[b]), chunk_size, device),
                                    "fit": {**reduced, **chosen}}}
    log("baseline: linear InfoNCE head")
    wa, wb = fit_linear_infonce(tr[a], tr[b], cfg.embed_dim, cfg.epochs, cfg.batch_size, cfg.seed)
    ea, eb = F.normalize(te[a] @ wa, dim=-1), F.normalize(te[b] @ wb, dim=-1)
    out["linear_infonce"] = {**retrieval_metrics(ea, eb, chunk_size, device),
                             "fit": {**reduced, "embed_dim": cfg.embed_dim, "epochs": cfg.epochs,
                                     "batch_size": cfg.batch_size}}
    return out
