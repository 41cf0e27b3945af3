"""Rectified-flow head: a velocity network v(x_t, t, direction), logit-normal times, an Euler sampler.

Directions: 0 = A→B (x_0 = shared_A, x_1 = shared_B), 1 = B→A. The path is x_t = (1−t)·x_0 + t·x_1 and the
target velocity x_1 − x_0 (see :func:`regtok.losses.flow_matching_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DIRECTIONS = ("a_to_b", "b_to_a")


def direction_index(direction: str) -> int:
    """0 for "a_to_b", 1 for "b_to_a"."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return DIRECTIONS.index(direction)


def timestep_features(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of t ∈ [0, 1]: (B,) → (B, dim) (dim even)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half)  # (half,)
    angles = 1000.0 * t[:, None] * freqs[None]  # (B, half); t scaled so low frequencies still vary over [0, 1]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)  # (B, dim)


@torch.compiler.disable  # generator draws do not trace
def logit_normal(
    n: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype,
    mean: float = 0.0, std: float = 1.0,
) -> Tensor:
    """n times t = sigmoid(N(mean, std²)) drawn from ``generator`` (on the generator's device), moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    z = torch.randn(n, generator=generator, device=gen_device, dtype=dtype)  # (n,)
    return torch.sigmoid(mean + std * z).to(device)


class _ResidualMlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.fc2(F.silu(self.fc1(self.norm(h))))


class VelocityNet(nn.Module):
    """v(x_t, t, direction): (B, E), (B,), (B,) long → (B, E). A residual MLP with t and direction embeddings."""

    def __init__(self, embed_dim: int, hidden_dim: int, n_layers: int, time_dim: int = 64) -> None:
        super().__init__()
        self.time_dim = time_dim
        self.inp = nn.Linear(embed_dim, hidden_dim)
        self.time = nn.Sequential(nn.Linear(time_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        self.direction = nn.Embedding(len(DIRECTIONS), hidden_dim)
        self.layers = nn.ModuleList(_ResidualMlp(hidden_dim) for _ in range(n_layers))
        self.norm = nn.LayerNorm(hidden_dim)
        self.out = nn.Linear(hidden_dim, embed_dim)
        with torch.no_grad():  # start near v = 0: the initial loss is |x_1 − x_0|², not the net's noise over E dims
            self.out.weight.mul_(0.1)
            self.out.bias.zero_()

    def forward(self, x: Tensor, t: Tensor, direction: Tensor) -> Tensor:
        temb = self.time(timestep_features(t, self.time_dim).to(x.dtype))  # (B, H)
        h = self.inp(x) + temb + self.direction(direction)  # (B, H)
        for layer in self.layers:
            h = layer(h)  # (B, H)
        return self.out(F.silu(self.norm(h)))  # (B, E)


Velocity = Callable[[Tensor, Tensor, Tensor], Tensor]


def euler_sample(velocity: Velocity, x0: Tensor, direction: int, steps: int) -> Tensor:
    """Integrate dx/dt = velocity(x, t, direction) from t=0 to 1 in ``steps`` Euler steps. (B, E) → (B, E)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = x0
    b = x0.shape[0]
    d = torch.full((b,), direction, dtype=torch.long, device=x0.device)  # (B,)
    dt = 1.0 / steps
    for i in range(steps):
        t = torch.full((b,), i * dt, dtype=x0.dtype, device=x0.device)  # (B,)
        x = x + dt * velocity(x, t, d)  # (B, E)
    return x
