"""`regtok eval`: the report dict from a random-init model, and the whole stage through the CLI on tiny stores."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_feature_store

from regtok.cli import main
from regtok.config import PRESETS, ModelConfig, TrainConfig, merge, resolve
from regtok.evaluate import EvalConfig, evaluate
from regtok.model import RegTok
from regtok.pipeline.eval.report_md import render_markdown, small_probe_warning
from regtok.pipeline.manifests.manifest import read_manifest, sha256_file

MODS = ("vision", "tactile")
TOP_KEYS = {"n", "retrieval", "baselines", "flow", "probes", "reconstruction", "modalities"}
METRICS = {"R@1", "R@5", "R@10", "median_rank", "mean_rank"}
SCHEMA = {"material": {"type": "categorical", "classes": ["a", "b", "c"]},
          "hardness": {"type": "continuous", "range": [-3.0, 3.0]}}


def _tiny_model(loss: str = "combined", dims: tuple[int, int] = (12, 12)) -> RegTok:
    cfg = merge(resolve(TrainConfig, "tiny").model, {"loss_type": loss, "n_layers": 1})
    torch.manual_seed(0)
    return RegTok(cfg, {MODS[0]: (1, dims[0]), MODS[1]: (1, dims[1])})


def _data(n: int, dims: tuple[int, int] = (12, 12), seed: int = 0):
    """Two noisy linear views of a shared latent; material = sign pattern of the latent, hardness = a coordinate."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    maps = [rng.normal(size=(4, d)) for d in dims]
    maps[1] = maps[0] if dims[0] == dims[1] else maps[1]  # one map: raw cosine retrieval works when dims match
    feats = {m: (z @ w + 0.3 * rng.normal(size=(n, w.shape[1]))).astype(np.float16)
             for m, w in zip(MODS, maps, strict=True)}
    labels = {"material": np.digitize(z[:, 0], [-0.5, 0.5]).astype(np.int64), "hardness": z[:, 1]}
    return feats, labels


# ── the library: evaluate() on a random-init model ──────────────────────────────────────────────────


def test_report_has_every_key_and_the_documented_shapes() -> None:
    model = _tiny_model()
    feats, labels = _data(120)
    sunk: dict[tuple[str, int], np.ndarray] = {}
    cfg = EvalConfig(prefixes=(1, 2, 4, 8, 16), flow_steps=(1, 2), device="cpu", batch_size=50)
    rep = evaluate(model, feats, labels, SCHEMA, cfg, embeddings_sink=lambda m, k, e: sunk.setdefault((m, k), e))
    assert TOP_KEYS <= set(rep) and rep["n"] == 120 and rep["modalities"] == list(MODS)
    n_shared = model.cfg.n_shared  # tiny: 2 shared of 8 registers
    assert [r["k"] for r in rep["retrieval"]] == [1, 2]  # k <= n_shared; 16 > n_registers is dropped
    for r in rep["retrieval"] + rep["flow"]:
        for d in ("a_to_b", "b_to_a"):
            assert set(r[d]) == METRICS and all(0.0 <= r[d][f"R@{k}"] <= 1.0 for k in (1, 5, 10))
            assert 1.0 <= r[d]["median_rank"] <= 120
    assert [(f["k"], f["steps"]) for f in rep["flow"]] == [(2, 1), (2, 2)]
    assert set(rep["baselines"]) == {"chance", "raw_pooled"} and set(rep["baselines"]["raw_pooled"]) == {
        "a_to_b", "b_to_a"}
    assert rep["baselines"]["chance"]["a_to_b"]["R@1"] == pytest.approx(1 / 120)
    assert rep["baselines"]["raw_pooled"]["a_to_b"]["R@1"] > 5 / 120  # the raw views do share a latent
    probes = {(p["k"], p["modality"], p["group"], p["label"]): p for p in rep["probes"]}
    # raw, shared k=1,2 (it stops at n_shared), private and all at k=4,8 (empty / equal to shared below)
    cells = {("raw", None), ("shared", 1), ("shared", 2), ("private", 4), ("private", 8), ("all", 4), ("all", 8)}
    assert set(probes) == {(k, m, g, label) for g, k in cells for m in MODS for label in SCHEMA}
    for (k, _, group, label), p in probes.items():
        assert p["metric"] == ("accuracy" if label == "material" else "r2") and p["value"] is not None
        assert group == "raw" or k > n_shared or group == "shared"
    assert rep["probe_split"]["train"] + rep["probe_split"]["test"] == 120  # no training rows: a part of this split
    assert {(r["k"], r["modality"]) for r in rep["reconstruction"]} == {(k, m) for k in (1, 2, 4, 8) for m in MODS}
    assert all(-1.0 <= r[key] <= 1.0 for r in rep["reconstruction"]
               for key in ("cosine", "mean_reference", "ridge_reference"))
    assert set(rep["parts"]) >= {"leakage", "complementarity", "shared_kept"}
    assert set(sunk) == {(m, k) for m in MODS for k in (1, 2)}
    e = sunk[("vision", 2)]
    assert e.shape == (120, model.cfg.embed_dim) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    json.dumps(rep)  # JSON-able as it stands


