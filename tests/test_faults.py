"""Issue 13, one test per item: nothing lost, nothing mixed, nothing read from outside, and every failure a user
can cause is one `error:` line with exit status 2 and the store or run left as it was.

Everything runs on a 16-pair synthetic set (16 px images, two shards) and the tiny random-init encoders.
"""

from __future__ import annotations

import argparse
import builtins
import csv
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from conftest import one_line_error
from PIL import Image

from regtok.cli import main
from regtok.errors import RegtokError
from regtok.pipeline.data.shards import write_shard
from regtok.pipeline.data.synth import synthesize
from regtok.pipeline.extract.stage import ExtractConfig, run_extract
from regtok.pipeline.extract.store import open_store
from regtok.pipeline.manifests.manifest import sha256_file, write_json_atomic

ENCODERS = ["--encoder", "vision=tiny:0", "--encoder", "tactile=tiny:1"]
TRAIN = ["--preset", "tiny", "--epochs", "2", "--batch-size", "8", "--val-fraction", "0.25", "--device", "cpu",
         "model.n_layers=1", "model.read_dim=8"]


def regtok(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def extract_cli(shards: str | Path, out: Path, *extra: str) -> Result:
    return regtok("extract", "--shards", shards, "--out", out, *ENCODERS, "--workers", "0", "--device", "cpu",
                  "--batch-size", "8", *extra)


def extract(shards: str | Path, out: Path) -> tuple[Path, dict]:
    cfg = ExtractConfig(shards=str(shards), out=str(out), encoders=(("vision", "tiny:0"), ("tactile", "tiny:1")),
                        batch_size=8, workers=0, device="cpu")
    return run_extract(cfg, command=["regtok", "extract"], show_progress=False)


def rerecord_parts(store: Path) -> None:
    """After a test edits a part on purpose, record its new size and hash (so only the edit itself is caught)."""
    m = json.loads((store / "manifest.json").read_text())
    for rec in m["parts"]:
        p = store / rec["path"]
        rec["bytes"], rec["sha256"] = p.stat().st_size, sha256_file(p)
    write_json_atomic(store / "manifest.json", m)


def png16(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    synthesize(root / "shards", samples=16, shards=2, seed=0, image_size=16)
    synthesize(root / "other" / "shards", samples=16, shards=2, seed=7, image_size=16)  # same shard names
    extract(root / "shards" / "dataset.json", root / "store")
    return root


@pytest.fixture
def store(data, tmp_path) -> Path:
    """A private copy of the extracted store (the index's virtual sources are relative, so a copy works)."""
    out = tmp_path / "store"
    shutil.copytree(data / "store", out)
    return out


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    result = regtok("train", "--features", data / "store", "--out", out, *TRAIN)
    assert result.exit_code == 0, (result.output, result.exception)
    return out


# ── 1. a missing part is an error, not rows of zeros ────────────────────────────────────────────────


def test_1_missing_or_changed_part_fails_store_open(store):
    (store / "parts" / "shard-000001.h5").unlink()
    with pytest.raises(RegtokError, match=r"parts/shard-000001.h5 is missing.*regtok extract"):
        open_store(store)
    one_line_error(regtok("train", "--features", store, "--out", store.parent / "run", *TRAIN))
    shutil.copy(store / "parts" / "shard-000000.h5", store / "parts" / "shard-000001.h5")  # the wrong bytes
    with pytest.raises(RegtokError, match="shard-000001.h5 has changed"):
        open_store(store)


# ── 2. a part made from another input is redone ────────────────────────────────────────────────────


def test_2_stale_parts_of_another_dataset_are_redone_and_said(data, store):
    old = open_store(store).read("pooled", "vision")
    result = extract_cli(data / "other" / "shards" / "dataset.json", store)
    assert result.exit_code == 0, result.output
    assert "shard-000000" in result.stderr and "another input" in result.stderr
    m = json.loads((store / "manifest.json").read_text())
    assert m["timings"]["shards_encoded"] == 2
    assert {r["path"] for r in m["inputs"] if r["role"] == "shard"} == {
        str(data / "other" / "shards" / f"shard-00000{i}.tar") for i in range(2)}
    new = open_store(store).read("pooled", "vision")
    assert not np.array_equal(old, new)
    fresh = extract(data / "other" / "shards" / "dataset.json", store.parent / "fresh")[0]
    np.testing.assert_array_equal(new, open_store(fresh).read("pooled", "vision"))


# ── 3. --out is never clobbered without --overwrite ────────────────────────────────────────────────


def test_3_out_holding_something_else_is_refused_without_overwrite(data, tmp_path):
    own = tmp_path / "own"
    assert regtok("synth", own, "--samples", "4", "--shards", "2", "--image-size", "16").exit_code == 0
    (own / "shard-000007.tar").write_bytes(b"someone else's")  # a stray shard the manifest does not list
    assert "shard-000007.tar" in one_line_error(regtok("synth", own, "--samples", "4", "--image-size", "16"))
    assert (own / "shard-000007.tar").read_bytes() == b"someone else's"
    assert regtok("synth", own, "--samples", "4", "--image-size", "16", "--overwrite").exit_code == 0

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "dataset.json").write_text('{"mine": true}')
    assert "dataset.json" in one_line_error(regtok("synth", foreign, "--samples", "4", "--image-size", "16"))
    assert (foreign / "dataset.json").read_text() == '{"mine": true}'

    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "features.h5").write_bytes(b"precious")
    assert "features.h5" in one_line_error(extract_cli(data / "shards" / "dataset.json", unrelated))
    assert (unrelated / "features.h5").read_bytes() == b"precious"

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "rows.csv").write_text("url,tactile\na.png,a.png\n")
    packed = regtok("pack", tmp_path / "rows.csv", "--root", tmp_path, "--out", own)  # a synth folder
    assert "--overwrite" in one_line_error(packed)
    assert regtok("pack", tmp_path / "rows.csv", "--root", tmp_path, "--out", tmp_path / "p").exit_code == 0
    assert regtok("pack", tmp_path / "rows.csv", "--root", tmp_path, "--out", tmp_path / "p").exit_code == 0


