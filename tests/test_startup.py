"""Process set-up: the collector pause restores its state; malloc keeps freed blocks (checked in fresh processes)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest

from regtok.pipeline.runtime.startup import gc_paused, keep_freed_memory

# Frees and re-allocates blocks of a transformer forward's sizes (a few MiB to 24 MiB, several alive at once) and
# prints the minor page faults of the second pass: the first pass maps the memory in, the second should reuse it.
CHURN = """
import resource, sys
import numpy as np
from regtok.pipeline.runtime.startup import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "1" else None
def churn():
    for _ in range(10):
        live = [np.ones(n << 20, dtype=np.uint8) for n in (6, 24, 12, 24, 3, 18)]
        del live
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = 10 * (6 + 24 + 12 + 24 + 3 + 18) * 256  # 4 KiB pages the second pass touches


def churn_faults(apply: bool, **env: str) -> tuple[str, int]:
    res = subprocess.run([sys.executable, "-c", CHURN, "1" if apply else "0"], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True)
    applied, faults = res.stdout.split()
    return applied, int(faults)


def test_gc_paused_restores_the_previous_state():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # a caller that disabled the collector keeps it disabled
    finally:
        gc.enable()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_reuses_freed_blocks():
    applied, faults = churn_faults(apply=True)
    if applied != "True":
        pytest.skip("not glibc")
    assert faults < PAGES // 100, f"{faults} minor faults for {PAGES} pages reused"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_leaves_a_users_malloc_settings_alone(monkeypatch):
    assert churn_faults(apply=True, MALLOC_TRIM_THRESHOLD_="131072")[0] == "False"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert keep_freed_memory() is False
