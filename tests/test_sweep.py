"""`regtok sweep` (Optuna), `regtok compare`, `regtok train --tensorboard` and early stopping of runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import hooked_env, write_store
from safetensors.torch import load_file

from regtok.cli import main
from regtok.config import TrainConfig, from_dict, resolve, to_dict
from regtok.errors import RegtokError
from regtok.pipeline.manifests.manifest import read_manifest
from regtok.pipeline.sweep.space import parse_space
from regtok.pipeline.train.runs import kept_record

BASE = ["--preset", "tiny", "--epochs", "2", "--val-fraction", "0.25", "--batch-size", "32"]
GRID = ["--grid", "model.n_layers=1,2", "--grid", "lr=0.001,0.0003"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("sweep_store"), n=160, dim=12)


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def trials_of(sweep: Path) -> dict[int, dict]:
    return {t["number"]: t for t in json.loads((sweep / "report.json").read_text())["trials"]}


@pytest.fixture(scope="module")
def swept(store, tmp_path_factory) -> Path:
    """A finished 4-trial grid sweep, one worker in this process, pruning off."""
    out = tmp_path_factory.mktemp("swept") / "sweep"
    code, stdout, stderr = invoke("sweep", "--features", str(store), "--out", str(out), *GRID, "--no-prune", *BASE)
    assert code == 0, stderr
    assert stdout.strip() == str(out / "report.json")
    return out


def test_a_grid_sweep_runs_each_point_once_as_an_ordinary_run(swept, store):
    trials = trials_of(swept)
    assert len(trials) == 4 and all(t["state"] == "complete" for t in trials.values())
    points = {(t["params"]["model.n_layers"], t["params"]["lr"]) for t in trials.values()}
    assert points == {(1, 0.001), (1, 0.0003), (2, 0.001), (2, 0.0003)}
    for number, t in trials.items():
        run = swept / t["path"]
        assert t["path"] == f"trials/{number:04d}"
        m = read_manifest(run, kind="run")
        assert m["config"]["model"]["n_layers"] == t["params"]["model.n_layers"]
        assert m["config"]["lr"] == t["params"]["lr"]
        kept = kept_record(run)  # the value is the metric of the weights eval uses: the kept best epoch
        assert kept["epoch"] == t["kept_epoch"] == m["metrics"]["best/epoch"] and t["value"] == kept["val_select"]
        # --keep best (the default): what eval needs, no resume state
        assert (run / "best.safetensors").is_file() and not (run / "checkpoint.safetensors").exists()
        assert not (run / "state.pt").exists() and t["epochs"] == 2
    values = [t["value"] for t in json.loads((swept / "report.json").read_text())["trials"]]
    assert values == sorted(values, reverse=True)
    sweep_m = read_manifest(swept, kind="sweep")
    assert sweep_m["sampler"] == "grid" and sweep_m["storage"].startswith("sqlite:///")
    assert {t["number"]: t["state"] for t in sweep_m["trials"]} == {n: "complete" for n in trials}
    assert sweep_m["space"] == {"model.n_layers": [1, 2], "lr": [0.001, 0.0003]}
    assert (swept / "sweep.png").stat().st_size > 5000 and "| rank | trial |" in (swept / "report.md").read_text()
    code, stdout, _ = invoke("show", str(swept))
    assert code == 0 and "grid sweep, 4 trials (4 complete" in stdout


def test_best_yaml_rebuilds_the_best_trial_with_or_without_a_preset(swept):
    best = json.loads((swept / "report.json").read_text())["best"]
    diff = yaml.safe_load((swept / "best.yaml").read_text())
    assert "beta1" not in diff and diff["epochs"] == 2 and diff["model"]["n_registers"] == 8  # tiny preset, no defaults
    saved = json.loads((swept / best["path"] / "config.json").read_text())["train"]
    for preset in (None, "tiny", "default"):
        rebuilt = {**to_dict(resolve(TrainConfig, preset, diff)), "device": saved["device"]}
        assert rebuilt == saved, preset


def test_rerunning_a_finished_sweep_repeats_nothing(swept, store):
    before = {n: t["value"] for n, t in trials_of(swept).items()}
    code, _, stderr = invoke("sweep", "--features", str(store), "--out", str(swept), *GRID, "--no-prune", *BASE)
    assert code == 0, stderr
    assert {n: t["value"] for n, t in trials_of(swept).items()} == before


def test_a_trial_reruns_to_the_same_weights(swept, tmp_path):
    code, _, stderr = invoke("rerun", str(swept / "trials" / "0000"), "--out", str(tmp_path / "again"),
                             "--allow-outside")
    assert code == 0, stderr


def test_a_study_with_another_space_is_refused(swept, store):
    code, _, stderr = invoke("sweep", "--features", str(store), "--out", str(swept), "--grid", "model.n_layers=1,3",
                             *BASE)
    assert code == 2 and stderr.startswith("error: study 'regtok'") and "another space" in stderr


@pytest.mark.parametrize("args, message", [
    (["--grid", "model.n_sharde=1,2"], "unknown config key 'model.n_sharde'; did you mean model.n_shared?"),
    (["--grid", "n_shared=1,2"], "did you mean model.n_shared?"),
    (["--grid", "model.n_shared="], "model.n_shared has an empty list of choices"),
    (["--grid", "model.loss_type=contrastive,diffusion"], "model.loss_type='diffusion': loss_type must be one of"),
    (["--space", "RANGE_ON_CATEGORICAL"], "model.loss_type is a str key; give it a list of choices, not a range"),
    (["--space", "RANGE", "--sampler", "grid"], "the grid sampler needs a list of choices for every key"),
    (["--grid", "lr=0.001", "--storage", "sqlite:////no/such/dir/study.db"], "cannot open the study storage"),
    ([], "give a search space"),
])
def test_bad_input_is_one_error_line(store, tmp_path, args, message):
    (tmp_path / "range.yaml").write_text("lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    (tmp_path / "cat.yaml").write_text("model.loss_type: {low: 0, high: 1}\n")
    args = [str(tmp_path / "range.yaml") if a == "RANGE" else str(tmp_path / "cat.yaml")
            if a == "RANGE_ON_CATEGORICAL" else a for a in args]
    code, _, stderr = invoke("sweep", "--features", str(store), "--out", str(tmp_path / "s"), *args, *BASE)
    assert code == 2, stderr
    assert stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1 and message in stderr


def test_a_sweep_writes_only_into_its_own_directory(store, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, stderr = invoke("sweep", "--features", str(store), "--out", str(tmp_path), "--grid", "lr=0.001", *BASE)
    assert code == 2 and "already holds notes.txt" in stderr and "--overwrite" in stderr
    code, _, stderr = invoke("sweep", "--features", str(store), "--out", str(store), "--grid", "lr=0.001", *BASE)
    assert code == 2 and stderr.startswith("error: ")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_invalid_combination_fails_once_and_the_rest_run(store, tmp_path, no_figures):
    out = tmp_path / "sweep"
    grid = ["--grid", "model.n_registers=4,8", "--grid", "model.n_shared=2,8"]  # (4, 8) cannot be built
    for _ in range(2):  # the second run continues a finished sweep: nothing is repeated
        code, _, stderr = invoke("sweep", "--features", str(store), "--out", str(out), *grid, "--no-prune", *BASE,
                                 "--epochs", "1")
        assert code == 0, stderr
        trials = trials_of(out)
        assert sorted(t["state"] for t in trials.values()) == ["complete"] * 3 + ["fail"]
    failed = next(t for t in trials.values() if t["state"] == "fail")
    assert failed["params"] == {"model.n_registers": 4, "model.n_shared": 8} and "n_shared" in failed["error"]


def test_a_sweep_whose_trials_all_fail_ends_with_an_error(store, tmp_path, no_figures):
    grid = ["--grid", "model.n_registers=4", "--grid", "model.n_shared=8"]
    code, _, stderr = invoke("sweep", "--features", str(store), "--out", str(tmp_path / "s"), *grid, "--sampler",
                             "random", "--trials", "2", *BASE)
    assert code == 2 and "error: every trial failed" in stderr
    assert len(trials_of(tmp_path / "s")) == 2


def test_a_resumed_random_sweep_proposes_new_points(store, tmp_path, no_figures):
    (tmp_path / "lr.yaml").write_text("lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    args = ["sweep", "--features", str(store), "--out", str(tmp_path / "s"), "--space", str(tmp_path / "lr.yaml"),
            "--sampler", "random", "--no-prune", *BASE, "--epochs", "1"]
    assert invoke(*args, "--trials", "2")[0] == 0
    code, _, stderr = invoke(*args, "--trials", "4")
    assert code == 0, stderr
    lrs = [t["params"]["lr"] for t in trials_of(tmp_path / "s").values()]
    assert len(lrs) == 4 and len(set(lrs)) == 4


def test_another_study_in_the_same_out_is_refused(swept, store):
    code, _, stderr = invoke("sweep", "--features", str(store), "--out", str(swept), *GRID, "--study", "other",
                             "--no-prune", *BASE)
    assert code == 2 and "belongs to study 'regtok'" in stderr
    assert len(trials_of(swept)) == 4


def test_nested_space_yaml_equals_dotted_keys():
    nested = parse_space(yaml.safe_load("model:\n  n_layers: [1, 2]\nlr: {low: 0.0001, high: 0.01, log: true}\n"), "x")
    dotted = parse_space({"model.n_layers": [1, 2], "lr": {"low": 1e-4, "high": 1e-2, "log": True}}, "x")
    assert nested == dotted
    with pytest.raises(RegtokError, match="needs low < high"):
        parse_space({"lr": {"low": 1.0, "high": 0.5}}, "x")


def test_shipped_spaces_parse_and_resolve():
    from regtok.pipeline.sweep.space import check_space

    root = Path(__file__).resolve().parent.parent / "configs"
    spaces = sorted(root.glob("*space*.yaml")) + [root / "seed-table.yaml"]
    for path in dict.fromkeys(spaces):
        space = parse_space(yaml.safe_load(path.read_text()), str(path))
        check_space(space, TrainConfig(), "tpe", str(path))
    table = parse_space(yaml.safe_load((root / "seed-table.yaml").read_text()), "seed-table")
    assert {"model.n_registers", "model.n_shared", "model.n_layers", "model.hidden_dim", "model.nested_dropout_mode",
            "model.loss_type", "model.preservation_weight"} == set(table)


class PruneAfterFirstEpoch:
    """A pruner that stops every trial after its first epoch but the first trial (deterministic, for the test)."""

    def prune(self, study, trial) -> bool:
        return trial.number > 0 and trial.last_step is not None and trial.last_step >= 0


def test_pruned_trials_are_recorded_with_their_last_metric_and_rerun_the_same(store, tmp_path, monkeypatch,
                                                                            no_figures):
    import optuna

    import regtok.pipeline.sweep.stage as sweep_mod

    class Pruner(PruneAfterFirstEpoch, optuna.pruners.BasePruner):
        pass

    monkeypatch.setattr(sweep_mod, "make_pruner", lambda scfg, epochs: Pruner())
    out = tmp_path / "sweep"
    code, _, stderr = invoke("sweep", "--features", str(store), "--out", str(out), "--grid", "lr=0.001,0.0003",
                             *BASE, "--epochs", "3")
    assert code == 0, stderr
    trials = trials_of(out)
    assert trials[0]["state"] == "complete" and trials[0]["epochs"] == 3
    pruned = trials[1]
    assert pruned["state"] == "pruned" and pruned["epochs"] == 1
    m = read_manifest(out / pruned["path"], kind="run")
    assert m["stopped"]["after_epoch"] == 1 and "pruned" in m["stopped"]["reason"]
    assert pruned["value"] == pytest.approx(kept_record(out / pruned["path"])["val_select"])
    code, _, stderr = invoke("rerun", str(out / pruned["path"]), "--out", str(tmp_path / "again"), "--allow-outside")
    assert code == 0, stderr  # the rerun stops after the same epoch: weights identical


def test_two_workers_share_the_study_and_run_each_point_once(store, tmp_path, hook, no_figures):
    """Also issue 20's finding 5: the worker of trial 1 is killed with -9; the other worker runs that trial again
    and the sweep is complete when it ends, never 'complete' with a trial left running."""
    hook("kill:0001")
    out = tmp_path / "sweep"
    code, _, stderr = invoke("sweep", "--features", str(store), "--out", str(out), *GRID, "--jobs", "2",
                             "--no-prune", *BASE, "--epochs", "1")
    assert code == 0, stderr
    trials = trials_of(out)
    complete = [t for t in trials.values() if t["state"] == "complete"]
    assert len(complete) == 4 and json.loads((out / "report.json").read_text())["counts"]["running"] == 0
    assert len({(t["params"]["model.n_layers"], t["params"]["lr"]) for t in complete}) == 4
    assert trials[1]["state"] == "fail" and trials[trials[1]["retried_as"]]["state"] == "complete"
    assert "trial(s) 1 lost their worker: queued again" in stderr


def test_a_killed_sweep_resumes_and_retries_the_running_trial(store, tmp_path, no_figures):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "regtok", "sweep", "--features", str(store), "--out", str(out), *GRID, "--no-prune",
           *BASE, "--epochs", "1"]
    proc = subprocess.Popen(cmd, env={**os.environ, **hooked_env(tmp_path, "hang:0001")}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while not any(p.name.startswith("0001.") for p in (tmp_path / "marks").iterdir()):  # trial 0 done, 1 under way
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "report.json").exists()
    code, _, stderr = invoke(*cmd[3:])  # the same command again
    assert code == 0, stderr
    assert "queued again" in stderr
    trials = trials_of(out)
    complete = [t for t in trials.values() if t["state"] == "complete"]
    assert len(complete) == 4
    assert len({(t["params"]["model.n_layers"], t["params"]["lr"]) for t in complete}) == 4
    killed = trials[1]
    assert killed["state"] == "fail" and "interrupted" in killed["error"]
    retry = trials[killed["retried_as"]]
    assert retry["retry_of"] == 1 and retry["params"] == killed["params"] and retry["state"] == "complete"
    assert trials[0]["state"] == "complete"  # finished before the kill, not repeated
    assert sum(t["params"] == trials[0]["params"] for t in trials.values()) == 1


# ── early stopping, TensorBoard, compare ────────────────────────────────────────────────────────────


def test_a_stopped_run_keeps_its_checkpoint_and_says_so(store, tmp_path):
    from regtok.pipeline.train.stage import train_run

    cfg = from_dict(TrainConfig, {**to_dict(resolve(TrainConfig, "tiny")), "epochs": 3, "val_fraction": 0.25})
    path, result = train_run(store, tmp_path / "run", cfg, stop=lambda r: "enough" if r["epoch"] >= 2 else None)
    assert result.status == "stopped" and result.message == "enough"
    m = read_manifest(path, kind="run")
    assert m["stopped"] == {"after_epoch": 2, "reason": "enough"}
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "epoch"]
    assert epochs == [1, 2] and load_file(str(tmp_path / "run" / "checkpoint.safetensors"))


def test_tensorboard_logs_every_term_validation_hparams_and_the_config(store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = tmp_path / "run"  # 3 steps per epoch, fewer than log_every: the epochs' last steps are still logged
    code, _, stderr = invoke("train", "--features", str(store), "--out", str(run), "--tensorboard", *BASE,
                             "log_every=100")
    assert code == 0, stderr
    acc = EventAccumulator(str(run / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/contrastive", "train/lr", "train/grad_norm", "train/samples_per_s",
                "epoch/loss", "val/R@1", "val/r1_full_a_to_b", "val/select", "kept/select", "kept/epoch",
                "final/select", "kept/R@1"):
        assert tag in tags, sorted(tags)
    assert not any(t.startswith("val/val_") for t in tags)  # no repeated prefix
    assert [e.step for e in acc.Scalars("val/R@1")] == [0, 3, 6]  # before training and after each epoch
    assert [e.step for e in acc.Scalars("train/lr")] == [3, 6]
    kept = kept_record(run)
    assert acc.Scalars("kept/epoch")[-1].value == kept["epoch"]
    assert acc.Scalars("kept/select")[-1].value == pytest.approx(kept["val_select"])
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "n_registers: 8" in text and "split_seed: 0" in text  # the resolved config
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["model.n_registers"].number_value == 8 and hparams["model.loss_type"].string_value == "contrastive"
    assert "_hparams_/session_end_info" in content


def test_tensorboard_missing_is_one_line(store, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    code, _, stderr = invoke("train", "--features", str(store), "--out", str(tmp_path / "run"), "--tensorboard", *BASE)
    assert code == 2 and stderr.strip() == "error: --tensorboard needs the tensorboard package: pip install -e '.[tb]'"
    assert not (tmp_path / "run").exists()


def test_compare_runs_marks_differing_keys_and_plots(swept, tmp_path):
    one, two = (next(t["path"] for t in trials_of(swept).values() if t["params"]["model.n_layers"] == n)
                for n in (1, 2))
    code, stdout, stderr = invoke("compare", str(swept / one), str(swept / two), "--out", str(tmp_path / "cmp"))
    assert code == 0, stderr
    assert "val/R@1" in stdout and "model.n_layers" in stdout and "beta1" not in stdout
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| **model.n_layers** |" in md
    assert (tmp_path / "cmp" / "curves.png").stat().st_size > 5000
    code, stdout, _ = invoke("compare", str(swept), "--all-keys")
    assert code == 0 and "beta1" in stdout and stdout.count("0000") >= 1


def test_compare_reports_and_refuses_other_stages(swept, store, tmp_path):
    run = swept / "trials" / "0000"
    for name in ("a", "b"):
        code, _, stderr = invoke("eval", "--run", str(run), "--features", str(store), "--out", str(tmp_path / name),
                                 "--prefixes", "1,2", "--seed", "0" if name == "a" else "1")
        assert code == 0, stderr
    code, stdout, stderr = invoke("compare", str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == 0, stderr
    assert "R@1 k=2" in stdout and "regtok / best baseline" in stdout and "R@1 linear CCA" in stdout
    code, _, stderr = invoke("compare", str(store))
    assert code == 2 and "is a features manifest" in stderr


def test_shipped_train_configs_hold_only_what_differs():
    from regtok.pipeline.runtime.config_io import load_yaml
    from regtok.pipeline.sweep.space import diff_from_defaults

    root = Path(__file__).resolve().parent.parent / "configs"
    assert resolve(TrainConfig, None, load_yaml(str(root / "default.yaml"))) == TrainConfig()
    for loss in ("contrastive", "flow_matching", "combined"):
        data = load_yaml(str(root / f"{loss}.yaml"))
        cfg = resolve(TrainConfig, None, data)
        assert cfg.model.loss_type == loss
        assert diff_from_defaults(cfg) == ({} if loss == "contrastive" else data)
