"""Transformer building blocks: pre-norm self-attention with a boolean mask, cross-attention and MLP.

All attention goes through ``torch.nn.functional.scaled_dot_product_attention``; shapes are static so the
blocks compile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def prefix_causal_mask(n_tokens: int, n_registers: int, device: torch.device | None = None,
                       blind: int = 0) -> Tensor:
    """Boolean attention mask (True = may attend) over the sequence ``[tokens; registers]``.

    Feature tokens attend to feature tokens only; register i attends to every feature token and to
    registers 0..i, except the first ``blind`` registers, which see no feature token (only registers 0..i: what
    they hold comes through their own reads). The mask for (T, k) is the top-left (T+k)² block of the mask for
    (T, R ≥ k).
    """
    n = n_tokens + n_registers
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)  # (L, L)
    mask[:n_tokens, :n_tokens] = True
    mask[n_tokens + blind:, :n_tokens] = True
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
