"""`regtok extract` end to end on shards the tests write: layout, values, bad input, resume, the store API."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import ENCODERS, arrays, extract, png, sample, write_feature_store, write_shards
from PIL import Image

from regtok.cli import main
from regtok.data import store_bytes
from regtok.errors import RegtokError
from regtok.pipeline.data.shards import write_shard
from regtok.pipeline.encoders.encoder import tiny_encoder
from regtok.pipeline.extract.stage import PAUSE_ENV, ExtractConfig, decode_workers, run_extract
from regtok.pipeline.extract.store import open_store
from regtok.pipeline.manifests.manifest import read_manifest, sha256_file


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_shards(root, [5, 3, 6])
    return root


@pytest.fixture(scope="module")
def store(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "st"
    extract(str(shards / "shard-{000000..000002}.tar"), out, tokens=True, workers=2)
    return out


def test_layout_shapes_dtypes_keys_labels(store, shards):
    m = json.loads((store / "manifest.json").read_text())
    assert m["kind"] == "features" and m["modalities"] == ["vision", "tactile"] and m["samples"] == 14
    assert m["feature_kinds"] == ["pooled", "tokens"] and m["skipped"] == []
    assert [p["samples"] for p in m["parts"]] == [5, 3, 6]
    for part in m["parts"]:
        assert sha256_file(store / part["path"]) == part["sha256"]
    assert [i["sha256"] for i in m["inputs"]] == [sha256_file(p) for p in sorted(shards.glob("*.tar"))]
    assert m["config"]["encoders"] == dict(ENCODERS) and m["timings"]["samples_per_s"] > 0
    a = arrays(store)
    assert a["vision/pooled"].dtype == np.float16 and a["vision/pooled"].shape == (14, 512)
    assert a["tactile/tokens"].shape == (14, 64, 64) and a["tactile/tokens"].dtype == np.float16
    assert [k.decode() for k in a["keys"]] == [f"s{i:05d}" for i in range(14)]
    assert np.array_equal(a["labels/material"], np.arange(14) % 3)
    np.testing.assert_allclose(a["labels/roughness"], np.arange(14) / 10)
    assert set(m["labels"]) == {"material", "roughness"}  # numeric fields only; "key"/"name" are strings
    with h5py.File(store / "parts" / "shard-000001.h5", "r") as f:
        assert f["vision/pooled"].shape == (3, 512) and f["vision/pooled"].chunks[0] == 3


def test_features_equal_the_encoder_on_the_images(store, shards):
    from regtok.pipeline.data.shards import iter_shard

    samples = [s for p in sorted(shards.glob("*.tar")) for s in iter_shard(p)]
    for modality, seed in (("vision", 0), ("tactile", 1)):
        enc = tiny_encoder(seed)
        x = torch.stack([enc.prep.to_uint8(s.files[f"{modality}.png"]) for s in samples])  # (14, 3, 64, 64)
        pooled, tokens = enc.encode(x, tokens=True)
        a = arrays(store)
        np.testing.assert_array_equal(a[f"{modality}/pooled"], pooled.half().numpy())
        np.testing.assert_array_equal(a[f"{modality}/tokens"], tokens.half().numpy())


def test_read_rows_in_several_ranges_equals_a_full_read(tmp_path):
    from regtok.pipeline.extract.store import _GAP, read_rows

    n = 4 * _GAP
    rng = np.random.default_rng(0)
    feats = {m: {"pooled": rng.normal(size=(n, 3)).astype(np.float16)} for m in ("vision", "tactile")}
    s = open_store(write_feature_store(tmp_path / "st", feats, {}, [f"k{j}" for j in range(n)], {}))
    full = s.read("pooled", "vision")
    rows = np.array([n - 2, 3, 2 * _GAP, 3, -1, _GAP + 7, 0, 2 * _GAP + 1])  # unsorted, repeated, negative, gaps
    np.testing.assert_array_equal(s.read("pooled", "vision", rows), full[rows])
    reads = []

    class Recording:  # the dataset, recording each read
        def __init__(self, ds):
            self.ds, self.shape, self.dtype = ds, ds.shape, ds.dtype

        def __getitem__(self, index):
            reads.append(index)
            return self.ds[index]

    with h5py.File(s.root / "features.h5", "r") as f:
        mask = np.zeros(n, dtype=bool)
        mask[rows] = True
        for index in (rows, mask):
            np.testing.assert_array_equal(read_rows(Recording(f["vision/pooled"]), index, n), full[index])
    # gaps over _GAP rows are seeked over, smaller ones read through: rows 0-3, 263-513 and 1022-1023
    assert reads == 2 * [slice(0, 4), slice(_GAP + 7, 2 * _GAP + 2), slice(n - 2, n)]


def test_feature_store_api(store):
    s = open_store(store / "manifest.json")
    a = arrays(store)
    assert s.n == 14 and s.modalities == ("vision", "tactile") and s.has("tokens") and s.has("pooled")
    assert s.keys() == [k.decode() for k in a["keys"]]
    assert s.shape("pooled", "vision") == (1, 512) and s.shape("tokens", "tactile") == (64, 64)
    np.testing.assert_array_equal(s.read("pooled", "vision"), a["vision/pooled"])
    rows = np.array([13, 0, 5, 5, 2])
    np.testing.assert_array_equal(s.read("tokens", "tactile", rows), a["tactile/tokens"][rows])
    np.testing.assert_array_equal(s.read("pooled", "tactile", slice(3, 9)), a["tactile/pooled"][3:9])
    np.testing.assert_array_equal(s.read("pooled", "tactile", slice(None, None, 3)), a["tactile/pooled"][::3])
    labels = s.labels()
    assert labels["material"].dtype == np.float64 and set(labels) == {"material", "roughness"}
    assert store_bytes(s, "pooled") == 14 * 512 * 2 * 2
    with pytest.raises(RegtokError):
        s.read("pooled", "audio")
    with pytest.raises(RegtokError, match="not a feature store"):
        open_store(store / "parts")


def test_any_names_and_three_modalities(tmp_path):
    rng = np.random.default_rng(3)
    jpg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(jpg, format="JPEG")
    items = [(f"k{i}", [("camera.png", png(rng)), ("gel.jpg", jpg.getvalue()), ("digit.png", png(rng, 16))])
             for i in range(5)]
    write_shard(tmp_path / "in" / "x.tar", items)
    encoders = (("camera", "tiny:0"), ("gel", "tiny:1"), ("digit", "tiny:2"))
    cfg = ExtractConfig(shards=str(tmp_path / "in"), out=str(tmp_path / "st"), encoders=encoders, workers=0)
    _, m = run_extract(cfg, show_progress=False)
    assert m["modalities"] == ["camera", "gel", "digit"] and m["samples"] == 5 and m["skip_count"] == 0
    s = open_store(tmp_path / "st")
    assert s.modalities == ("camera", "gel", "digit") and s.keys() == [f"k{i}" for i in range(5)]
    assert all(s.read("pooled", mod).shape == (5, 512) for mod in s.modalities)
    assert not np.array_equal(s.read("pooled", "camera"), s.read("pooled", "digit"))


def test_corrupt_sample_and_truncated_shard(tmp_path):
    rng = np.random.default_rng(1)
    good = [sample(rng, f"g{i}", i) for i in range(6)]
    corrupt = ("bad0", [("vision.png", b"not a png"), ("tactile.png", png(rng)), ("json", b"{}")])
    no_tactile = ("bad1", [("vision.png", png(rng)), ("json", b"{}")])
    bad_json = ("bad2", [("vision.png", png(rng)), ("tactile.png", png(rng)), ("json", b"{oops")])
    write_shard(tmp_path / "in" / "a.tar", [good[0], corrupt, good[1], no_tactile, bad_json, good[2]])
    write_shard(tmp_path / "in" / "b.tar", good[3:])
    data = (tmp_path / "in" / "b.tar").read_bytes()
    (tmp_path / "in" / "b.tar").write_bytes(data[: len(data) * 3 // 4])  # cuts into the last sample
    runner = CliRunner()
    args = ["extract", "--shards", str(tmp_path / "in"), "--out", str(tmp_path / "st"), "--encoder", "vision=tiny",
            "--encoder", "tactile=tiny:1", "--workers", "0"]
    res = runner.invoke(main, args)
    assert res.exit_code == 2 and "max-skip-fraction" in res.output  # default 0.01: fails, after writing
    m = json.loads((tmp_path / "st" / "manifest.json").read_text())
    reasons = {s["key"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"bad0", "bad1", "bad2", None}
    assert "undecodable" in reasons["bad0"] and "missing modality 'tactile'" in reasons["bad1"]
    assert "bad json" in reasons["bad2"] and "unreadable shard" in reasons[None]
    assert m["samples"] == 3 + 2 and m["skip_count"] == 4  # b.tar keeps its two complete samples
    assert open_store(tmp_path / "st").keys() == ["g0", "g1", "g2", "g3", "g4"]
    res = runner.invoke(main, [*args, "--max-skip-fraction", "0.5"])  # resumes: nothing to redo
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(tmp_path / "st" / "manifest.json")


@pytest.mark.parametrize("tokens", [False, True])
def test_summary_names_a_token_shape_only_with_tokens(shards, tmp_path, tokens):
    args = ["extract", "--shards", str(shards / "shard-000001.tar"), "--out", str(tmp_path / "st"),
            "--encoder", "vision=tiny", "--encoder", "tactile=tiny:1", "--workers", "0", *(["--tokens"] * tokens)]
    res = CliRunner().invoke(main, args, env={"REGTOK_NO_PROGRESS": "1"})
    assert res.exit_code == 0, res.output
    summary = next(line for line in res.stderr.splitlines() if line.startswith("extracted "))
    assert ("tok (" in summary) == tokens, summary


def test_other_encoders_refuse_an_existing_store(store, tmp_path):
    cfg = ExtractConfig(shards=json.loads((store / "manifest.json").read_text())["config"]["shards"],
                        out=str(store), encoders=(("vision", "tiny:5"), ("tactile", "tiny:1")), workers=0)
    with pytest.raises(RegtokError, match="other encoders"):
        run_extract(cfg, show_progress=False)


def test_decode_workers_auto_and_explicit(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert decode_workers("auto", on_cuda=False, shards=9) == 0  # the CPU forward already uses every core
    assert 1 <= decode_workers("auto", on_cuda=True, shards=9) <= 8
    assert decode_workers("auto", on_cuda=True, shards=1) == 1  # never more workers than shards
    assert decode_workers(3, on_cuda=False, shards=2) == 2 and decode_workers(0, on_cuda=True, shards=5) == 0
    with pytest.raises(RegtokError, match="workers"):
        ExtractConfig(shards="x", out="y", encoders=ENCODERS, workers="many")


@pytest.mark.parametrize("value", ["-1", "many"])
def test_bad_workers_flag_is_one_line(value, tmp_path):
    res = CliRunner().invoke(main, ["extract", "--shards", str(tmp_path), "--out", str(tmp_path / "st"),
                                    "--encoder", "vision=tiny", "--encoder", "tactile=tiny:1", "--workers", value])
    assert res.exit_code == 2 and "expected auto or a count >= 0" in res.output


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(shards, store, tmp_path):
    out = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "regtok", "extract", "--shards", str(shards / "shard-{000000..000002}.tar"),
           "--out", str(out), "--encoder", "vision=tiny:0", "--encoder", "tactile=tiny:1", "--tokens",
           "--workers", "0", "--batch-size", "4"]
    env = {**os.environ, PAUSE_ENV: "30", "REGTOK_NO_PROGRESS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        record = out / "parts" / "shard-000000.json"
        while not record.exists() and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "manifest.json").exists() and not (out / "parts" / "shard-000001.json").exists()
    res = subprocess.run(cmd, env={**os.environ, "REGTOK_NO_PROGRESS": "1"}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["timings"]["shards_encoded"] == 2  # the finished part was kept
    a, b = arrays(out), arrays(store)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_dataset_manifest_labels_schema_is_copied(tmp_path):
    from regtok.pipeline.data.synth import synthesize

    ds = synthesize(tmp_path / "data", samples=12, shards=2, seed=0)
    path, m = extract(str(tmp_path / "data" / "dataset.json"), tmp_path / "st")
    assert m["labels"] == ds["labels"] and m["inputs"][0]["role"] == "dataset"
    assert m["inputs"][0]["sha256"] == sha256_file(tmp_path / "data" / "dataset.json")
    labels = open_store(path).labels()
    assert set(labels) == set(ds["labels"])  # only the schema's labels: not "index" or "key"
    assert labels["material"].dtype == np.int64 and labels["material"].max() < len(ds["labels"]["material"]["classes"])


def test_label_groups_are_set_in_the_store_schema(tmp_path):
    from regtok.pipeline.data.synth import synthesize

    synthesize(tmp_path / "data", samples=8, shards=1, seed=0)
    result = CliRunner().invoke(main, ["extract", "--shards", str(tmp_path / "data" / "dataset.json"), "--out",
                                       str(tmp_path / "st"), "--encoder", "vision=tiny:0", "--encoder",
                                       "tactile=tiny:1", "--label-group", "press_depth=shared"])
    assert result.exit_code == 0, result.output
    m = read_manifest(tmp_path / "st" / "manifest.json", kind="features")
    assert m["labels"]["press_depth"]["group"] == "shared" and m["labels"]["material"]["group"] == "shared"
    assert m["labels"]["albedo_hue"]["group"] == "vision"  # the synth split's own marks stay
    bad = CliRunner().invoke(main, ["extract", "--shards", str(tmp_path / "data" / "dataset.json"), "--out",
                                    str(tmp_path / "bad"), "--encoder", "vision=tiny:0", "--encoder", "tactile=tiny:1",
                                    "--label-group", "press_depth=audio"])
    assert bad.exit_code == 2 and bad.stderr.strip().startswith("error:") and "audio" in bad.stderr
