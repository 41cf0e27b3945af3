"""Stage-2 baselines, fitted on a training split and scored on the evaluated split.

A register module is worth running only if it beats the simplest methods on the same cache, so every evaluation
fits these on the run's training rows, on the same feature kind:

- ``cca``: regularised linear CCA. The ridge (relative to the mean variance) and the number of canonical
  components are chosen by R@1 on a seeded validation part of the training split, then refitted on all of it;
  a ridge chosen at the edge of its grid extends the grid that way until it is not (so widening it changes
  nothing), and the components run from 1 to every dimension there is.
- ``weighted_cca``: the canonical directions weighted by ρ^p instead of a hard component count (ridge and power
  chosen on validation), the linear map the register module starts from.
- ``linear_infonce``: one linear map per modality to an ``embed_dim``-wide, L2-normalised embedding, symmetric
  InfoNCE with a learnable temperature, early-stopped on validation R@1.
- ``mlp_infonce``: the TVL/CLIP-style Stage-2 head, a two-layer MLP per modality (GELU, dropout, weight decay),
  the same loss and early stopping; its learning rate and dropout are chosen on validation.

Inputs are standardised per dimension; token features are flattened and reduced by a PCA fitted on the
training split (at most ``max_dim`` dimensions), so every baseline sees one vector per sample. Eval passes the
model's read codes instead (``reduced``): the same standardisation and PCA, fitted by the trainer on the run's
training rows at ``read_dim`` dimensions. Everything is a pure function of the arrays and a seed: no files, no
printing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from regtok.reduce import Reducer  # the baselines' preprocessing, importable from here
from regtok.retrieval import paired_ranks, retrieval_metrics

CCA_RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # times the mean per-dimension variance; extended at an edge
CCA_MAX_RIDGE_STEPS = 4  # how far (×10 each) the ridge grid extends past an edge it chose
CCA_COMPONENTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # and every dimension there is


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


def weighted_cca(xa: Tensor, xb: Tensor, n_dirs: int, val_fraction: float, seed: int,
                 counts: Sequence[int] | None = None) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """The leading canonical directions, each weighted by its canonical correlation ρ^power.

    Weighting fades weak (noisy) directions instead of cutting them, so every prefix of the directions is a usable
    embedding. The ridge, the power (0 = plain CCA) and, given ``counts``, how many directions to keep (ties: the
    fewest) are chosen by R@1 on a seeded validation part of the rows; the directions are then refitted on all of
    them. Returns (D_a, n), (D_b, n) float32 projections of centred inputs, strongest first (n = ``n_dirs`` or the
    chosen count), and what was chosen.
    """
    val, fit = _val_split(len(xa), val_fraction, seed)
    counts = sorted(set(counts or [n_dirs]))
    best = (-1.0, 0, CCA_RIDGES[0], CCA_POWERS[0])
    path = _CCAPath(xa[fit], xb[fit])
    for ridge in CCA_RIDGES:
        pa, pb, rho = path.directions(ridge, max(counts))
        ea, eb = (xa[val] - path.ma.float()) @ pa, (xb[val] - path.mb.float()) @ pb
        for power in CCA_POWERS:
            w = rho**power
            for n in counts:
                score = mean_r1(F.normalize(ea[:, :n] * w[:n], dim=-1), F.normalize(eb[:, :n] * w[:n], dim=-1))
                if (score, -n) > (best[0], -best[1]):
                    best = (score, n, ridge, power)
    score, n, ridge, power = best
    pa, pb, _, _, rho = _canonical(xa, xb, ridge, n)
    w = rho**power
    return pa * w, pb * w, {"ridge": ridge, "power": power, "directions": pa.shape[1], "val_r1": score,
                            "rho": [round(float(r), 4) for r in rho[:4]]}


def _val_split(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded (validation, fit) row indices: at least 2 validation rows."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(2, int(round(n * val_fraction)))
    return order[:n_val], order[n_val:]


class _CCAPath:
    """Ridge CCA of (N, D_a), (N, D_b) for any ridge from one eigendecomposition of each covariance: whitening
    by (C + ridge · mean(diag C) · I)^(-1/2) = V diag((λ + ridge · mean λ)^(-1/2)) Vᵀ, then one SVD per ridge."""

    def __init__(self, xa: Tensor, xb: Tensor) -> None:
        a, b = xa.double(), xb.double()
        self.ma, self.mb = a.mean(0), b.mean(0)
        a, b = a - self.ma, b - self.mb
        self.eig = [torch.linalg.eigh(x.T @ x / len(a)) for x in (a, b)]  # (D,), (D, D) each
        self.cross = a.T @ b / len(a)  # (D_a, D_b)

    def directions(self, ridge: float, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """The k leading canonical directions, projections of centred inputs (D_a, k), (D_b, k) float32, and
        the canonical correlations (k,), strongest first."""
        wa, wb = (v @ torch.diag((e.clamp_min(0) + ridge * e.clamp_min(0).mean()).clamp_min(1e-12).rsqrt()) @ v.T
                  for e, v in self.eig)  # (D, D) each
        u, rho, vh = torch.linalg.svd(wa @ self.cross @ wb, full_matrices=False)
        k = min(k, len(rho))
        return (wa @ u[:, :k]).float(), (wb @ vh[:k].T).float(), rho[:k].float()


def _canonical(xa: Tensor, xb: Tensor, ridge: float, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The k leading canonical directions of ridge CCA (see :class:`_CCAPath`) and the column means."""
    path = _CCAPath(xa, xb)
    pa, pb, rho = path.directions(ridge, k)
    return pa, pb, path.ma.float(), path.mb.float(), rho