def test_no_flow_head_no_flow_rows_and_mismatched_dims_skip_the_raw_baseline() -> None:
    model = _tiny_model("contrastive", dims=(12, 10))
    feats, labels = _data(60, dims=(12, 10))
    rep = evaluate(model, feats, labels, SCHEMA, EvalConfig(prefixes=(1, 8), device="cpu"))
    assert rep["flow"] == [] and "skipped" in rep["baselines"]["raw_pooled"]
    assert "12 vs 10" in rep["baselines"]["raw_pooled"]["skipped"]


def test_markdown_renders_the_tables() -> None:
    feats, labels = _data(80)
    rep = evaluate(_tiny_model(), feats, labels, SCHEMA, EvalConfig(prefixes=(1, 2, 4), flow_steps=(1,), device="cpu"))
    md = render_markdown(rep)
    for title in ("## Retrieval", "## What each part holds", "## Reconstruction"):
        assert title in md
    tables, block = [], []
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line.count("|"))
        elif block:
            tables, block = [*tables, block], []
    assert len(tables) == 5  # retrieval, parts, probes of each modality, reconstruction
    assert all(len(set(t)) == 1 for t in tables)  # each with rows of one width
    for row in ("| k=1 |", "| k=2 |", "| flow k=2 s=1 |", "| raw pooled |", "| chance |"):
        assert row in md


def test_probe_table_is_one_row_per_label_without_repeated_groups() -> None:
    feats, labels = _data(80)
    rep = evaluate(_tiny_model(), feats, labels, SCHEMA, EvalConfig(prefixes=(1, 2, 4, 8), device="cpu"))
    md = render_markdown(rep)
    probes = md[md.index("## What each part holds"):md.index("## Reconstruction")]
    # tiny: n_shared = 2, so shared stops at k=2, private starts at k=4, and all adds nothing before k=4
    header = ("| label | part | chance | raw input | shared k=1 | shared k=2 | private k=4 | private k=8 | all k=4 | "
              "all k=8 |")
    assert probes.count(header) == 2 and "### vision" in probes and "### tactile" in probes
    rows = [line for line in probes.splitlines() if line.startswith("| material") or line.startswith("| hardness")]
    assert len(rows) == 2 * 2  # one row per label and modality, not one per (label, modality, group)
    by_key = {(p["modality"], p["group"], p["k"], p["label"]): p for p in rep["probes"]}
    material = next(line for line in probes.split("### tactile")[0].splitlines() if line.startswith("| material"))
    cells = [c.strip() for c in material.strip("|").split("|")]
    assert cells[0] == "material (acc %)" and cells[1] == "—"  # SCHEMA names no part
    assert cells[2] == f"{100 * by_key[('vision', 'shared', 1, 'material')]['chance']:.1f}"
    assert cells[3] == f"{100 * by_key[('vision', 'raw', None, 'material')]['value']:.1f}"
    assert cells[7] == f"{100 * by_key[('vision', 'private', 8, 'material')]['value']:.1f}"
    assert "—" not in material.split("|", 3)[3]  # no empty private columns, no repeated shared ones


