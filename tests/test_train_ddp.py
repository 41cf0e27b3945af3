"""`regtok train` under torchrun: 2 CPU ranks (gloo) write one run that matches the single-process run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, write_store
from safetensors.torch import load_file

from regtok.cli import main
from regtok.pipeline.manifests.manifest import read_manifest

pytestmark = pytest.mark.slow

# No nested dropout and no flow noise: then the only difference between 1 and 2 ranks is float summation order.
EXACT = ["--loss", "contrastive", "model.nested_dropout_mode=none"]


def test_two_rank_ddp_matches_single_process(tmp_path):
    store = write_store(tmp_path / "store")
    args = ["train", "--features", str(store), *TINY, *EXACT]
    single = tmp_path / "single"
    result = CliRunner().invoke(main, [*args, "--out", str(single)])
    assert result.exit_code == 0, result.stderr

    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "regtok", *args, "--out", str(ddp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines() == [str(ddp / "manifest.json")]  # rank 0 alone prints

    m = read_manifest(ddp / "manifest.json", kind="run")
    assert m["world_size"] == 2 and m["metrics"]["step"] == read_manifest(single / "manifest.json")["metrics"]["step"]
    assert sorted(p.name for p in Path(ddp).iterdir() if not p.name.startswith(".")) == sorted(
        ["best.safetensors", "buffers.safetensors", "checkpoint.safetensors", "config.json", "curves.png",
         "manifest.json", "metrics.jsonl", "start.safetensors", "state.pt"])
    a, b = load_file(str(single / "checkpoint.safetensors")), load_file(str(ddp / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-4, msg=k)
