"""torch.distributed helpers: rank/world queries and an all_gather that carries gradients.

Why gather with autograd: a contrastive loss on rank r compares its local rows with every rank's columns.
With ``torch.distributed.nn.functional.all_gather`` the backward sums, onto each rank's own embeddings, the
gradients that every rank's loss sends them; DDP's gradient averaging then yields exactly the gradient of
the full-batch loss. A plain ``all_gather`` (no gradient through other ranks' columns) gives 1/world of it.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor

from regtok.errors import RegtokError


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; a named device is checked (a user error when CUDA is absent)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RegtokError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RegtokError(f"device {name!r} requested but CUDA is not available here")
    return device


def is_distributed() -> bool:
    """True when a process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (B, ...) from every rank along dim 0, in rank order, differentiably.

    Every rank must pass the same shape. Returns ``x`` itself when not distributed.
    """
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; still the exact public one
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(x.contiguous())
    return torch.cat(parts, dim=0)  # (W*B, ...)


def local_offset(batch: int) -> int:
    """Index of this rank's first row in the gathered batch (equal local batch sizes)."""
    return rank() * batch
