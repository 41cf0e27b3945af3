"""The Python API: regtok.load_run / open_store / Embedder, and `regtok embed`."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import regtok
from regtok.cli import main
from regtok.config import TrainConfig
from regtok.errors import RegtokError


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """synth → extract (tiny encoders, tokens) → train (tiny, 1 epoch) → eval --save-embeddings, on 64 pairs."""
    from regtok.pipeline.data.synth import synthesize

    root = tmp_path_factory.mktemp("api")
    synthesize(root / "shards", samples=64, shards=2, seed=0)
    code, _, err = invoke("extract", "--shards", str(root / "shards" / "dataset.json"), "--out", str(root / "store"),
                          "--encoder", "vision=tiny:0", "--encoder", "tactile=tiny:1", "--tokens", "--workers", "0",
                          "--device", "cpu")
    assert code == 0, err
    code, _, err = invoke("train", "--features", str(root / "store"), "--out", str(root / "run"), "--preset", "tiny",
                          "--epochs", "1", "--batch-size", "16", "feature_kind=tokens")
    assert code == 0, err
    code, _, err = invoke("eval", "--run", str(root / "run"), "--features", str(root / "store"), "--out",
                          str(root / "eval"), "--prefixes", "1,2,4,8", "--save-embeddings", "--no-baselines")
    assert code == 0, err
    return {"root": root, "shards": root / "shards", "store": root / "store", "run": root / "run",
            "embeddings": root / "eval" / "embeddings.h5"}


def test_import_regtok_is_cheap_and_lists_the_api():
    code = "import sys, regtok; print('torch' in sys.modules, sorted(regtok.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False ['Embedder', 'Run', 'load_run', 'open_store']"


def test_a_run_knows_its_modalities_shapes_and_config(world):
    run = regtok.load_run(world["run"])
    store = regtok.open_store(world["store"])
    assert run.modalities == ("vision", "tactile") and run.feature_kind == "tokens"
    assert isinstance(run.config, TrainConfig) and run.config.model.n_shared == run.n_shared == 2
    for m in run.modalities:
        assert run.input_shapes[m] == store.read("tokens", m, slice(0, 1)).shape[1:]
    assert len(store.keys()) == store.n == 64 and set(store.labels()) >= {"material"}


def test_embed_equals_what_eval_saves(world):
    run, store = regtok.load_run(world["run"]), regtok.open_store(world["store"])
    with h5py.File(world["embeddings"], "r") as f:
        assert [k.decode() for k in f["keys"][:]] == store.keys()
        for m in run.modalities:
            x = store.read("tokens", m)
            for k in (1, 2):
                saved = f[f"{m}/k{k}"][:]
                assert np.array_equal(run.embed(x, m, k=k), saved), (m, k)
            assert np.array_equal(run.embed(x, m), f[f"{m}/k2"][:])  # default: every shared register
    one = run.embed(store.read("tokens", "vision", slice(3, 4))[0], "vision")  # a single row
    assert one.shape == (1, run.model.cfg.embed_dim)


def test_registers_mask_the_slots_past_k(world):
    run, store = regtok.load_run(world["run"]), regtok.open_store(world["store"])
    regs = run.registers(store.read("tokens", "tactile", slice(0, 5)), "tactile", k=2)
    cfg = run.model.cfg
    assert regs.shape == (5, cfg.n_registers, cfg.hidden_dim)
    mask = run.model.encoders["tactile"].mask_token.detach().numpy()  # (R, d): one per position
    assert np.allclose(regs[:, 2:], mask[2:]) and not np.allclose(regs[:, :2], mask[:2])


def test_bad_input_is_a_clear_error(world):
    run = regtok.load_run(world["run"])
    with pytest.raises(RegtokError, match="not 'audio'"):
        run.embed(np.zeros((2, 3)), "audio")
    with pytest.raises(RegtokError, match="do not fit the run"):
        run.embed(np.zeros((2, 7), dtype=np.float32), "vision")


def shard_images(shards: Path, modality: str) -> tuple[list[str], list[Image.Image]]:
    keys, images = [], []
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as t:
            for member in t.getmembers():
                if member.name.endswith(f".{modality}.png"):
                    keys.append(member.name.split(".")[0])
                    images.append(Image.open(t.extractfile(member)).copy())
    return keys, images


def test_embedder_on_images_equals_extract_then_embed(world):
    emb = regtok.Embedder.from_run(world["run"])
    store = regtok.open_store(world["store"])
    for m in ("vision", "tactile"):
        keys, images = shard_images(world["shards"], m)
        assert keys == store.keys()
        assert np.array_equal(emb.features(images, m), store.read("tokens", m))
        assert np.array_equal(emb.embed(images, m, k=1), emb.run.embed(store.read("tokens", m), m, k=1))
    arr = np.asarray(shard_images(world["shards"], "vision")[1][0].convert("RGB"))
    assert np.array_equal(emb.embed(arr, "vision"), emb.embed([Image.fromarray(arr)], "vision"))


def test_embed_command_writes_what_eval_saves(world, tmp_path):
    out = tmp_path / "new" / "emb.h5"
    code, stdout, err = invoke("embed", "--run", str(world["run"]), "--shards",
                               str(world["shards"] / "dataset.json"), "--out", str(out), "--workers", "0",
                               "--device", "cpu")
    assert code == 0, err
    assert stdout.strip() == str(out.absolute()) and "embedded 64 samples (skipped 0)" in err
    with h5py.File(out, "r") as new, h5py.File(world["embeddings"], "r") as saved:
        assert list(new["keys"][:]) == list(saved["keys"][:])
        for m in ("vision", "tactile"):
            assert sorted(new[m]) == ["k1", "k2"]
            for k in ("k1", "k2"):
                assert np.array_equal(new[f"{m}/{k}"][:], saved[f"{m}/{k}"][:])
    assert sorted(p.name for p in out.parent.iterdir()) == ["emb.h5"]  # the temporary store is gone


def test_a_run_and_a_store_print_short_and_name_their_classes(world):
    run, store = regtok.load_run(world["run"]), regtok.open_store(world["store"])
    text = repr(run)
    assert len(text) < 300 and "Module" not in text and "vision (" in text and "tactile (" in text
    assert "tokens, contrastive, 8 registers (2 shared), k 1, 2; best.safetensors after epoch 1, step" in text
    text = repr(store)
    assert len(text) < 400 and "N=64" in text and "vision pooled (" in text and "material (" in text
    indices, names = store.labels()["material"], store.labels(names=True)["material"]
    classes = store.label_classes("material")
    assert indices.dtype == np.int64 and list(names) == [classes[i] for i in indices]
    with pytest.raises(RegtokError, match="no label 'colour'"):
        store.label_classes("colour")
    last = regtok.load_run(world["run"], weights="last")
    assert last.weights == "checkpoint.safetensors" and last.epoch == 1 and run.weights == "best.safetensors"
    with pytest.raises(RegtokError, match="weights must be one of best, last"):
        regtok.load_run(world["run"], weights="first")
    emb = regtok.Embedder(run, {})
    assert repr(emb).startswith("Embedder(; Run(")


def test_public_names_have_docstrings():
    import inspect

    from regtok.pipeline.embed.api import Embedder, Run
    from regtok.pipeline.extract.store import FeatureStore

    for cls in (Run, Embedder, FeatureStore):
        source = inspect.getsource(cls)
        for name, member in vars(cls).items():
            if name.startswith("_") or not callable(getattr(member, "fget", member)):
                continue
            assert inspect.getdoc(getattr(member, "fget", member)), f"{cls.__name__}.{name}"
        for field in getattr(cls, "__annotations__", {}):  # an attribute docstring on the line after each field
            assert f'    {field}:' in source and '"""' in source.split(f"    {field}:", 1)[1].splitlines()[1], field


