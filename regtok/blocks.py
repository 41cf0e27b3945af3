"""Transformer building blocks: pre-norm self-attention with a boolean mask, cross-attention, MLP, and the
preservation decoder built from them.

All attention goes through ``torch.nn.functional.scaled_dot_product_attention``; shapes are static so the
blocks compile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regtok.config import ModelConfig


def prefix_causal_mask(n_tokens: int, n_registers: int, device: torch.device | None = None) -> Tensor:
    """Boolean attention mask (True = may attend) over the sequence ``[tokens; registers]``.

    Feature tokens attend to feature tokens only; register i attends to every feature token and to
    registers 0..i. The mask for (T, k) is the top-left (T+k)² block of the mask for (T, R ≥ k).
    """
    n = n_tokens + n_registers
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)  # (L, L)
    mask[:n_tokens, :n_tokens] = True
    mask[n_tokens:, :n_tokens] = True
    mask[n_tokens:, n_tokens:] = torch.ones(n_registers, n_registers, dtype=torch.bool, device=device).tril()
    return mask


class Mlp(nn.Module):
    """Two-layer GELU MLP."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head attention (self or cross) with optional QK-norm (LayerNorm over each head's q and k)."""

    def __init__(self, dim: int, n_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x: (B, Lq, d) queries; context: (B, Lk, d) keys/values (default x); mask: (Lq, Lk) bool."""
        context = x if context is None else context
        b, lq, d = x.shape
        lk = context.shape[1]
        q = self.q(x).view(b, lq, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, Lq, hd)
        k, v = self.kv(context).view(b, lk, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, Lk, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Lq, hd)
        return self.proj(out.transpose(1, 2).reshape(b, lq, d))  # (B, Lq, d)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float, qk_norm: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B, L, d); mask: (L, L) bool."""
        x = x + self.attn(self.norm1(x), mask=mask)  # (B, L, d)
        return x + self.mlp(self.norm2(x))


class CrossBlock(nn.Module):
    """Pre-norm cross-attention block: queries read a context set, then an MLP."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float, qk_norm: bool = False) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, q: Tensor, context: Tensor) -> Tensor:
        """q: (B, Lq, d); context: (B, Lk, d)."""
        q = q + self.attn(self.norm_q(q), context=self.norm_kv(context))  # (B, Lq, d)
        return q + self.mlp(self.norm2(q))


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
        flat = n_tokens * d_in
        self.code_width = code_width or flat
        self.register_buffer("weight", torch.zeros(r, d, self.code_width))  # (R, d, K), set by fit_decoder
        self.register_buffer("bias", torch.zeros(self.code_width))  # (K,)
        # Inverse of the read: flat ≈ mean + (code @ basisᵀ) · scale (set with the read basis; see fit_read_basis).
        self.register_buffer("decode_mean", torch.zeros(flat))  # (F,) per-position mean of the training rows
        self.register_buffer("decode_scale", torch.ones(flat))  # (F,)

    def code(self, registers: Tensor) -> Tensor:
        """registers (B, R, d) → the K-wide code (B, K) of the reconstruction: Σ_i registers[:, i] @ weight[i]."""
        return torch.einsum("brd,rdk->bk", registers, self.weight.to(registers.dtype)) + self.bias  # (B, K)

    def forward(self, registers: Tensor, read_basis: Tensor | None) -> Tensor:
        """registers: (B, R, d); read_basis: the module's (F, K) read basis, or None → (B, T, D_in)."""
        return self.unread(self.code(registers), read_basis)

    def unread(self, code: Tensor, read_basis: Tensor | None) -> Tensor:
        """A code (B, K) → the standardised input (B, T, D_in) it stands for: mean + (code @ basisᵀ) · scale."""
        if read_basis is not None:
            code = self.decode_mean + (code @ read_basis.to(code.dtype).T) * self.decode_scale  # (B, F)
        return code.view(len(code), self.n_tokens, self.d_in)  # (B, T, D_in)
