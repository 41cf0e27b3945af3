"""Shared test setup: CPU only, few threads, deterministic."""

from __future__ import annotations

import os

# Before torch is imported anywhere: the suite runs on 2 cores and starts multi-process tests; subprocesses
# inherit these. OpenMP spin-waiting makes oversubscribed threads catastrophically slow (measured: a tiny
# train step 0.02 s with 1 thread, 3.5 s with 2 threads while another process kept both cores busy).
os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 threads on 2 busy cores thrash (100x slower)
os.environ.setdefault("MKL_NUM_THREADS", "1")
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
