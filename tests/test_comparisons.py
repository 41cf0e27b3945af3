"""Comparisons that do not mislead (issue 21): the validation split, how sweeps rank and report trials, seeds as
one row, TensorBoard's HParams data, epoch numbering and units, logs off a terminal, disk use."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import write_store

import regtok.train
from regtok.cli import main
from regtok.config import PRESETS, TrainConfig, resolve, to_dict
from regtok.pipeline.manifests.manifest import file_record, read_manifest, write_manifest
from regtok.pipeline.train.run_load import load_run
from regtok.pipeline.train.runs import kept_record, read_metrics

BASE = ["--preset", "tiny", "--val-fraction", "0.25", "--batch-size", "32"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("cmp_store"), n=160, dim=12)


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def train(store: Path, out: Path, *extra: str) -> Path:
    code, _, err = invoke("train", "--features", store, "--out", out, *BASE, "--epochs", "1", *extra)
    assert code == 0, err
    return out


def recorded_as_written(run: Path) -> None:
    """A run's manifest as an older regtok wrote it with the files the test just rewrote (``load_run`` checks
    them against it): every file's record again, those removed dropped."""
    manifest = read_manifest(run, kind="run")
    manifest["outputs"]["files"] = [file_record(run / r["path"], run) for r in manifest["outputs"]["files"]
                                    if (run / r["path"]).is_file()]
    write_manifest(run / "manifest.json", manifest)


# ── 1: the validation split has its own seed ────────────────────────────────────────────────────────