def test_probes_fitted_on_fewer_than_100_rows_are_warned_about() -> None:
    small = evaluate(_tiny_model(), *_data(80), SCHEMA, EvalConfig(prefixes=(1, 2), device="cpu"))
    assert small["probe_split"]["train"] < 100
    md = render_markdown(small)
    warning = next(line for line in md.splitlines() if line.startswith("> **Warning:**"))
    assert "fewer than 100 rows" in warning and f"material ({small['probe_split']['train']})" in warning
    assert "evaluate on a larger split" in warning and "--probe-max-samples" not in warning  # all rows were used
    capped = evaluate(_tiny_model(), *_data(80), SCHEMA, EvalConfig(prefixes=(1, 2), device="cpu",
                                                                    probe_max_samples=60))
    assert "raise --probe-max-samples" in small_probe_warning(capped)  # only when more rows exist
    large = evaluate(_tiny_model(), *_data(160), SCHEMA, EvalConfig(prefixes=(1, 2), device="cpu"))
    assert large["probe_split"]["train"] >= 100 and "Warning" not in render_markdown(large)


def test_prefix_figure_fits_a_screen_with_every_panel(tmp_path: Path) -> None:
    from PIL import Image

    from regtok.pipeline.eval.plots import plot_prefix  # what eval writes prefix.png with

    feats, labels = _data(80)
    rng = np.random.default_rng(0)
    extra = {f"factor{i:02d}": rng.normal(size=80) for i in range(10)}  # a store with a dozen labels
    schema = {**SCHEMA, **{name: {"type": "continuous"} for name in extra}}
    rep = evaluate(_tiny_model(), feats, {**labels, **extra}, schema, EvalConfig(prefixes=(1, 2, 4, 8),
                                                                                  flow_steps=(1,), device="cpu"))
    with Image.open(plot_prefix(rep, tmp_path / "prefix.png")) as png:  # one panel per label made 6,480 × 432 px
        assert 600 <= png.width <= 1920 and 400 <= png.height <= 1200, png.size
    from regtok.pipeline.eval.plots import prefix_figure

    rep["probes"] = [p for p in rep["probes"] if p["label"] in SCHEMA]
    fig = prefix_figure(rep)
    titles = [ax.get_title() for ax in fig.axes]
    assert "cross-modal retrieval" in titles
    assert {f"{m} · {g}" for m in MODS for g in ("input", "shared", "private", "all")} <= set(titles)
    retrieval = fig.axes[titles.index("cross-modal retrieval")]
    legend = [t.get_text() for t in retrieval.get_legend().get_texts()]
    assert any(t.startswith("regtok vision→tactile") for t in legend)
    assert any(t.startswith("regtok tactile→vision") for t in legend)
    assert any(t.startswith("chance") for t in legend) and any(t.startswith("raw pooled") for t in legend)
    assert retrieval.get_ylim() == (0, 100) and retrieval.get_ylabel() == "R@1 (%)"  # never past 100 %
    shared = fig.axes[titles.index("vision · shared")]
    assert [t.get_text() for t in shared.get_xticklabels()] == ["1", "2"]  # shared stops at n_shared
    first = fig.axes[titles.index("vision · input")]  # the raw input's column comes first and names the rows
    rows = [t.get_text() for t in first.get_yticklabels()]
    assert len(rows) == 2 and all("chance" in r for r in rows)
    assert [t.get_text() for t in first.get_xticklabels()] == ["raw"]
    texts = {t.get_text() for t in shared.texts}  # cells written as in report.md: accuracy in %
    value = next(p["value"] for p in rep["probes"] if (p["modality"], p["group"], p["k"], p["label"]) ==
                 ("vision", "shared", 1, "material"))
    assert f"{100 * value:.0f}" in texts


