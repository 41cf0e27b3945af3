"""Device names and the one collective the losses need: an all_gather that carries gradients.

Nothing here detects distributed mode or reads the process group's state: the stage decides it once
(``pipeline.runtime.distributed``) and passes ``rank`` and ``world_size`` down, as open_clip's ``ClipLoss(rank=…,
world_size=…)``.

Why gather with autograd: a contrastive loss on rank r compares its local rows with every rank's columns.
With ``torch.distributed.nn.functional.all_gather`` the backward sums, onto each rank's own embeddings, the
gradients that every rank's loss sends them; DDP's gradient averaging then yields exactly the gradient of
the full-batch loss. A plain ``all_gather`` (no gradient through other ranks' columns) gives 1/world of it.
"""

from __future__ import annotations

import warnings

import torch
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
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RegtokError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def gather_with_grad(x: Tensor, world_size: int = 1) -> Tensor:
    """Concatenate ``x`` (B, ...) from the ``world_size`` ranks along dim 0, in rank order, differentiably.

    Every rank must pass the same shape. Returns ``x`` itself for one rank.
    """
    if world_size == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; still the exact public one
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(x.contiguous())
    return torch.cat(parts, dim=0)  # (W*B, ...)


def local_offset(batch: int, rank: int = 0) -> int:
    """Index of rank ``rank``'s first row in the gathered batch (equal local batch sizes)."""
    return rank * batch