def test_seeds_share_the_validation_rows_and_old_runs_keep_theirs(store, tmp_path):
    from regtok.pipeline.eval.stage import baseline_training_rows

    runs = {s: train(store, tmp_path / f"seed{s}", "--seed", str(s)) for s in (1, 2)}
    runs[3] = train(store, tmp_path / "own-split", "--seed", "3", "split_seed=3")
    split = {s: read_metrics(r)[0] for s, r in runs.items()}
    assert all(rec["type"] == "split" and rec["val_rows"] == 40 for rec in split.values())
    assert split[1]["val_rows_sha256"] == split[2]["val_rows_sha256"] != split[3]["val_rows_sha256"]
    assert read_manifest(runs[1], kind="run")["split"] == {k: v for k, v in split[1].items() if k not in ("type",
                                                                                                          "step")}
    w1, w2 = (load_run(runs[s]).model.state_dict() for s in (1, 2))
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)  # the seed still changes what is learned
    # a run recorded before split_seed existed split with its seed: it is read back with those rows
    config = json.loads((runs[3] / "config.json").read_text())
    del config["train"]["split_seed"]
    (runs[3] / "config.json").write_text(json.dumps(config))
    recorded_as_written(runs[3])
    old = load_run(runs[3])
    assert old.train_config.split_seed == 3
    from regtok.data import rows_digest
    from regtok.pipeline.extract.store import open_store

    rows = baseline_training_rows(old, open_store(store), runs[3] / "manifest.json", True)
    assert rows_digest(rows) == split[3]["train_rows_sha256"]
    # the eval report names the rows that validated the run, and fits the baselines on exactly its training rows
    code, _, err = invoke("eval", "--run", runs[1], "--features", store, "--out", tmp_path / "rep", "--prefixes", "1,2")
    assert code == 0, err
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["baselines"]["linear"]["train_rows"] == {"n": 120, "sha256": split[1]["train_rows_sha256"],
                                                           "same_as_run": True}
    assert report["evaluated"]["train_store"]["split"]["val_rows_sha256"] == split[1]["val_rows_sha256"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert split[1]["val_rows_sha256"] in md and "exactly the rows the run trained on" in md
    assert "one query moves a recall by 1/N = 0.62 %" in md  # N = 160
    assert "(kept, after epoch 1 of 1, step 3)" in md  # the kept epoch, counted from 1


# ── 2, 4, 10: a sweep ranks by the weights eval uses, says how fine its metric is, and what it keeps ─────────


def scripted_validation(monkeypatch, scores: list[float]) -> None:
    """Every run validates to ``scores`` in turn (before training, after epoch 1, …), whatever it learned."""
    calls = {"n": 0}

    def validate(model, val):
        s = scores[calls["n"] % len(scores)]
        calls["n"] += 1
        return {"val_r1_full_a_to_b": s, "val_r1_full_b_to_a": s, "val_r1_k1_a_to_b": s, "val_r1_k1_b_to_a": s,
                "val_select": s}

    monkeypatch.setattr(regtok.train, "validate", validate)


def test_a_sweep_ranks_the_kept_weights_warns_on_ties_and_keeps_what_eval_needs(store, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [0.5, 0.9, 0.8])  # the best epoch (1) is not the last (2)
    out = tmp_path / "best"
    code, _, err = invoke("sweep", "--features", store, "--out", out, "--grid", "lr=0.001,0.0005", "--no-prune",
                          *BASE, "--epochs", "2")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    for t in report["trials"]:
        assert (t["value"], t["last_value"], t["kept_epoch"], t["val_n"]) == (0.9, 0.8, 1, 40)
        run = out / t["path"]
        assert sorted(p.name for p in run.glob("*.safetensors")) == ["best.safetensors", "buffers.safetensors",
                                                                      "start.safetensors"]  # start: eval's baseline
        assert not (run / "state.pt").exists()
    assert report["validation"] == {"n": 40, "resolution": 0.025, "within_one_step": [0, 1]}
    md = (out / "report.md").read_text()
    assert "N = 40 validation rows: a recall moves in steps of 1/N = 2.5 %" in md
    assert "2 of 2 trials (0, 1) are within one step" in md and "within one step" in err
    assert "| 1 | 0 | complete | 90.0 | 1 | 80.0 |" in md  # kept epoch's score, its epoch, the last epoch's
    trials_bytes = sum(p.stat().st_size for p in (out / "trials").rglob("*") if p.is_file())
    assert report["disk_bytes"] == trials_bytes + sum(p.stat().st_size for p in out.glob("study.db*"))
    assert f"Disk: the trials and the study take {report['disk_bytes'] / 2**20:.1f} MiB (--keep best" in md
    # --keep last: what a resume needs; eval then uses the last weights, so the trial is scored by its last epoch
    out = tmp_path / "last"
    code, _, err = invoke("sweep", "--features", store, "--out", out, "--grid", "lr=0.001", "--no-prune", "--keep",
                          "last", *BASE, "--epochs", "2")
    assert code == 0, err
    (t,) = json.loads((out / "report.json").read_text())["trials"]
    assert (t["value"], t["kept_epoch"]) == (0.8, 2)
    run = out / t["path"]
    assert (run / "state.pt").is_file() and not (run / "best.safetensors").exists()
    assert not (run / "start.safetensors").exists()  # eval fits the start again
    assert load_run(run).weights == "checkpoint.safetensors" and kept_record(run)["epoch"] == 2


# ── 3: best.yaml trains the trial whatever preset it is combined with ────────────────────────────────


def test_best_yaml_reproduces_the_trial_under_every_preset():
    from regtok.pipeline.sweep.report import best_yaml
    from regtok.pipeline.sweep.space import diff_from_defaults

    trial = resolve(TrainConfig, "tiny", {"model": {"n_layers": 4}, "lr": 1e-3})  # n_layers 4 is the default
    assert resolve(TrainConfig, "tiny", diff_from_defaults(trial)).model.n_layers == 1  # what a bare diff did
    data = yaml.safe_load(yaml.safe_dump(best_yaml(trial)))
    for preset in (None, *PRESETS):
        assert resolve(TrainConfig, preset, data) == trial, preset
    assert "beta1" not in data and "device" not in data  # still only what matters


# ── 5, 6, 8: seeds as one row; the HParams experiment; whole lines off a terminal ─────────────────────


@pytest.fixture(scope="module")
def seeds(store, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("seeds") / "sweep"
    code, _, err = invoke("sweep", "--features", store, "--out", out, "--grid", "seed=0,1", "--grid",
                          "model.n_layers=1,2", "--no-prune", "--tensorboard", *BASE, "--epochs", "1")
    assert code == 0, err
    return out, err


def test_trials_that_differ_only_in_seed_are_one_row(seeds):
    out, err = seeds
    report = json.loads((out / "report.json").read_text())
    trials = {t["number"]: t for t in report["trials"]}
    assert len({read_metrics(out / t["path"])[0]["val_rows_sha256"] for t in trials.values()}) == 1  # same rows
    assert len(report["groups"]) == 2
    for g in report["groups"]:
        values = [trials[n]["value"] for n in g["trials"]]
        assert g["n"] == 2 and "seed" not in g["params"]
        assert {trials[n]["params"]["seed"] for n in g["trials"]} == {0, 1}
        assert g["mean"] == pytest.approx(np.mean(values)) and g["std"] == pytest.approx(np.std(values, ddof=1))
    assert report["best"]["number"] in report["groups"][0]["trials"]  # the best configuration's best trial
    md = (out / "report.md").read_text()
    assert "## Over seeds" in md and "mean (%) | ± std | n | trials |" in md
    for line in [ln for ln in err.splitlines() if ln.startswith("trial ")]:  # one whole line per trial
        number, rest = line.removeprefix("trial ").split(": ", 1)
        assert json.loads(rest.split(" % ", 1)[1]) == trials[int(number)]["params"]


def test_compare_puts_a_configuration_per_row_with_its_spread(seeds, tmp_path):
    out, _ = seeds
    code, stdout, err = invoke("compare", out, "--out", tmp_path / "cmp")
    assert code == 0, err
    rows = [ln.split("│")[1:-1] for ln in stdout.splitlines() if ln.startswith("│")]
    assert len(rows) == 2 and all(cells[1].strip() == "2" and " ± " in cells[2] for cells in rows)  # n, mean ± std
    assert "val/select kept (%)" in stdout and "N = 40 validation rows" in stdout
    assert "…" not in stdout  # off a terminal: whole cells
    md = (tmp_path / "cmp" / "compare.md").read_text()
    header = next(ln for ln in md.splitlines() if ln.startswith("| runs |"))
    assert "**model.n_layers**" in header and "seed" not in header and md.count(" ± ") >= 2
    assert (tmp_path / "cmp" / "curves.png").stat().st_size > 5000


def test_the_sweep_writes_the_hparams_experiment(seeds):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, _ = seeds
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/experiment"]).experiment
    assert {h.name for h in experiment.hparam_infos} == {"seed", "model.n_layers"}
    domain = next(h for h in experiment.hparam_infos if h.name == "seed").domain_discrete.values
    assert [v.number_value for v in domain] == [0, 1]
    assert {"kept/select", "kept/epoch", "final/select"} <= {m.name.tag for m in experiment.metric_infos}
    trial = EventAccumulator(str(out / "trials" / "0000" / "tb"))
    trial.Reload()
    assert "_hparams_/session_start_info" in trial.PluginTagToContent("hparams")


def test_sweep_png_draws_the_spread_of_each_choice(seeds, tmp_path, monkeypatch):
    import matplotlib.axes

    from regtok.pipeline.sweep.plot import plot_sweep
    from regtok.pipeline.sweep.space import parse_space

    out, _ = seeds
    report = json.loads((out / "report.json").read_text())
    bars, limits = [], []
    real_errorbar, real_ylim = matplotlib.axes.Axes.errorbar, matplotlib.axes.Axes.set_ylim
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", lambda ax, x, y, **kw: bars.append((x, y, kw["yerr"]))
                        or real_errorbar(ax, x, y, **kw))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylim", lambda ax, *a, **kw: (len(a) == 2 and limits.append(a))
                        or real_ylim(ax, *a, **kw))
    assert plot_sweep(report, parse_space(report["space"], "space"), tmp_path / "sweep.png")
    group = report["groups"][0]
    assert len(bars) == 4  # a mean ± std per choice of each parameter
    assert any(y == pytest.approx(100 * group["mean"]) and e == pytest.approx(100 * group["std"]) for _, y, e in bars)
    assert limits and all(hi <= 100 for _, hi in limits)  # the metric in %, never past 100


