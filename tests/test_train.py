"""`regtok train`: the data path, the schedule, and end-to-end runs through the CLI on small stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import MODALITIES, TINY, write_store

import regtok.pipeline.train
import regtok.pipeline.train.curves
import regtok.pipeline.train.runs
from regtok.cli import main
from regtok.config import TrainConfig, resolve
from regtok.data import epoch_permutation, make_batches, split_rows
from regtok.pipeline.manifests.manifest import read_manifest, sha256_file
from regtok.train import lr_at, make_optimizer


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> Path:
    """The real thing, kept tiny: `regtok synth` shards through `regtok extract` with the tiny encoders."""
    from regtok.pipeline.data.synth import synthesize

    root = tmp_path_factory.mktemp("extracted")
    synthesize(root / "shards", samples=96, shards=2, seed=0)
    result = CliRunner().invoke(main, ["extract", "--shards", str(root / "shards" / "dataset.json"), "--out",
                                       str(root / "store"), "--encoder", "vision=tiny:0", "--encoder",
                                       "tactile=tiny:1", "--tokens", "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    return root / "store"


def run_train(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["train", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


class Crash(Exception):
    pass


def weights(run: Path) -> dict[str, torch.Tensor]:
    from regtok.pipeline.train.weights import read_weights

    return read_weights(run / "checkpoint.safetensors")  # with the run's fixed buffers


# ── the data path and the schedule ──────────────────────────────────────────────────────────────────


class ArrayStore:
    """A store stand-in backed by arrays (what regtok.data reads through)."""

    def __init__(self, n: int = 50, dim: int = 3):
        self.modalities, self.n = MODALITIES, n
        self.arrays = {m: np.arange(n * dim, dtype=np.float16).reshape(n, dim) + i for i, m in enumerate(MODALITIES)}

    def shape(self, kind, modality):
        return (1, self.arrays[modality].shape[1])

    def read(self, kind, modality, rows=None):
        return self.arrays[modality] if rows is None else self.arrays[modality][rows]


def test_permutation_is_a_pure_function_of_seed_and_epoch():
    cpu = torch.device("cpu")
    assert torch.equal(epoch_permutation(40, 3, 1, cpu), epoch_permutation(40, 3, 1, cpu))
    assert not torch.equal(epoch_permutation(40, 3, 1, cpu), epoch_permutation(40, 3, 2, cpu))
    train, val = split_rows(40, 0.25, seed=0)
    assert len(val) == 10 and not set(train) & set(val) and len(train) + len(val) == 40


def test_streaming_and_rank_shards_give_the_in_memory_batches():
    store, cpu = ArrayStore(), torch.device("cpu")
    rows = np.arange(3, 47)
    mem = make_batches(store, "pooled", rows, 8, seed=1, device=cpu)
    stream = make_batches(store, "pooled", rows, 8, seed=1, device=cpu, memory_budget=0)
    assert not mem.streaming and stream.streaming and mem.steps_per_epoch == 5
    ranks = [make_batches(store, "pooled", rows, 8, seed=1, device=cpu, rank=r, world_size=2) for r in (0, 1)]
    for a, b, r0, r1 in zip(mem.epoch(2), stream.epoch(2), ranks[0].epoch(2), ranks[1].epoch(2), strict=True):
        for m in MODALITIES:
            assert torch.equal(a[m], b[m])
            assert torch.equal(a[m], torch.cat([r0[m], r1[m]]))
    seen = torch.cat([b["vision"][:, 0] for b in mem.epoch(0)])
    assert len(set(seen.tolist())) == 40 and set(seen.tolist()) <= set((rows * 3).tolist())  # no repeats, drop last
    resumed = [b["vision"] for b in mem.epoch(2, start_step=3)]
    assert torch.equal(torch.cat(resumed), torch.cat([b["vision"] for b in mem.epoch(2)][3:]))


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = resolve(TrainConfig, None, {"lr": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1})
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[9] == pytest.approx(1.0) and all(a < b for a, b in zip(lrs[:9], lrs[1:10], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True)) and lr_at(100, cfg, 100) == pytest.approx(0.1)


def test_no_weight_decay_on_vectors_and_the_logit_scale():
    from regtok.model import RegTok

    cfg = resolve(TrainConfig, "tiny")
    model = RegTok(cfg.model, {m: (1, 8) for m in MODALITIES})
    opt = make_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed and all(model.get_parameter(n).ndim >= 2 and "logit_scale" not in n for n in decayed)
    assert opt.defaults["betas"] == (cfg.beta1, cfg.beta2)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


# ── end to end through the CLI ──────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("loss", ["contrastive", "flow_matching", "combined"])
def test_tiny_run_per_loss_type(extracted, tmp_path, loss):
    from regtok.pipeline.train.run_load import load_run
    from regtok.pipeline.train.runs import read_metrics
    from regtok.pipeline.train.weights import read_weights

    store, run = extracted, tmp_path / "run"
    code, out, err = run_train("--features", str(store), "--out", str(run), "--loss", loss, *TINY,
                               "feature_kind=pooled")
    assert code == 0, err
    assert Path(out.strip()) == run / "manifest.json"
    m = read_manifest(run / "manifest.json", kind="run")
    assert m["inputs"][0]["sha256"] == sha256_file(store / "manifest.json")
    assert m["config"]["model"]["loss_type"] == loss and m["feature_kind"] == "pooled"
    assert {f["path"] for f in m["outputs"]["files"]} >= {"checkpoint.safetensors", "config.json", "metrics.jsonl"}
    assert m["outputs"]["checkpoint"]["sha256"] == sha256_file(run / "checkpoint.safetensors")
    lines = read_metrics(run)
    epochs = [r for r in lines if r["type"] == "epoch"]
    assert len(epochs) == 2 and len([r for r in lines if r["type"] == "step"]) == 2  # 2 steps/epoch, every 2nd
    assert [r["epoch"] for r in epochs] == [1, 2]  # epochs counted from 1, as the console shows them
    terms = {"loss", "preservation"} | ({"contrastive"} if loss != "flow_matching" else set())
    assert terms <= set(epochs[-1]) and "val_r1_full_a_to_b" in epochs[-1] and "val_r1_k1_b_to_a" in epochs[-1]
    assert 0 <= m["metrics"]["val/R@1"] <= 1 and m["metrics"]["step"] == 4
    assert all(np.isfinite(v) for r in lines for v in r.values() if isinstance(v, float))
    loaded = load_run(run)
    assert not loaded.model.training and loaded.feature_kind == "pooled" and loaded.train_config.epochs == 2
    assert loaded.model.has_flow == (loss != "contrastive")
    best = read_weights(run / "best.safetensors")  # keep_best: the run is used with its best validated weights
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, best[k])
    assert [r["epoch"] for r in lines if r["type"] == "start"] == [0]  # the start is validated and logged
    scores = [r["val_select"] for r in epochs]
    last_best = len(scores) - scores[::-1].index(max(scores))  # epochs from 1; a tie goes to the later epoch
    assert m["metrics"]["best/val_select"] == max(scores)
    assert m["metrics"]["best/epoch"] == last_best == loaded.epoch


def test_train_writes_curves_png_and_lists_it(store, tmp_path, monkeypatch):
    from PIL import Image

    run = tmp_path / "run"
    code, _, err = run_train("--features", str(store), "--out", str(run), *TINY)
    assert code == 0, err
    with Image.open(run / "curves.png") as png:
        assert 600 <= png.width <= 1920 and 250 <= png.height <= 1080
    m = read_manifest(run / "manifest.json", kind="run")
    listed = {f["path"]: f for f in m["outputs"]["files"]}
    assert listed["curves.png"]["sha256"] == sha256_file(run / "curves.png")
    # the figure holds each loss term and each validation series, read from metrics.jsonl
    drawn = {}
    monkeypatch.setattr(regtok.pipeline.train.curves, "_validation_panel", lambda ax, records, best, mods, label:
                        drawn.update(records=records, best=best, mods=mods))
    regtok.pipeline.train.curves.plot_curves(regtok.pipeline.train.runs.read_metrics(run), tmp_path / "again.png", 0,
                                             MODALITIES)
    assert [r["type"] for r in drawn["records"]] == ["start", "epoch", "epoch"] and drawn["mods"] == MODALITIES
    # without matplotlib the run trains as before and says nothing about it
    monkeypatch.undo()
    monkeypatch.setattr(regtok.pipeline.train.curves, "pyplot", lambda: None)
    code, _, err = run_train("--features", str(store), "--out", str(tmp_path / "bare"), *TINY)
    assert code == 0 and not (tmp_path / "bare" / "curves.png").exists() and "matplotlib" not in err
    assert "curves.png" not in {f["path"] for f in read_manifest(tmp_path / "bare" / "manifest.json")["outputs"][
        "files"]}


def test_same_seed_same_weights_and_resume_equals_uninterrupted(store, tmp_path, monkeypatch):

    args = ["--features", str(store), *TINY, "--epochs", "3", "--batch-size", "16"]
    for name in ("a", "b"):
        assert run_train(*args, "--out", str(tmp_path / name))[0] == 0
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = tmp_path / "seed1"
    assert run_train(*args, "--out", str(other), "--seed", "1")[0] == 0
    assert not all(torch.equal(a[k], weights(other)[k]) for k in a)

    # Crash at step 4 (5 steps/epoch; the last checkpoint is mid-epoch, at step 3), then --resume.
    crash = tmp_path / "crash"

    def crashing_step(*a, on_step=None, **kw):
        def step(s, total, record):
            if s == 4:
                raise Crash
        return real(*a, on_step=step, **kw)

    real = regtok.pipeline.train.train_run
    monkeypatch.setattr(regtok.pipeline.train, "train_run", crashing_step)
    with pytest.raises(Crash):
        run_train(*args, "--out", str(crash), "checkpoint_every=3")
    monkeypatch.setattr(regtok.pipeline.train, "train_run", real)
    assert regtok.pipeline.train.runs.checkpoint_step(crash) == 3
    code, _, err = run_train("--features", str(store), "--out", str(crash), "--resume")
    assert code == 0, err
    c = weights(crash)
    assert all(torch.equal(a[k], c[k]) for k in a)
    steps = [(r["type"], r["step"]) for r in regtok.pipeline.train.runs.read_metrics(crash)]
    assert steps == [(r["type"], r["step"]) for r in regtok.pipeline.train.runs.read_metrics(tmp_path / "a")]


def test_streaming_fallback_says_so_and_trains_the_same(store, tmp_path):
    args = ["--features", str(store), *TINY, "--epochs", "1"]
    code, _, err = run_train(*args, "--out", str(tmp_path / "mem"))
    assert code == 0 and "streaming batches" not in err
    code, _, err = run_train(*args, "--out", str(tmp_path / "stream"), "max_memory_fraction=0")
    assert code == 0 and "streaming batches" in err
    assert read_manifest(tmp_path / "stream" / "manifest.json")["streaming"] is True
    a, b = weights(tmp_path / "mem"), weights(tmp_path / "stream")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_stops_with_a_clear_error_and_the_last_good_checkpoint(store, tmp_path, monkeypatch):
    import regtok.train as trainer
    from regtok.pipeline.train.runs import checkpoint_step, load_resume

    real, calls = trainer._gradients, []

    def nan_at_step_3(*args, **kwargs):  # the loss of the 4th step is NaN
        record = real(*args, **kwargs)
        calls.append(1)
        return {**record, "loss": float("nan")} if len(calls) == 4 else record

    monkeypatch.setattr(trainer, "_gradients", nan_at_step_3)
    run = tmp_path / "run"
    code, out, err = run_train("--features", str(store), "--out", str(run), *TINY)
    assert code == 2 and out == ""
    assert "non-finite loss at step 3" in err and "last good state" in err and "Traceback" not in err
    assert checkpoint_step(run) == 3 and load_resume(run).step == 3
    assert all(torch.isfinite(v).all() for v in weights(run).values())
    assert not (run / "manifest.json").exists()


def test_unknown_config_key_is_a_one_line_error(store, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("epochs: 1\nlearning_rate: 0.1\n")
    code, out, err = run_train("--features", str(store), "--out", str(tmp_path / "run"), "--config", str(cfg))
    assert code == 2 and out == ""
    assert err.strip().count("\n") == 0 and "learning_rate" in err
    code, _, err = run_train("--features", str(store), "--out", str(tmp_path / "run"), "model.n_layer=2")
    assert code == 2 and "n_layer" in err and "did you mean model.n_layers?" in err
    code, _, err = run_train("--features", str(store), "--out", str(tmp_path / "run"), "n_shared=4")
    assert code == 2 and "unknown config key 'n_shared' (did you mean model.n_shared?)" in err
    cfg.write_text("n_shared: 4\n")
    code, _, err = run_train("--features", str(store), "--out", str(tmp_path / "run"), "--config", str(cfg))
    assert code == 2 and "did you mean model.n_shared?" in err


def test_tokens_are_used_when_the_store_has_them(extracted, tmp_path):
    from regtok.pipeline.train.run_load import load_run

    run = tmp_path / "run"
    code, _, err = run_train("--features", str(extracted), "--out", str(run), *TINY, "--epochs", "1")
    assert code == 0, err
    loaded = load_run(run)
    assert loaded.feature_kind == "tokens"
    tokens = json.loads((run / "config.json").read_text())["model_spec"]["inputs"]["vision"]
    assert tokens == list(read_manifest(extracted / "manifest.json")["encoders"]["vision"]["token_shape"])
    code, _, err = run_train("--features", str(write_store(tmp_path / "pooled_only")), "--out",
                             str(tmp_path / "r2"), *TINY, "feature_kind=tokens")
    assert code == 2 and "no tokens features" in err


def test_run_dir_guards(store, tmp_path):
    from regtok.pipeline.train.runs import STATE, load_resume

    run = tmp_path / "run"
    args = ["--features", str(store), "--out", str(run), *TINY, "--epochs", "1"]
    assert run_train(*args)[0] == 0
    code, _, err = run_train(*args)
    assert code == 2 and "--resume" in err  # never overwrite a run silently
    code, _, err = run_train(*args, "--resume", "--lr", "0.1")
    assert code == 2 and "differs" in err and "lr" in err
    payload = torch.load(run / STATE, weights_only=True)
    torch.save({**payload, "step": payload["step"] + 1}, run / STATE)
    with pytest.raises(Exception, match="interrupted while saving"):
        load_resume(run)


def test_held_out_store_validates_and_must_match(store, tmp_path):
    held_out = write_store(tmp_path / "held_out", n=40, seed=1)
    run = tmp_path / "run"
    code, _, err = run_train("--features", str(store), "--val-features", str(held_out), "--out", str(run), *TINY)
    assert code == 0, err
    m = read_manifest(run / "manifest.json")
    assert [r["role"] for r in m["inputs"]] == ["features", "val_features"]
    assert m["val_samples"] == 40 and m["train_samples"] == 100
    other = write_store(tmp_path / "other", n=40, dim=10)
    code, _, err = run_train("--features", str(store), "--val-features", str(other), "--out",
                             str(tmp_path / "r2"), *TINY)
    assert code == 2 and "do not match" in err


def test_print_config_resolves_and_exits(tmp_path, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    flow = Path(__file__).resolve().parent.parent / "configs" / "flow_matching.yaml"
    result = CliRunner().invoke(main, ["train", "--print-config", "--preset", "tiny", "--config", str(flow),
                                       "lr=1e-3", "--epochs", "3"])
    assert result.exit_code == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["loss_type"] == "flow_matching" and printed["model"]["n_registers"] == 8
    assert printed["lr"] == 1e-3 and printed["epochs"] == 3 and list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(main, ["train", "--preset", "tiny"])
    assert result.exit_code == 2 and "--features and --out are required" in result.stderr


def test_train_help_says_where_defaults_come_from():
    result = CliRunner().invoke(main, ["train", "--help"])
    text = " ".join(result.stdout.split())
    assert "[default: 20 (TrainConfig); tiny preset 5]" in text
    assert "[default: 256 (TrainConfig); tiny preset 64]" in text and "[default: 0.0005 (TrainConfig)" in text