# ── the stage through the CLI ───────────────────────────────────────────────────────────────────────


def write_store(root: Path, n: int, seed: int, dims: tuple[int, int] = (12, 12), spec: str = "test:linear",
                schema: dict = SCHEMA) -> Path:
    """A two-part feature store of :func:`_data` (written as extract writes one, see conftest)."""
    feats, labels = _data(n, dims, seed)
    return write_feature_store(root, {m: {"pooled": feats[m]} for m in MODS}, labels, [f"s{j:05d}" for j in range(n)],
                               schema, specs=dict.fromkeys(MODS, spec))


def _invoke(*args: str):
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    train = write_store(root / "train_store", n=96, seed=1)
    out = root / "run"
    r = _invoke("train", "--features", str(train), "--out", str(out), "--preset", "tiny", "--epochs", "1",
                "--batch-size", "32", "--loss", "combined", "model.n_layers=1")
    assert r.exit_code == 0, r.output
    return out


def test_eval_cli_writes_every_report_file(run_dir: Path, tmp_path: Path) -> None:
    store = write_store(tmp_path / "heldout", n=64, seed=2)
    out = tmp_path / "report"
    r = _invoke("eval", "--run", str(run_dir), "--features", str(store), "--out", str(out), "--prefixes",
                "1,2,4,8,16,32", "--flow-steps", "1,4", "--save-embeddings", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out / "report.json")
    rep = json.loads((out / "report.json").read_text())
    assert TOP_KEYS <= set(rep) and rep["n"] == 64 and [f["steps"] for f in rep["flow"]] == [1, 4]
    assert {p["label"] for p in rep["probes"]} == {"material", "hardness"}
    md = (out / "report.md").read_text()
    assert "## Retrieval" in md
    assert (out / "prefix.png").read_bytes()[:4] == b"\x89PNG"
    from PIL import Image

    with Image.open(out / "prefix.png") as png:  # 18 panels in one row made 9,720 × 432 px
        assert 600 <= png.width <= 1920 and 400 <= png.height <= 1200, png.size
    # report.md opens with what was evaluated
    head = md[md.index("## What was evaluated"):md.index("## Retrieval")]
    assert f"`{run_dir.resolve()}`" in head and "**combined**" in head and "preset `tiny` with" in head
    assert "n_layers 1" in head and "epochs 1" in head and "batch_size 32" in head
    assert "vision `test:linear` (pooled 12)" in head and "tactile `test:linear`" in head
    train_line = next(line for line in head.splitlines() if line.startswith("- Training store"))
    assert str((run_dir.parent / "train_store").resolve()) in train_line and "N = 96" in train_line
    assert "86 rows trained on, 10 validated on" in train_line
    assert f"- Evaluation store: `{store.resolve()}`, N = 64" in head
    ev = rep["evaluated"]
    assert ev["preset"] == "tiny" and ev["loss_type"] == "combined" and ev["differs_from_preset"]["epochs"] == 1
    with h5py.File(out / "embeddings.h5") as f:
        width = PRESETS["tiny"]["model"]["embed_dim"]
        assert f["vision/k2"].shape == (64, width) and f["tactile/k1"].dtype == np.float32
        assert [k.decode() for k in f["keys"][:3]] == ["s00000", "s00001", "s00002"]
    m = read_manifest(out / "manifest.json", kind="eval")
    roles = {i["role"]: i for i in m["inputs"]}
    assert roles["run"]["sha256"] == sha256_file(run_dir / "manifest.json")
    assert roles["features"]["sha256"] == sha256_file(store / "manifest.json")
    assert {Path(f["path"]).name for f in m["outputs"]["files"]} >= {"report.json", "report.md", "embeddings.h5"}