# ── 7: one numbering, one unit; 9 and 14: what a user reads first ───────────────────────────────────


def test_a_default_run_on_a_cpu_says_to_use_tiny_and_warns_on_warmup(store, tmp_path):
    small = ["model.hidden_dim=64", "model.embed_dim=64", "model.read_dim=32"]  # still closest to the default
    code, _, err = invoke("train", "--features", store, "--out", tmp_path / "run", "--epochs", "1", *small)
    assert code == 0, err
    assert "note: this is the default preset" in err and "add --preset tiny" in err
    assert "warning: warmup_steps 100 exceeds the run's 1 steps" in err
    line = next(ln for ln in err.splitlines() if ln.startswith("epoch 1/1 step 1:"))  # counted from 1, in %
    assert line.split(" val R@1 ")[1].split("%")[0].replace(".", "").isdigit()
    assert "…" not in err  # tables at their full width off a terminal
    code, _, err = invoke("train", "--features", store, "--out", tmp_path / "gpu", *BASE, "--device", "cuda")
    assert code == 2 and err.strip().splitlines() == ["error: device 'cuda' requested but CUDA is not available here"]


def test_start_lines_stay_quiet_for_a_tiny_run():
    from regtok.pipeline.train.stage import start_lines

    split = SimpleNamespace(data=SimpleNamespace(steps_per_epoch=4, batch_size=32), train_rows=range(128),
                            val_rows=range(32), kind="pooled")
    lines = start_lines(split, resolve(TrainConfig, "tiny"), torch.device("cpu"), 1)
    assert len(lines) == 1 and "20 steps" in lines[0]  # 5 epochs of 4: the tiny warm-up (10) fits
    lines = start_lines(split, resolve(TrainConfig, "tiny", {"warmup_steps": 30}), torch.device("cpu"), 1)
    assert "it peaks at 0.0002" in lines[-1]


