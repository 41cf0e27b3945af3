"""Scale-out: `torchrun --nproc_per_node=2` (gloo, CPU) splits the shards and equals a single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import arrays, extract, write_shards


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    write_shards(tmp_path / "in", [4, 2, 5, 3, 1])  # 5 shards: rank 0 takes 3, rank 1 takes 2
    spec = str(tmp_path / "in" / "shard-{000000..000004}.tar")
    extract(spec, tmp_path / "one", tokens=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "regtok",
           "extract", "--shards", spec, "--out", str(tmp_path / "two"), "--encoder", "vision=tiny:0",
           "--encoder", "tactile=tiny:1", "--tokens", "--workers", "1", "--batch-size", "4", "--device", "cpu"]
    env = {**os.environ, "REGTOK_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines() == [str(tmp_path / "two" / "manifest.json")]  # rank 0 only
    m = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert m["timings"]["ranks"] == 2 and m["timings"]["shards_encoded"] == 5
    one, two = arrays(tmp_path / "one"), arrays(tmp_path / "two")
    assert one.keys() == two.keys() and len(one["keys"]) == 15
    for name in one:
        np.testing.assert_array_equal(one[name], two[name], err_msg=name)