@pytest.mark.parametrize("change", ["dims", "spec", "classes"])
def test_incompatible_features_are_a_one_line_error(run_dir: Path, tmp_path: Path, change: str) -> None:
    shifted = {**SCHEMA, "material": {"type": "categorical", "classes": ["b", "c"]}}  # a split packed without "a"
    kwargs = {"dims": {"dims": (12, 10)}, "spec": {"spec": "test:other"}, "classes": {"schema": shifted}}[change]
    store = write_store(tmp_path / "other", n=40, seed=3, **kwargs)
    r = _invoke("eval", "--run", str(run_dir), "--features", str(store), "--out", str(tmp_path / "rep"))
    assert r.exit_code == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    expected = {"dims": "expects", "spec": "encoder differs", "classes": "label 'material' differs from"}[change]
    assert expected in r.stderr and (change != "classes" or "--labels-from" in r.stderr)


def test_model_config_is_what_the_report_prefixes_follow() -> None:
    assert ModelConfig().n_shared == 8  # the default plan: retrieval at 1, 2, 4, 8; probes up to 32
    from regtok.evaluate import prefix_plan

    assert prefix_plan(EvalConfig(), 32, 8) == ([1, 2, 4, 8, 16, 32], [1, 2, 4, 8])
    assert prefix_plan(EvalConfig(), 8, 2) == ([1, 2, 4, 8], [1, 2])
    assert prefix_plan(EvalConfig(prefixes=(16, 32)), 32, 8) == ([16, 32], [8])  # whole shared embedding


def test_retrieval_at_n_shared_when_no_prefix_is_that_small() -> None:
    feats, labels = _data(40)
    rep = evaluate(_tiny_model(), feats, labels, SCHEMA, EvalConfig(prefixes=(4, 8), flow_steps=(1,), device="cpu"))
    assert [r["k"] for r in rep["retrieval"]] == [2] and [f["k"] for f in rep["flow"]] == [2]
    assert {p["k"] for p in rep["probes"]} == {None, 2, 4, 8} and {r["k"] for r in rep["reconstruction"]} == {4, 8}
    assert {p["k"] for p in rep["probes"] if p["group"] == "shared"} == {2}  # the whole shared part, for leakage


def test_token_features_with_pooled_features_for_the_baseline() -> None:
    cfg = merge(resolve(TrainConfig, "tiny").model, {"n_layers": 1})
    model = RegTok(cfg, {m: (3, 12) for m in MODS})
    pooled, labels = _data(50)
    rng = np.random.default_rng(0)
    tokens = {m: (pooled[m][:, None, :] + rng.normal(size=(50, 3, 12))).astype(np.float16) for m in MODS}
    rep = evaluate(model, tokens, labels, SCHEMA, EvalConfig(prefixes=(2, 4), device="cpu"), pooled=pooled)
    assert "a_to_b" in rep["baselines"]["raw_pooled"] and rep["flow"] == []
    bare = evaluate(model, tokens, labels, SCHEMA, EvalConfig(prefixes=(2,), device="cpu"))
    assert "tokens" in bare["baselines"]["raw_pooled"]["skipped"]