# ── 4. duplicate keys across shards ────────────────────────────────────────────────────────────────


def test_4_duplicate_keys_across_shards_fail_with_a_clear_error(data, tmp_path):
    from regtok.pipeline.data.shards import iter_shard

    samples = [(s.key, list(s.files.items())) for s in iter_shard(data / "shards" / "shard-000000.tar")]
    write_shard(tmp_path / "in" / "a.tar", samples)
    write_shard(tmp_path / "in" / "b.tar", samples[:3])  # the same keys again
    message = one_line_error(extract_cli(tmp_path / "in", tmp_path / "st"))
    assert f"duplicate sample key {samples[0][0]!r}" in message and "a.h5" in message and "b.h5" in message
    assert not (tmp_path / "st" / "manifest.json").exists()


# ── 5. 16-bit PNGs ─────────────────────────────────────────────────────────────────────────────────


def test_5_sixteen_bit_png_is_scaled_to_eight_bits():
    from regtok.pipeline.encoders.images import decode_image

    values = np.linspace(7453, 37008, 64).reshape(8, 8)
    img = np.asarray(decode_image(png16(values)))
    assert img.shape == (8, 8, 3)
    np.testing.assert_allclose(img[..., 0], values / 257, atol=1)
    assert img.min() >= 28 and img.max() <= 145


# ── 6. epochs <= 0 ──────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("how", [["--epochs", "0"], ["epochs=-3"]])
def test_6_zero_or_negative_epochs_are_refused(data, tmp_path, how):
    assert "epochs" in one_line_error(regtok("train", "--features", data / "store", "--out", tmp_path / "r",
                                             *TRAIN, *how))
    assert not (tmp_path / "r").exists()


# ── 7. rerun's guard covers the shards a dataset manifest names, after symlinks ─────────────────────


