"""Issue 20, first half: nothing overwritten, nothing silently wrong from the Python API or a changed run.

One test per finding (the number is the issue's); each failed on the code before the fix. The world is a 16-pair
synthetic set at 16 px, the tiny random-init encoders and a 1-epoch tiny run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_ok, one_line_error, regtok_cli
from PIL import Image
from safetensors.torch import load_file, save_file

import regtok
from regtok.errors import RegtokError
from regtok.pipeline.manifests.manifest import sha256_file

ENCODERS = ["--encoder", "vision=tiny:0", "--encoder", "tactile=tiny:1"]
TRAIN = ["--preset", "tiny", "--epochs", "1", "--batch-size", "8", "--val-fraction", "0.25", "--device", "cpu",
         "model.n_layers=1", "model.read_dim=8"]
EVAL = ["--no-baselines", "--prefixes", "1,2", "--device", "cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from regtok.pipeline.data.synth import synthesize

    root = tmp_path_factory.mktemp("faults2")
    synthesize(root / "shards", samples=16, shards=2, seed=0, image_size=16)
    cli_ok(regtok_cli("extract", "--shards", root / "shards" / "dataset.json", "--out", root / "store", *ENCODERS,
                  "--workers", "0", "--device", "cpu", "--batch-size", "8"))
    cli_ok(regtok_cli("train", "--features", root / "store", "--out", root / "run", *TRAIN))
    return root


@pytest.fixture
def run(world, tmp_path) -> Path:
    """A private copy of the trained run."""
    shutil.copytree(world / "run", tmp_path / "run")
    return tmp_path / "run"


def digest(directory: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file()}


# ── 1, 2. an --out is never another stage's directory, and eval/embed never replace their own output silently ──


def test_1_train_eval_compare_refuse_another_stages_directory(world, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(world / "store", store)
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    before = {d: digest(d) for d in (store, run)}
    assert "--overwrite" in one_line_error(regtok_cli("train", "--features", store, "--out", store, *TRAIN))
    assert "--overwrite" in one_line_error(regtok_cli("eval", "--run", run, "--features", store, "--out", run, *EVAL))
    assert "--overwrite" in one_line_error(regtok_cli("eval", "--run", run, "--features", store, "--out", store,
                                                      *EVAL))
    assert "--overwrite" in one_line_error(regtok_cli("compare", run, "--out", run))
    assert {d: digest(d) for d in (store, run)} == before
    regtok.open_store(store)

    report = tmp_path / "report"
    cli_ok(regtok_cli("eval", "--run", run, "--features", store, "--out", report, *EVAL))
    assert "--overwrite" in one_line_error(regtok_cli("eval", "--run", run, "--features", store, "--out", report,
                                                      *EVAL, "--seed", "1"))
    assert json.loads((report / "manifest.json").read_text())["config"]["seed"] == 0
    assert "--overwrite" in one_line_error(regtok_cli("train", "--features", store, "--out", report, *TRAIN))
    cli_ok(regtok_cli("eval", "--run", run, "--features", store, "--out", report, *EVAL, "--seed", "1", "--overwrite"))
    assert json.loads((report / "manifest.json").read_text())["config"]["seed"] == 1


def test_1_train_overwrite_starts_a_run_again_without_its_old_files(world, run):
    message = one_line_error(regtok_cli("train", "--features", world / "store", "--out", run, *TRAIN))
    assert "--resume" in message and "--overwrite" in message
    cli_ok(regtok_cli("train", "--features", world / "store", "--out", run, *TRAIN, "--overwrite", "keep_best=false"))
    assert not (run / "best.safetensors").exists()  # the old run's best weights would be loaded by eval
    assert regtok.load_run(run).config.keep_best is False


def test_1_sweep_out_has_the_same_overwrite_rule(world, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    message = one_line_error(regtok_cli("sweep", "--features", world / "store", "--out", tmp_path, "--grid",
                                        "lr=0.001", *TRAIN))
    assert "notes.txt" in message and "--overwrite" in message
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_2_embed_never_replaces_a_file_without_overwrite(world, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(world / "store", store)
    before = digest(store)
    args = ["embed", "--run", world / "run", "--shards", world / "shards" / "dataset.json", "--workers", "0",
            "--device", "cpu"]
    assert "--overwrite" in one_line_error(regtok_cli(*args, "--out", store / "features.h5"))
    assert digest(store) == before
    regtok.open_store(store)
    cli_ok(regtok_cli(*args, "--out", tmp_path / "emb.h5"))
    assert "--overwrite" in one_line_error(regtok_cli(*args, "--out", tmp_path / "emb.h5"))
    cli_ok(regtok_cli(*args, "--out", tmp_path / "emb.h5", "--overwrite"))


# ── 9, 12, 21. the Python API: every input it cannot use is an error, never a quiet wrong answer ──────


@pytest.fixture(scope="module")
def embedder(world):
    return regtok.Embedder.from_run(world / "run")


def test_9_a_two_dimensional_uint8_array_is_one_grayscale_image(embedder):
    gray = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    z = embedder.embed(gray, "vision")
    assert z.shape == (1, embedder.run.model.cfg.embed_dim)
    assert np.array_equal(z, embedder.embed([Image.fromarray(gray)], "vision"))
    assert np.array_equal(z, embedder.embed(gray[:, :, None], "vision"))  # (H, W, 1): the same image
    with pytest.raises(RegtokError, match=r"\(H, W, C\)"):
        embedder.embed(np.zeros((3, 32, 32), np.uint8), "vision")  # three grayscale images? say so, do not guess


def test_21_cmyk_and_16_bit_images_work_and_float_images_are_refused(embedder):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    cmyk = rgb.convert("CMYK")
    assert np.array_equal(embedder.embed(cmyk, "vision"), embedder.embed(cmyk.convert("RGB"), "vision"))
    wide = Image.fromarray(np.linspace(0, 65535, 256).reshape(16, 16).astype(np.int32), mode="I")
    eight = Image.fromarray(np.rint(np.asarray(wide) / 257).astype(np.uint8))
    assert np.array_equal(embedder.features([wide], "vision"), embedder.features([eight], "vision"))  # as extract
    with pytest.raises(RegtokError, match="mode F"):
        embedder.embed(Image.new("F", (16, 16)), "vision")


@pytest.mark.parametrize("k", [2.5, "2", True, 0, -1, 3])
def test_12_k_must_be_a_whole_number_from_1_to_n_shared(world, k):
    run = regtok.load_run(world / "run")
    x = regtok.open_store(world / "store").read(run.feature_kind, "vision")
    with pytest.raises(RegtokError, match=r"\bk\b") as info:
        run.embed(x, "vision", k=k)
    assert "keep" not in str(info.value)
    assert np.array_equal(run.embed(x, "vision", k=np.int64(2)), run.embed(x, "vision", k=2))


def test_10_12_non_finite_huge_or_complex_features_are_refused_naming_rows(world):
    run = regtok.load_run(world / "run")
    x = regtok.open_store(world / "store").read(run.feature_kind, "vision").astype(np.float32)
    bad = x.copy()
    bad[3, 0], bad[5, 1], bad[7, 2] = np.nan, np.inf, 1e30
    with pytest.raises(RegtokError, match=r"rows? 3, 5, 7"):
        run.embed(bad, "vision")
    with pytest.raises(RegtokError, match="complex"):
        run.embed(x + 1j, "vision")


# ── 11, 17. a run's weights and config are checked before they are used ──────────────────────────────


@pytest.mark.parametrize("change", ["scaled", "nan", "int32"])
def test_11_changed_weights_are_refused_by_load_run_and_eval(world, run, tmp_path, change):
    path = run / "best.safetensors"
    weights = load_file(str(path))
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1)
    weights[name] = {"scaled": weights[name] * 1.5, "nan": weights[name].fill_(float("nan")),
                     "int32": weights[name].to(torch.int32)}[change]
    save_file(weights, str(path), metadata={"step": "1", "epoch": "0", "val_select": "0.5"})
    with pytest.raises(RegtokError, match="best.safetensors.*changed"):
        regtok.load_run(run)
    message = one_line_error(regtok_cli("eval", "--run", run, "--features", world / "store", "--out",
                                        tmp_path / "e", *EVAL))
    assert "best.safetensors" in message and "regtok verify" in message
    assert not (tmp_path / "e").exists()


def test_11_the_buffers_file_is_checked_too_and_refitted_weights_are_what_the_manifest_records(run):
    records = {r["path"]: r for r in json.loads((run / "manifest.json").read_text())["outputs"]["files"]}
    for name in ("best.safetensors", "buffers.safetensors"):  # best's decoders are refitted before the manifest
        assert records[name]["sha256"] == sha256_file(run / name)
    buffers = load_file(str(run / "buffers.safetensors"))
    name = next(k for k, v in buffers.items() if v.is_floating_point() and v.numel() > 1)
    save_file({**buffers, name: buffers[name] * 1.5}, str(run / "buffers.safetensors"))
    with pytest.raises(RegtokError, match="buffers.safetensors.*changed"):
        regtok.load_run(run)
    (run / "buffers.safetensors").unlink()
    with pytest.raises(RegtokError, match="buffers.safetensors.*missing"):
        regtok.load_run(run)


@pytest.mark.parametrize("damage", ["shape", "n_registers", "no_model_spec", "list"])
def test_17_a_run_whose_weights_or_config_do_not_fit_is_one_line(world, run, tmp_path, damage):
    (run / "manifest.json").unlink()  # no hashes to compare: the structure itself is checked
    config = json.loads((run / "config.json").read_text())
    if damage == "shape":
        weights = load_file(str(run / "best.safetensors"))
        name = next(k for k, v in weights.items() if v.ndim == 2)
        weights[name] = weights[name][:-1]
        save_file(weights, str(run / "best.safetensors"), metadata={"step": "1"})
    elif damage == "n_registers":
        config["model_spec"]["config"]["n_registers"] = 4
    elif damage == "no_model_spec":
        del config["model_spec"]
    else:
        config = [config]
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(RegtokError, match="config.json|best.safetensors"):
        regtok.load_run(run)
    one_line_error(regtok_cli("eval", "--run", run, "--features", world / "store", "--out", tmp_path / "e", *EVAL))


# ── 13, 16. a full disk or an unwritable tb/ while training: one line, nothing half-written left ─────


@pytest.mark.parametrize("writer,file", [("torch.save", "state.pt"), ("save_file", "checkpoint"),
                                         ("save_file", "start")])
def test_13_full_disk_while_saving_a_checkpoint_is_one_line_and_leaves_no_temporaries(world, tmp_path, monkeypatch,
                                                                                    writer, file):
    from regtok.pipeline.train import weights

    def full(obj, path, *a, **kw):
        if file not in Path(path).name:  # the other files are written
            return real(obj, path, *a, **kw)
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    if writer == "torch.save":
        real = torch.save
        monkeypatch.setattr(torch, "save", full)
    else:
        real = weights.save_file
        monkeypatch.setattr(weights, "save_file", lambda obj, path, metadata=None: full(obj, path, metadata=metadata))
    out = tmp_path / "r"
    message = one_line_error(regtok_cli("train", "--features", world / "store", "--out", out, *TRAIN))
    assert "could not write" in message and "disk" in message and file in message
    kept, none = "the last complete checkpoint is kept" in message, "no checkpoint had been written yet" in message
    assert kept != none and (none or file != "start")  # the start is written before the first step: nothing to keep
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_16_a_tb_path_that_is_a_file_or_read_only_is_one_line(world, tmp_path, monkeypatch):
    out = tmp_path / "r"
    out.mkdir()
    (out / "tb").write_text("not a directory")
    message = one_line_error(regtok_cli("train", "--features", world / "store", "--out", out, "--tensorboard", *TRAIN))
    assert f"{out / 'tb'}" in message and "b'" not in message
    (out / "tb").unlink()
    (out / "tb").mkdir()
    import builtins

    real_open = builtins.open

    def ro_open(path, mode="r", *a, **kw):
        if str(path).startswith(str(out / "tb")) and any(c in mode for c in "wax+"):
            raise OSError(13, "Permission denied", str(path))
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr(builtins, "open", ro_open)
    message = one_line_error(regtok_cli("train", "--features", world / "store", "--out", out, "--tensorboard", *TRAIN))
    assert "Permission denied" in message and str(out / "tb") in message


# ── 20. a run's lineage resolves from any working directory ──────────────────────────────────────────


def test_20_relative_encoder_weights_resolve_from_another_directory(world, tmp_path, monkeypatch):
    import timm

    model = timm.create_model("test_vit", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    monkeypatch.chdir(tmp_path)
    cli_ok(regtok_cli("extract", "--shards", world / "shards" / "dataset.json", "--out", "store", "--encoder",
                  "vision=timm:test_vit@w.safetensors", "--encoder", "tactile=tiny:1", "--workers", "0",
                  "--device", "cpu", "--batch-size", "16"))
    cli_ok(regtok_cli("train", "--features", "store", "--out", "run", *TRAIN))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    emb = regtok.Embedder.from_run(tmp_path / "run")
    image = Image.fromarray(np.zeros((16, 16, 3), np.uint8))
    assert emb.embed(image, "vision").shape[0] == 1

