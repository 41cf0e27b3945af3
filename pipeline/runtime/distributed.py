"""Where this process runs: its torchrun rank, the process group, and the memory a stage may fill.

Distributed mode is decided here, once, at the top of a stage (nanoGPT's ``ddp = int(os.environ.get("RANK", -1))
!= -1``); the stage then passes ``rank`` and ``world_size`` down, and nothing in ``regtok/`` reads the process
group's state or starts one.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from regtok.distributed import resolve_device


def launched() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) that ``torchrun`` gave this process; (0, 1, 0) when it did not start it."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if not ddp:
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    """True on rank 0 (and when not launched by ``torchrun``): the process that writes files and prints."""
    return launched()[0] == 0


def join_process_group(device: torch.device) -> None:
    """Join the torchrun ranks' process group (NCCL on CUDA, gloo on CPU) with ``device`` as this rank's GPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def leave_process_group(world_size: int) -> None:
    """Tear down the process group a multi-rank stage joined (nothing for one rank)."""
    if world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) for a training process; with more than one rank, joins the process group and
    puts a CUDA device on this rank's GPU (``LOCAL_RANK``)."""
    rank, world, local_rank = launched()
    device = resolve_device(device_name)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
    join_process_group(device)
    return rank, world, device


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device`` (GPU: free device memory; CPU: MemAvailable, else free physical pages)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget(device: torch.device, fraction: float) -> int:
    """Bytes an in-memory feature store may take on ``device``: ``fraction`` of its available memory."""
    return int(fraction * available_memory(device))