def test_eval_reports_linear_baselines_fitted_on_the_run_training_rows(run_dir: Path, tmp_path: Path) -> None:
    store = write_store(tmp_path / "heldout", n=64, seed=2)
    out = tmp_path / "report"
    r = _invoke("eval", "--run", str(run_dir), "--features", str(store), "--out", str(out), "--device", "cpu")
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    linear = rep["baselines"]["linear"]
    names = ("cca", "weighted_cca", "start", "linear_infonce", "mlp_infonce")
    assert set(linear) == {*names, "store", "train_rows"}
    assert Path(linear["store"]).resolve() == (run_dir.parent / "train_store").resolve()
    for name in names:
        assert set(linear[name]["a_to_b"]) == METRICS and set(linear[name]["b_to_a"]) == METRICS
    # the run validated on 10 % of its store: the baselines, probes and references use exactly the other 90 %
    assert linear["cca"]["fit"]["train_rows"] == 96 - round(96 * 0.1) == rep["probe_split"]["train"]
    assert linear["mlp_infonce"]["fit"]["hidden"] > 0 and linear["mlp_infonce"]["fit"]["dropout"] > 0
    h = rep["headline"]
    best = max(names, key=lambda n: linear[n]["a_to_b"]["R@1"] + linear[n]["b_to_a"]["R@1"])
    assert h["best_baseline"] == best and h["ratio"] == pytest.approx(h["regtok"] / h["baseline"])
    assert h["below_baseline"] == (h["regtok"] < h["baseline"])
    md = (out / "report.md").read_text()
    for row in ("| linear CCA |", "| weighted CCA (ρ^p) |", "| regtok at its start |", "| linear InfoNCE head |",
                "| MLP InfoNCE head |"):
        assert row in md
    assert "## Against the baselines" in md and ("BELOW its best baseline" in md) == h["below_baseline"]
    assert "best baseline" in r.stderr  # the terminal summary says it too
    eval_manifest = read_manifest(out / "manifest.json", kind="eval")
    assert "fit_features" in {ref["role"] for ref in eval_manifest["inputs"]}


def test_the_start_baseline_loads_the_saved_start_and_equals_the_start_fitted_again(run_dir: Path,
                                                                                  tmp_path: Path) -> None:
    from regtok.pipeline.eval.stage import StoreColumn, fit_store, start_retrieval
    from regtok.pipeline.extract import open_store
    from regtok.pipeline.train import load_run

    run = load_run(run_dir)
    recorded = {r["path"] for r in read_manifest(run_dir / "manifest.json", kind="run")["outputs"]["files"]}
    assert "start.safetensors" in recorded  # so load_run checks its sha256 like every weights file
    start = load_run(run_dir, weights="start")
    assert start.step == 0 and start.weights == "start.safetensors"
    trained = dict(run.model.named_parameters())
    assert any(not torch.equal(p, trained[k]) for k, p in start.model.named_parameters())  # it is not the trained
    store = open_store(write_store(tmp_path / "heldout", n=64, seed=2))
    fit = fit_store(run, store, None, run_dir / "manifest.json")
    test = {m: StoreColumn(store, run.feature_kind, m) for m in MODS}
    loaded = start_retrieval(run, fit, test, EvalConfig(device="cpu"))
    older = dataclasses.replace(run, run_dir=None)  # as a run trained before start.safetensors: rebuilt
    rebuilt = start_retrieval(older, fit, test, EvalConfig(device="cpu"))
    assert loaded["fit"] == {"k": 2, "weights": "start.safetensors"}
    assert rebuilt["fit"] == {"k": 2, "weights": "rebuilt", "rows": 86}
    for direction in ("a_to_b", "b_to_a"):
        assert loaded[direction] == rebuilt[direction]


def test_no_baselines_skips_them_and_baseline_features_names_another_store(run_dir: Path, tmp_path: Path) -> None:
    store = write_store(tmp_path / "heldout", n=64, seed=2)
    r = _invoke("eval", "--run", str(run_dir), "--features", str(store), "--out", str(tmp_path / "a"),
                "--no-baselines")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert rep["baselines"]["linear"] == {"skipped": "--no-baselines"} and "baseline" not in rep["headline"]
    other = write_store(tmp_path / "other", n=80, seed=3)
    r = _invoke("eval", "--run", str(run_dir), "--features", str(store), "--out", str(tmp_path / "b"),
                "--baseline-features", str(other))
    assert r.exit_code == 0, r.output
    linear = json.loads((tmp_path / "b" / "report.json").read_text())["baselines"]["linear"]
    assert Path(linear["store"]).resolve() == other.resolve() and linear["cca"]["fit"]["train_rows"] == 80
    bad = write_store(tmp_path / "bad", n=40, seed=3, dims=(12, 10))
    r = _invoke("eval", "--run", str(run_dir), "--features", str(store), "--out", str(tmp_path / "c"),
                "--fit-features", str(bad))
    assert r.exit_code == 2 and r.output.startswith("error: fit features")