@pytest.mark.parametrize("how", ["symlink", "absolute"])
def test_7_rerun_guard_checks_shards_from_the_dataset_manifest(data, tmp_path, how):
    exp = tmp_path / "exp"
    (exp / "data").mkdir(parents=True)
    outside = tmp_path / "outside"
    shutil.copytree(data / "shards", outside)
    m = json.loads((outside / "dataset.json").read_text())
    for s in m["shards"]:
        if how == "symlink":
            (exp / "data" / s["path"]).symlink_to(outside / s["path"])
        else:
            s["path"] = str(outside / s["path"])
    write_json_atomic(exp / "data" / "dataset.json", m)
    extract(exp / "data" / "dataset.json", exp / "store")
    message = one_line_error(regtok("rerun", exp / "store" / "manifest.json", "--out", tmp_path / "again",
                                    "--root", exp))
    assert "outside the manifest's tree" in message and "shard-00000" in message
    assert not (tmp_path / "again" / "parts").exists()


# ── 8. pack reads nothing outside --root ────────────────────────────────────────────────────────────


def test_8_pack_skips_images_outside_root_unless_allowed(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    for where, name in ((root, "in.png"), (root, "in2.png"), (root, "in3.png"), (outside, "secret.png")):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(where / name)
    (root / "link.png").symlink_to(outside / "secret.png")
    with open(tmp_path / "rows.csv", "w", newline="") as f:  # three pairs with secret.png (never one pair twice)
        w = csv.writer(f)
        w.writerows([["url", "tactile"], ["in.png", "in.png"], ["../outside/secret.png", "in.png"],
                     [str(outside / "secret.png"), "in2.png"], ["link.png", "in3.png"]])
    result = regtok("pack", tmp_path / "rows.csv", "--root", root, "--out", tmp_path / "p")
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "p" / "dataset.json").read_text())
    assert m["samples"] == 1 and [s["row"] for s in m["skipped"]] == [2, 3, 4]
    assert all("outside --root" in s["reason"] for s in m["skipped"])
    result = regtok("pack", tmp_path / "rows.csv", "--root", root, "--out", tmp_path / "q", "--allow-outside-root")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "q" / "dataset.json").read_text())["samples"] == 4


# ── 9. scientific notation ──────────────────────────────────────────────────────────────────────────


def test_9_scientific_notation_floats_are_accepted_everywhere(tmp_path):
    from regtok.config import TrainConfig, resolve
    from regtok.pipeline.runtime.config_io import load_yaml, parse_overrides

    (tmp_path / "c.yaml").write_text("lr: 5e-4\nweight_decay: 1E3\nmodel:\n  flow_weight: 2e-1\n")
    cfg = resolve(TrainConfig, None, load_yaml(str(tmp_path / "c.yaml")), parse_overrides(["min_lr_ratio=1e-3"]))
    assert (cfg.lr, cfg.weight_decay, cfg.model.flow_weight, cfg.min_lr_ratio) == (5e-4, 1e3, 0.2, 1e-3)
    with pytest.raises(RegtokError, match="must be float"):
        resolve(TrainConfig, None, parse_overrides(["lr=fast"]))
    with pytest.raises(RegtokError, match="must be int"):
        resolve(TrainConfig, None, parse_overrides(["epochs=1e3"]))  # an int key stays an int


# ── 10. tracebacks become one line, and nothing is left half-written ─────────────────────────────────


def test_10_disk_full_during_extract_leaves_no_partial_part(data, tmp_path, monkeypatch):
    """The disk fills once the first part is written: one line, that part kept, no partial second part; the same
    command resumes once there is room. (On a real full tmpfs h5py segfaulted when HDF5 met ENOSPC itself.)"""
    out, real = tmp_path / "st", os.statvfs

    def statvfs(path):
        st = real(path)
        if (out / "parts" / "shard-000000.h5").exists():
            return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 0, 0, *st[5:]))
        return st

    monkeypatch.setattr(os, "statvfs", statvfs)
    message = one_line_error(extract_cli(data / "shards" / "dataset.json", out))
    assert "No space left on device" in message
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["shard-000000.h5", "shard-000000.json"]
    monkeypatch.setattr(os, "statvfs", real)
    result = extract_cli(data / "shards" / "dataset.json", out)
    assert result.exit_code == 0 and "1 of 2 shard(s) already have a finished part" in result.stderr, result.output