def mean_r1(a: Tensor, b: Tensor) -> float:
    """Mean over both directions of paired R@1 (pessimistic ties)."""
    return float(((paired_ranks(a, b) == 1).double().mean() + (paired_ranks(b, a) == 1).double().mean()) / 2)


def select_cca(xa: Tensor, xb: Tensor, val_fraction: float, seed: int) -> tuple[CCA, dict[str, float]]:
    """CCA with ridge and components chosen on a validation part of (xa, xb), refitted on all rows.

    The ridge grid is extended ×10 past whichever edge it chose (up to CCA_MAX_RIDGE_STEPS times), so the choice
    is interior; the components run over powers of two up to, and including, every dimension there is.
    """
    val, fit = _val_split(len(xa), val_fraction, seed)
    top = min(xa.shape[1], xb.shape[1], len(fit))
    comps = sorted({k for k in CCA_COMPONENTS if k < top} | {top})
    scores: dict[float, tuple[float, int]] = {}
    path = _CCAPath(xa[fit], xb[fit])
    va, vb = xa[val] - path.ma.float(), xb[val] - path.mb.float()  # CCA.embed takes centred rows

    def score(ridge: float) -> tuple[float, int]:
        if ridge not in scores:
            pa, pb, _ = path.directions(ridge, top)
            best = max(((mean_r1(*CCA(pa[:, :k], pb[:, :k], ridge, k).embed(va, vb)), k)
                        for k in comps if k <= pa.shape[1]), key=lambda t: (t[0], -t[1]))
            scores[ridge] = best
        return scores[ridge]

    ridges = list(CCA_RIDGES)
    for _ in range(CCA_MAX_RIDGE_STEPS + 1):
        best = max(ridges, key=lambda r: (score(r)[0], r))  # ties: the larger ridge (the simpler fit)
        if best == ridges[0] and score(best)[0] > 0:
            ridges.insert(0, ridges[0] / 10)
        elif best == ridges[-1] and score(best)[0] > 0:
            ridges.append(ridges[-1] * 10)
        else:
            break
    (val_r1, k), ridge = score(best), best
    return CCA.fit(xa, xb, ridge, k), {"val_r1": val_r1, "ridge": ridge, "components": k, "val_rows": len(val),
                                       "ridges_tried": [float(r) for r in ridges], "components_tried": comps}


@dataclass(frozen=True)
class HeadConfig:
    """An InfoNCE head: ``hidden`` 0 is linear, else a two-layer GELU MLP with ``dropout``; early-stopped."""

    embed_dim: int = 64
    hidden: int = 0
    dropout: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 256
    max_epochs: int = 200
    patience: int = 10  # epochs without a better validation R@1 before stopping
    init_temperature: float = 0.07