def test_touch_images_alone_are_packed_and_embedded(world, tmp_path):
    import csv

    keys, images = shard_images(world["shards"], "tactile")
    rows = []
    for key, image in list(zip(keys, images, strict=True))[:6]:
        image.save(tmp_path / f"{key}.png")
        rows.append({"touch": f"{key}.png"})
    with open(tmp_path / "queries.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["touch"])
        writer.writeheader()
        writer.writerows(rows)
    code, _, err = invoke("pack", str(tmp_path / "queries.csv"), "--out", str(tmp_path / "shards"), "--tactile-col",
                          "touch")
    assert code == 0, err
    assert read_dataset(tmp_path / "shards")["modalities"] == ["tactile"]
    out = tmp_path / "touch.h5"
    code, stdout, err = invoke("embed", "--run", str(world["run"]), "--shards", str(tmp_path / "shards"), "--out",
                               str(out), "--workers", "0", "--device", "cpu")
    assert code == 0, err
    assert "embedded 6 samples (skipped 0) of tactile" in err
    emb = regtok.Embedder.from_run(world["run"])
    with h5py.File(out, "r") as f:
        assert list(f) == ["keys", "tactile"] and len(f["keys"]) == 6
        assert np.array_equal(f["tactile/k2"][:], emb.embed(images[:6], "tactile", k=2))


def read_dataset(shards: Path) -> dict:
    import json

    return json.loads((shards / "dataset.json").read_text())