@pytest.mark.parametrize("command", ["synth", "extract", "train"])
def test_10_read_only_out_is_one_line(data, tmp_path, monkeypatch, command):
    out = tmp_path / "ro"
    real_open, real_mkdir = builtins.open, os.mkdir

    def refuse(path) -> None:
        if str(path).startswith(str(out)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))

    def ro_open(path, mode="r", *a, **kw):
        if any(c in mode for c in "wax+"):
            refuse(path)
        return real_open(path, mode, *a, **kw)

    def ro_mkdir(path, *a, **kw):
        refuse(path)
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", ro_open)
    monkeypatch.setattr(os, "mkdir", ro_mkdir)
    args = {"synth": ["synth", out, "--samples", "4", "--image-size", "16"],
            "extract": ["extract", "--shards", data / "shards" / "dataset.json", "--out", out, *ENCODERS,
                        "--workers", "0", "--device", "cpu"],
            "train": ["train", "--features", data / "store", "--out", out, *TRAIN]}[command]
    assert "Read-only file system" in one_line_error(regtok(*args))


def test_10_brace_typo_is_one_line(data):
    message = one_line_error(extract_cli(str(data / "shards" / "shard-{000000..000001.tar"), data / "never"))
    assert "brace" in message
    assert not (data / "never").exists()


def test_10_rerun_of_a_manifest_copied_away_checks_outputs_before_any_work(data, tmp_path, monkeypatch):
    from regtok.pipeline import extract as extract_stage

    def never(*a, **kw):
        raise AssertionError("the stage ran")

    monkeypatch.setattr(extract_stage, "run_extract", never)
    (tmp_path / "copy").mkdir()
    shutil.copy(data / "store" / "manifest.json", tmp_path / "copy" / "manifest.json")
    message = one_line_error(regtok("rerun", tmp_path / "copy" / "manifest.json", "--out", tmp_path / "again",
                                    "--allow-outside"))
    assert "features.h5" in message and "missing" in message


@pytest.mark.parametrize("damage", ["truncated", "pickled"])
def test_10_truncated_or_pickled_state_on_resume_is_one_line(run, tmp_path, damage):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    state = copy / "state.pt"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[:100])
    else:
        torch.save({"step": 4, "args": argparse.Namespace(lr=1)}, state)
    before = sha256_file(copy / "checkpoint.safetensors")
    features = json.loads((run / "manifest.json").read_text())["inputs"][0]["path"]
    message = one_line_error(regtok("train", "--features", (run / features).parent, "--out", copy, "--resume",
                                    *TRAIN))
    assert "state.pt" in message
    assert sha256_file(copy / "checkpoint.safetensors") == before