def _head(d_in: int, cfg: HeadConfig, g: torch.Generator) -> torch.nn.Module:
    """A linear map, or Linear → GELU → Dropout → Linear; initialised from ``g``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))
        if not cfg.hidden:
            return torch.nn.Linear(d_in, cfg.embed_dim, bias=False)
        return torch.nn.Sequential(torch.nn.Linear(d_in, cfg.hidden), torch.nn.GELU(), torch.nn.Dropout(cfg.dropout),
                                   torch.nn.Linear(cfg.hidden, cfg.embed_dim))


def fit_infonce_head(xa: Tensor, xb: Tensor, cfg: HeadConfig, val_fraction: float,
                     seed: int) -> tuple[Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], dict[str, Any]]:
    """A head per modality trained with symmetric InfoNCE on (N, D_a), (N, D_b) with AdamW, and stopped early: the
    epoch with the best R@1 on a seeded validation part of the rows is kept. Returns the embedding function
    (xa, xb) → L2-normalised (M, E) each, and what was chosen. Dropout draws from the global generator, so the
    fit runs under a forked one seeded with ``seed``: the same call gives the same head, whatever ran before."""
    with torch.random.fork_rng(devices=[]), torch.enable_grad():  # a caller's no_grad must not stop the fit
        torch.manual_seed(seed)
        return _fit_head(xa, xb, cfg, val_fraction, seed)


def _fit_head(xa: Tensor, xb: Tensor, cfg: HeadConfig, val_fraction: float,
              seed: int) -> tuple[Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    xa, xb = xa.float(), xb.float()
    val, fit = _val_split(len(xa), val_fraction, seed)
    heads = torch.nn.ModuleList([_head(xa.shape[1], cfg, g), _head(xb.shape[1], cfg, g)])
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))
    decay = [p for p in heads.parameters() if p.dim() >= 2]
    plain = [p for p in heads.parameters() if p.dim() < 2] + [log_scale]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": plain, "weight_decay": 0.0}], lr=cfg.lr)

    def embed(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        return F.normalize(heads[0](a), dim=-1), F.normalize(heads[1](b), dim=-1)

    bs = max(2, min(cfg.batch_size, len(fit)))
    best, best_epoch, best_state, epoch = -1.0, -1, None, 0
    for epoch in range(cfg.max_epochs):
        heads.train()
        perm = fit[torch.randperm(len(fit), generator=g)]
        for i in range(max(1, len(fit) // bs)):
            idx = perm[i * bs:(i + 1) * bs]
            ea, eb = embed(xa[idx], xb[idx])  # (B, E)
            logits = log_scale.clamp(max=math.log(100.0)).exp() * ea @ eb.T  # (B, B)
            labels = torch.arange(len(idx))
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        heads.eval()
        with torch.no_grad():
            score = mean_r1(*embed(xa[val], xb[val]))
        if score > best:
            best, best_epoch = score, epoch
            best_state = {k: v.clone() for k, v in heads.state_dict().items()}
        elif epoch - best_epoch >= cfg.patience:
            break
    heads.load_state_dict(best_state)
    heads.eval()
    return torch.no_grad()(embed), {"val_r1": best, "epoch": best_epoch + 1, "epochs_run": epoch + 1,
                                    "val_rows": len(val)}


@dataclass(frozen=True)
class BaselineConfig:
    """How the baselines are fitted: reduction width, validation part, the InfoNCE heads' width and batch."""

    max_dim: int = 512
    val_fraction: float = 0.2
    embed_dim: int = 64
    batch_size: int = 256  # the InfoNCE heads' batch
    seed: int = 0
    mlp_hidden: int = 1024
    mlp_grid: tuple[tuple[float, float], ...] = ((1e-3, 0.5), (3e-4, 0.3))  # (lr, dropout) pairs, chosen on validation
    mlp_weight_decay: float = 0.1
    max_epochs: int = 100
    patience: int = 5


BASELINES = ("cca", "weighted_cca", "linear_infonce", "mlp_infonce")


