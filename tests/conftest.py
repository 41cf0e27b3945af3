"""Shared test setup: CPU only, few threads, deterministic."""

from __future__ import annotations

import os

# Before torch is imported anywhere: the suite runs on 2 cores, and subprocesses inherit these.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    yield