def test_10_non_safetensors_checkpoint_is_one_line(data, run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for name in ("checkpoint.safetensors", "best.safetensors"):
        (copy / name).write_bytes(b"PK\x03\x04 a zip, not safetensors")
    message = one_line_error(regtok("eval", "--run", copy, "--features", data / "store", "--out", tmp_path / "e",
                                    "--no-baselines", "--prefixes", "1,2"))
    assert "safetensors" in message


@pytest.mark.parametrize("value", ["many", 3.5, None, [16]])
def test_10_manifest_samples_of_the_wrong_type(store, value):
    m = json.loads((store / "manifest.json").read_text())
    m["samples"] = value
    write_json_atomic(store / "manifest.json", m)
    with pytest.raises(RegtokError, match="samples"):
        open_store(store)


def test_10_missing_modality_group_in_the_index(store, tmp_path):
    with h5py.File(store / "features.h5", "r+") as f:
        del f["tactile"]
    with pytest.raises(RegtokError, match="tactile"):
        open_store(store)
    one_line_error(regtok("train", "--features", store, "--out", tmp_path / "r", *TRAIN))


# ── 11. messages that mislead ────────────────────────────────────────────────────────────────────────


def test_11_empty_tar_says_the_shard_holds_no_samples(tmp_path):
    write_shard(tmp_path / "in" / "empty.tar", [])
    message = one_line_error(extract_cli(tmp_path / "in", tmp_path / "st"))
    assert "holds no samples" in message and "empty" in message


def test_11_string_modalities_in_a_manifest(store):
    m = json.loads((store / "manifest.json").read_text())
    m["modalities"] = "visiontactile"
    write_json_atomic(store / "manifest.json", m)
    with pytest.raises(RegtokError, match="modalities.*list"):
        open_store(store)


def test_11_show_exits_nonzero_on_an_unreadable_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    assert "not valid JSON" in one_line_error(regtok("show", tmp_path / "manifest.json"))


def test_11_nan_in_the_store_is_named_by_modality_and_row(store, tmp_path):
    with h5py.File(store / "parts" / "shard-000001.h5", "r+") as f:
        f["tactile/pooled"][2, 5] = np.nan
    rerecord_parts(store)
    rows = open_store(store).manifest["parts"][0]["samples"]
    with pytest.raises(RegtokError, match=f"tactile pooled features.* row {rows + 2}"):
        open_store(store).read("pooled", "tactile")
    assert open_store(store).read("pooled", "tactile", np.arange(rows)).shape[0] == rows  # clean rows read
    message = one_line_error(regtok("train", "--features", store, "--out", tmp_path / "r", *TRAIN))
    assert "tactile" in message and f"row {rows + 2}" in message


@pytest.mark.parametrize("args", [["extract", "--shards", "x", "--out", "y", "--encoder", "vision=tiny",
                                   "--batch-size", "0"], ["train", "--features", ".", "--out", "r", "--epochs", "x"],
                                  ["eval", "--run"], ["synth"]])
def test_11_click_usage_errors_are_one_error_line(args):
    message = one_line_error(regtok(*args))
    assert message[len("error: "):][0].islower()


# ── 12. one extract per --out at a time ──────────────────────────────────────────────────────────────


def test_12_a_second_extract_into_the_same_out_stops(data, tmp_path):
    from regtok.pipeline.manifests.outdir import LOCK_NAME

    out = tmp_path / "st"
    out.mkdir()
    hold = (f"import fcntl, sys, time\nf = open({str(out / LOCK_NAME)!r}, 'a+')\n"
            "fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)\nf.write('12345\\n'); f.flush()\n"
            "print('held', flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        message = one_line_error(extract_cli(data / "shards" / "dataset.json", out))
    finally:
        holder.kill()
        holder.wait()
    assert "another regtok extract" in message and "12345" in message
    assert not (out / "parts").exists()
    assert extract_cli(data / "shards" / "dataset.json", out).exit_code == 0  # the lock went with its holder


# ── 13. plain progress lines when stderr is not a terminal ───────────────────────────────────────────


def test_13_plain_progress_lines_without_a_terminal(data, tmp_path):
    result = regtok("train", "--features", data / "store", "--out", tmp_path / "r", *TRAIN)
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("epoch ")]
    assert [ln.split()[1] for ln in lines] == ["1/2", "2/2"], result.stderr
    metrics = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in metrics if r["type"] == "epoch"][-1]
    terms = [k for k in last if k not in ("type", "step", "epoch", "seconds", "samples_per_s") and "val" not in k]
    assert terms and all(f" {k} " in lines[-1] for k in terms), (terms, lines[-1])
    assert "val R@1" in lines[-1] and not any(ln.startswith("epoch") and "━" in ln for ln in result.stderr.splitlines())

    result = extract_cli(data / "shards" / "dataset.json", tmp_path / "st")
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("extract: ")]
    assert [ln.split()[1] for ln in lines] == ["1/2", "2/2"], result.stderr
    assert "samples" in lines[-1] and "━" not in result.stderr  # no cut-off bar


def test_1_a_part_the_index_reads_but_the_manifest_lacks_is_checked_too(store):
    """The index's own virtual sources are checked, not only the parts the manifest lists."""
    from regtok.pipeline.extract.store import open_store
    from regtok.pipeline.manifests.manifest import read_manifest, write_manifest

    m = read_manifest(store / "manifest.json")
    m["parts"] = m["parts"][:1]  # an edited manifest that no longer lists the second part
    write_manifest(store / "manifest.json", m)
    (store / "parts" / "shard-000001.h5").unlink()
    with pytest.raises(RegtokError, match="shard-000001.h5, which is missing"):
        open_store(store)
