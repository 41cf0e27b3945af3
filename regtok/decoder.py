"""The preservation decoder and its closed-form fit.

The decoder reconstructs a register module's standardised input from its register set, one linear map per
register position into the read's PCA code (:class:`PreservationDecoder`); :func:`fit_coarse_to_fine` fits those
maps register by register, each on what the registers before it leave unexplained. Pure torch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from regtok.config import ModelConfig

RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # relative to a register's mean variance; chosen per register on validation


class PreservationDecoder(nn.Module):
    """Reconstruct the module's standardised input (B, T, D_in) from its (masked) register set (B, R, d).

    Every register position has its own linear map into a K-wide code, the coordinates of the module's read
    basis (a PCA of the flattened standardised input, :meth:`RegisterModule.fit_read_basis`); the code is mapped
    back through that basis and added to the per-position training mean. So every output position has its own
    readout (a shared set of queries cross-attending to the registers gave nearly one vector for every position,
    docs/learning.md), and the decoding of a k-prefix is the sum of k registers' contributions, coarse to fine.
    The maps are not learnt by the optimizer: :meth:`RegisterModule.fit_decoder` fits them in closed form (the
    trainer refits them after every epoch), so the reconstruction is converged for every saved state, and the
    preservation loss trains the encoder to make its registers decodable. Without a read basis (``read_dim`` 0)
    the code is the flattened standardised input itself.
    """

    def __init__(self, cfg: ModelConfig, n_tokens: int, d_in: int, code_width: int) -> None:
        super().__init__()
        d, r = cfg.hidden_dim, cfg.n_registers
        self.n_tokens, self.d_in = n_tokens, d_in
        flat = n_tokens * d_in  # d_in: the width of a token as the read sees it (after its token PCA, if any)
        self.code_width = code_width or flat
        self.register_buffer("weight", torch.zeros(r, d, self.code_width))  # (R, d, K), set by fit_decoder
        self.register_buffer("bias", torch.zeros(self.code_width))  # (K,)
        # Inverse of the read: flat ≈ mean + (code @ basisᵀ) · scale (set with the read basis; see fit_read_basis).
        self.register_buffer("decode_mean", torch.zeros(flat))  # (F,) per-position mean of the training rows
        self.register_buffer("decode_scale", torch.ones(flat))  # (F,)

    def code(self, registers: Tensor) -> Tensor:
        """registers (B, R, d) → the K-wide code (B, K) of the reconstruction: Σ_i registers[:, i] @ weight[i]."""
        return torch.einsum("brd,rdk->bk", registers, self.weight.to(registers.dtype)) + self.bias  # (B, K)

    def unread(self, code: Tensor, read_basis: Tensor | None) -> Tensor:
        """A code (B, K) → the flattened input (B, T, D) it stands for: mean + (code @ basisᵀ) · scale (D: a token
        as the read sees it; the register module maps it back through its token PCA)."""
        if read_basis is not None:
            code = self.decode_mean + (code @ read_basis.to(code.dtype).T) * self.decode_scale  # (B, F)
        return code.view(len(code), self.n_tokens, self.d_in)  # (B, T, D_in)


@torch.no_grad()
def fit_coarse_to_fine(registers: Tensor, codes: Tensor, val_fraction: float = 0.2,
                       seed: int = 0) -> tuple[Tensor, Tensor, Tensor, list[float]]:
    """Per-register linear maps from ``registers`` (N, R, d) to ``codes`` (N, K), fitted in register order.

    Register i's map is the ridge regression, on a seeded fit part of the rows, of what registers 0..i-1 leave
    unexplained, with the penalty chosen on the validation part; a register whose map would not lower the
    validation residual gets none. So each prefix decodes to the sum of its registers' contributions, and a
    longer prefix explains at least as much of rows it was not fitted on. Contributions are centred on each
    register's mean state, so a register replaced by that mean (a masked one) adds nothing.

    Returns the maps (R, d, K), the bias (K,), the registers' mean states (R, d) and the validation residual's
    share of the codes' energy after each register (1 − R² per prefix, on held-out rows).
    """
    regs, z = registers.double(), codes.double()
    n = len(regs)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    val, fit = perm[:n_val], perm[n_val:]
    mean, z_mean = regs[fit].mean(0), z[fit].mean(0)  # (R, d), (K,)
    resid = z - z_mean  # (N, K)
    energy = resid[val].pow(2).sum().clamp_min(1e-12)
    weight = torch.zeros(regs.shape[1], regs.shape[2], z.shape[1], dtype=torch.float64)  # (R, d, K)
    left = []
    for i in range(regs.shape[1]):
        x = regs[:, i] - mean[i]  # (N, d)
        evals, vecs = torch.linalg.eigh(x[fit].T @ x[fit])  # (d,), (d, d)
        proj = vecs.T @ (x[fit].T @ resid[fit])  # (d, K)
        scale = evals.clamp_min(0).mean().clamp_min(1e-12)
        best = resid[val].pow(2).sum()  # no map at all
        for ridge in RIDGES:
            w = vecs @ (proj / (evals.clamp_min(0) + ridge * scale).unsqueeze(1))  # (d, K)
            err = (resid[val] - x[val] @ w).pow(2).sum()
            if err < best:
                best, weight[i] = err, w
        resid = resid - x @ weight[i]
        left.append(float(resid[val].pow(2).sum() / energy))
    bias = z_mean - torch.einsum("rd,rdk->k", mean, weight)
    return weight, bias, mean, left