def fit_and_score(train: dict[str, Tensor], test: dict[str, Tensor], modalities: tuple[str, str],
                  cfg: BaselineConfig, chunk_size: int = 4096, device: torch.device | None = None,
                  log: Callable[[str], None] | None = None, reduced: bool = False) -> dict[str, dict]:
    """Fit every baseline on ``train`` and score it on ``test``; {name: {"a_to_b", "b_to_a", "fit": {…}}}.

    train, test: {modality: (N, D) or (N, T, D)} of one feature kind, reduced here by :class:`Reducer` (fitted on
    ``train``); with ``reduced``, (N, K) tensors already reduced (a PCA of training rows), used as they are. Rows
    are paired across modalities.
    """
    log = log or (lambda _msg: None)
    a, b = modalities
    if reduced:
        tr, te = {m: train[m].float() for m in (a, b)}, {m: test[m].float() for m in (a, b)}  # (N, K) each
        if any(x.dim() != 2 for x in (*tr.values(), *te.values())):
            raise ValueError("reduced inputs must be (N, K) tensors")
    else:
        fitted = {m: Reducer.fit_transform(train[m], cfg.max_dim) for m in (a, b)}  # one read of the training rows
        red, tr = {m: f[0] for m, f in fitted.items()}, {m: f[1] for m, f in fitted.items()}  # tr: (N_train, K)
        te = {m: red[m](test[m]) for m in (a, b)}  # (N_test, K)
    inputs = {"input_dims": {m: int(tr[m].shape[1]) for m in (a, b)}, "train_rows": int(len(tr[a]))}
    score = lambda ea, eb: retrieval_metrics(ea, eb, chunk_size, device)  # noqa: E731
    log("baseline: linear CCA")
    cca, chosen = select_cca(tr[a], tr[b], cfg.val_fraction, cfg.seed)
    out: dict[str, dict] = {"cca": {**score(*cca.embed(te[a], te[b])), "fit": {**inputs, **chosen}}}
    log("baseline: weighted CCA")
    n_dirs = min(tr[a].shape[1], tr[b].shape[1])
    pa, pb, info = weighted_cca(tr[a], tr[b], n_dirs, cfg.val_fraction, cfg.seed)
    ma, mb = tr[a].mean(0), tr[b].mean(0)
    out["weighted_cca"] = {**score(F.normalize((te[a] - ma) @ pa, dim=-1), F.normalize((te[b] - mb) @ pb, dim=-1)),
                           "fit": {**inputs, **info}}
    log("baseline: linear InfoNCE head")
    linear = HeadConfig(embed_dim=cfg.embed_dim, batch_size=cfg.batch_size, max_epochs=cfg.max_epochs,
                        patience=cfg.patience)
    embed, info = fit_infonce_head(tr[a], tr[b], linear, cfg.val_fraction, cfg.seed)
    out["linear_infonce"] = {**score(*embed(te[a], te[b])), "fit": {**inputs, **_head_fit(linear, info)}}
    best = None
    for lr, dropout in cfg.mlp_grid:
        log(f"baseline: MLP InfoNCE head (lr {lr:g}, dropout {dropout:g})")
        mlp = HeadConfig(embed_dim=cfg.embed_dim, hidden=cfg.mlp_hidden, dropout=dropout, lr=lr,
                         weight_decay=cfg.mlp_weight_decay, batch_size=cfg.batch_size, max_epochs=cfg.max_epochs,
                         patience=cfg.patience)
        embed, info = fit_infonce_head(tr[a], tr[b], mlp, cfg.val_fraction, cfg.seed)
        if best is None or info["val_r1"] > best[2]["val_r1"]:
            best = (mlp, embed, info)
    mlp, embed, info = best
    out["mlp_infonce"] = {**score(*embed(te[a], te[b])),
                          "fit": {**inputs, **_head_fit(mlp, info), "grid": [list(g) for g in cfg.mlp_grid]}}
    return out


def _head_fit(cfg: HeadConfig, info: dict[str, Any]) -> dict[str, Any]:
    keys = ("embed_dim", "hidden", "dropout", "lr", "weight_decay", "batch_size", "patience")
    return {**{k: getattr(cfg, k) for k in keys}, **info}
