"""Issue 20, second half: malformed values, damaged metrics, locks, paths that resolve from anywhere, and the
smaller points. One test per finding (the number is the issue's); each failed on the code before the fix.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, cli_ok, one_line_error, regtok_cli, write_store
from PIL import Image


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("faults3") / "store", n=100, dim=12)


@pytest.fixture(scope="module")
def finished_run(store) -> Path:
    out = store.parent / "run"
    cli_ok(regtok_cli("train", "--features", store, "--out", out, *TINY, "--epochs", "1"))
    return out


# ── 14. malformed values are one line, before any work ───────────────────────────────────────────────


@pytest.mark.parametrize("override", ["lr=[1", "lr={", "lr=*alias", "model.n_layers=!!int x"])
def test_14_malformed_overrides_are_one_line(store, tmp_path, override):
    message = one_line_error(regtok_cli("train", "--print-config", override))
    assert override.split("=")[0] in message
    grid = one_line_error(regtok_cli("sweep", "--features", store, "--out", tmp_path / "s", "--grid", override))
    assert override.split("=")[0] in grid and not (tmp_path / "s").exists()


@pytest.mark.parametrize("args, key", [
    (["--lr", "-1"], "lr"), (["--lr", "nan"], "lr"), (["--val-fraction", "1.5"], "val_fraction"),
    (["--val-fraction", "-0.5"], "val_fraction"), (["model.hidden_dim=0"], "hidden_dim"),
    (["weight_decay=-1"], "weight_decay"), (["warmup_steps=-10"], "warmup_steps"),
])
def test_14_impossible_config_values_are_refused(args, key):
    assert key in one_line_error(regtok_cli("train", "--print-config", *args))


def test_14_a_val_fraction_that_leaves_too_few_training_rows_is_one_line(store, tmp_path):
    message = one_line_error(regtok_cli("train", "--features", store, "--out", tmp_path / "r", *TINY,
                                        "--val-fraction", "0.999"))
    assert "val_fraction" in message and "training rows" in message
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("text, needle", [("lr: 1.0e-3\nepochs: 2\nlr: 1.0e-4\n", "lr"),
                                          ("model:\n  n_layers: !!int x\n", "n_layers")])
def test_14_18_duplicate_keys_and_bad_tags_in_a_config_file_are_one_line(tmp_path, text, needle):
    (tmp_path / "c.yaml").write_text(text)
    message = one_line_error(regtok_cli("train", "--print-config", "--config", tmp_path / "c.yaml"))
    assert "c.yaml" in message and needle in message


# ── 15. damaged metrics.jsonl: compare warns and goes on, resume drops a truncated last line ────────────


@pytest.mark.parametrize("damage", [b'{"type": "epoch", "ep', b"garbage", b"[1, 2]", b"\xff\xfe\x00\x01",
                                    b'{"type": "epoch", "epoch": 3, "val_r1_full_a_to_b": "high"}'])
def test_15_compare_warns_about_a_damaged_metrics_line_and_goes_on(finished_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    lines = (run / "metrics.jsonl").read_bytes().splitlines()
    (run / "metrics.jsonl").write_bytes(b"\n".join([*lines[:2], damage, *lines[2:]]) + b"\n")
    result = regtok_cli("compare", run, finished_run)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "metrics.jsonl line 3" in result.stderr and "val/R@1" in result.stdout


def test_15_resume_drops_a_truncated_last_metrics_line(finished_run, store, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"type": "step", "step": 99, "lo')
    result = cli_ok(regtok_cli("train", "--features", store, "--out", run, "--resume", *TINY, "--epochs", "1"))
    assert "truncated" in result.stderr
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


# ── 19. the extract lock goes with its holder, not with the holder's forked children ──────────────────


def test_19_a_forked_child_of_a_killed_extract_does_not_keep_its_lock(tmp_path):
    from regtok.pipeline.manifests.outdir import DirLock

    script = f"""
import os, sys, time
from pathlib import Path
from regtok.pipeline.manifests.outdir import DirLock
lock = DirLock(Path({str(tmp_path)!r}))
child = os.fork()
if child == 0:  # a DataLoader worker: it inherits every descriptor and outlives its parent for a while
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1)
    os.dup2(null, 2)
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), 9)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    child = int(proc.stdout.split()[0])
    try:
        os.kill(child, 0)  # the child still lives
        DirLock(tmp_path).release()
    finally:
        os.kill(child, signal.SIGKILL)


# ── 20. a pack's --labels-from resolves from any working directory ────────────────────────────────────


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_20_rerun_of_a_pack_with_a_relative_labels_from_works_from_elsewhere(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for i, color in enumerate([(10, 20, 30), (200, 10, 10), (0, 200, 0)]):
        Image.new("RGB", (8, 8), color).save(data / f"{i}.png")
    write_csv(data / "train.csv", [["url", "tactile", "material"], ["0.png", "1.png", "wood"], ["1.png", "2.png",
                                                                                               "felt"]])
    write_csv(data / "test.csv", [["url", "tactile", "material"], ["2.png", "0.png", "felt"]])
    monkeypatch.chdir(tmp_path)
    cli_ok(regtok_cli("pack", "data/train.csv", "--root", "data", "--out", "train", "--label-col", "material"))
    cli_ok(regtok_cli("pack", "data/test.csv", "--root", "data", "--out", "test", "--labels-from",
                      "train/dataset.json"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cli_ok(regtok_cli("rerun", tmp_path / "test" / "dataset.json", "--out", tmp_path / "again", "--root", tmp_path))


# ── 21. smaller points ────────────────────────────────────────────────────────────────────────────────


def test_21_compare_on_an_unfinished_run_says_so(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "manifest.json").unlink()
    message = one_line_error(regtok_cli("compare", run))
    assert "has not finished" in message and "--resume" in message


def test_21_pack_skips_images_extract_cannot_read_and_duplicate_rows(tmp_path):
    for name, fmt in (("a.png", "PNG"), ("b.png", "PNG"), ("c.gif", "GIF"), ("d.tif", "TIFF")):
        Image.new("RGB", (8, 8), (len(name), 40, 90)).save(tmp_path / name, format=fmt)
    write_csv(tmp_path / "rows.csv", [["url", "tactile"], ["a.png", "b.png"], ["c.gif", "b.png"], ["a.png", "d.tif"],
                                      ["a.png", "b.png"], ["b.png", "a.png"]])
    cli_ok(regtok_cli("pack", tmp_path / "rows.csv", "--out", tmp_path / "p"))
    m = json.loads((tmp_path / "p" / "dataset.json").read_text())
    assert m["samples"] == 2
    reasons = {s["row"]: s["reason"] for s in m["skipped"]}
    assert ".gif" in reasons[2] and ".tif" in reasons[3] and "duplicate of row 1" in reasons[4]

    write_csv(tmp_path / "twice.csv", [["url", "tactile", "url"], ["a.png", "b.png", "b.png"]])
    message = one_line_error(regtok_cli("pack", tmp_path / "twice.csv", "--out", tmp_path / "q"))
    assert "url" in message and "twice" in message
    assert not (tmp_path / "q").exists()