def test_plots_keep_recalls_in_range_and_mark_unweighted_terms():
    from unittest.mock import MagicMock

    from regtok.pipeline.train.curves import _loss_line, loss_weights, recall_limits

    assert recall_limits([97.5, 100.0]) == (95.5, 100.0) and recall_limits([0.0, 1.0])[0] == 0.0
    cfg = {**to_dict(resolve(TrainConfig, None, {"model": {"loss_type": "flow_matching"}}).model)}
    weights = loss_weights(cfg)
    assert weights["variance"] == weights["covariance"] == 0 and weights["uniformity"] == 0.5
    assert "contrastive" not in weights and loss_weights({**cfg, "loss_type": "combined"})["uniformity"] == 0.25
    records = [{"type": "epoch", "step": 2, "epoch": 1, "variance": 0.3, "uniformity": -1.0}]
    for term, weight, unused in (("variance", 0.0, True), ("uniformity", 0.5, False)):
        ax = MagicMock()
        _loss_line(ax, records, records, term, "C1", weight)
        kwargs = ax.plot.call_args.kwargs
        assert (kwargs["ls"] == ":") == unused and ("not in the loss" in kwargs["label"]) == unused


def test_compare_curves_follow_the_score_sweeps_rank_by(tmp_path):
    from regtok.pipeline.sweep.compare import _run_entry

    lines = [{"type": "start", "step": 0, "epoch": 0, "val_r1_full_a_to_b": 0.1, "val_r1_full_b_to_a": 0.1,
              "val_r1_flow_a_to_b": 0.3, "val_r1_flow_b_to_a": 0.3, "val_select": 0.3},
             {"type": "epoch", "step": 3, "epoch": 1, "val_r1_full_a_to_b": 0.2, "val_r1_full_b_to_a": 0.2,
              "val_r1_flow_a_to_b": 0.6, "val_r1_flow_b_to_a": 0.6, "val_select": 0.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    entry = _run_entry(tmp_path, {"config": {"model": {"loss_type": "flow_matching"}}, "metrics": {"step": 3}})
    assert entry.curve == [(0, 0.3), (1, 0.6)]  # transported, as val/select ranks a flow run
    # a metrics.jsonl of a version that counted epochs from 0 reads the same
    old = [{**r, "epoch": r["epoch"] - 1} for r in lines]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [0, 1]


# ── 10: fixed buffers once per run ──────────────────────────────────────────────────────────────────


def test_fixed_buffers_are_stored_once_and_runs_without_the_file_still_load(store, tmp_path):
    from safetensors.torch import load_file, save_file

    from regtok.pipeline.train.weights import persistent_buffers

    run = train(store, tmp_path / "run", "--epochs", "2")
    loaded = load_run(run)
    fixed = load_file(str(run / "buffers.safetensors"))
    assert set(fixed) == set(persistent_buffers(loaded.model)) and any("read_basis" in k for k in fixed)
    last, best = (load_file(str(run / name)) for name in ("checkpoint.safetensors", "best.safetensors"))
    assert not set(last) & set(fixed)  # each weights file leaves them out
    refit = set(best) & set(fixed)  # but the decoder maps and mask tokens refitted on the kept weights changed
    assert all(not torch.equal(best[k], fixed[k]) for k in refit)  # (pipeline/train/stage.py: refit_kept_decoders)
    listed = {f["path"] for f in read_manifest(run, kind="run")["outputs"]["files"]}
    assert "buffers.safetensors" in listed
    # a run written before the buffers file: every tensor in each weights file
    for name in ("checkpoint.safetensors", "best.safetensors"):
        save_file({**fixed, **load_file(str(run / name))}, str(run / name), metadata={"step": "6"})
    (run / "buffers.safetensors").unlink()
    recorded_as_written(run)
    again = load_run(run)
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in again.model.state_dict().items())


def test_a_buffer_that_changes_is_kept_in_each_weights_file(tmp_path):
    from regtok.pipeline.train.weights import read_weights, save_checkpoint
    from regtok.train import ResumeState

    model = torch.nn.Linear(2, 2)
    model.register_buffer("fixed", torch.ones(3))
    model.register_buffer("moving", torch.zeros(3))
    save_checkpoint(tmp_path, model, ResumeState(1, {}))
    model.moving += 1
    save_checkpoint(tmp_path, model, ResumeState(2, {}))
    from safetensors.torch import load_file

    assert "moving" in load_file(str(tmp_path / "checkpoint.safetensors"))
    assert "fixed" not in load_file(str(tmp_path / "checkpoint.safetensors"))
    state = read_weights(tmp_path / "checkpoint.safetensors")
    assert torch.equal(state["moving"], torch.ones(3)) and torch.equal(state["fixed"], torch.ones(3))


# ── 14: the shipped config names the method ─────────────────────────────────────────────────────────


def test_default_yaml_names_the_method_and_the_readme_documents_sweep_json():
    root = Path(__file__).resolve().parent.parent
    text = (root / "configs" / "default.yaml").read_text()
    assert "2502.13967" in text and "FlexTok" in text
    assert "shared/000" not in text and "seed's" not in text and "design card" not in text
    readme = (root / "README.md").read_text()
    assert "`sweep.json`" in readme.split("## The pipeline")[1]


def test_eval_reports_of_runs_that_differ_only_in_seed_are_one_row(tmp_path):
    from regtok.pipeline.sweep.compare import _report_entry, tables

    def report(name: str, r1: float, **differs) -> Path:
        row = {"a_to_b": {"R@1": r1}, "b_to_a": {"R@1": r1}}
        data = {"n": 200, "retrieval": [{"k": 2, **row}], "baselines": {}, "headline": {"ratio": 1.0},
                "evaluated": {"preset": "tiny", "differs_from_preset": differs, "eval_store": {"path": "/test"}}}
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(data))
        return tmp_path / name

    entries = [_report_entry(report("a", 0.80, seed=0)), _report_entry(report("b", 0.90, seed=1)),
               _report_entry(report("c", 0.50, **{"model.n_layers": 2}))]
    (table,) = tables(entries)
    assert table.columns[:3] == ["eval reports", "n", "R@1 k=2 (%)"] and "model.n_layers" in table.columns
    assert [row[:3] for row in table.rows] == [["a, b", "2", "85.0 ± 7.1"], ["c", "1", "50.0"]]
    assert table.notes[0] == "N = 200 evaluated pairs: a recall moves in steps of 1/N = 0.5 %"


def test_entries_within_one_validation_step_of_the_best_are_named_as_ties():
    from regtok.pipeline.sweep.spread import tie_warning, within_one_step

    tied = within_one_step({"a": 0.90, "b": 0.895, "c": 0.80}, 100)  # one step = 1/100
    assert tied == ["a", "b"]
    text = tie_warning(tied, 3, 100)
    assert text.startswith("2 of 3 trials (a, b) are within one step (1/N = 1 %, N = 100)")
    assert tie_warning(["a"], 3, 100) is None and within_one_step({"a": 0.9}, None) == []
