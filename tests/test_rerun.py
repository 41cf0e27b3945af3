"""`regtok demo`, `show`, `verify` and `rerun` on one small demo pipeline (200 + 100 pairs, tiny encoders with
token features, the tiny preset for one epoch, on the CPU).

rerun reproduces every kind of stage exactly; a tampered record is a difference (exit 1) that is named; and a
manifest is data, never code: `pipe:` shard specs, paths outside the manifest's tree, edited or corrupted
manifests and checkpoints that need unpickling are each refused with one line and exit 2, before anything runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import one_line_error

from regtok.cli import main

STAGES = ("shards-train", "shards-test", "features-train", "features-test", "run", "eval")
MANIFESTS = ("shards-train/dataset.json", "shards-test/dataset.json", "features-train/manifest.json",
             "features-test/manifest.json", "run/manifest.json", "eval/manifest.json")


def manifest_of(stage: Path) -> Path:
    return stage / ("dataset.json" if (stage / "dataset.json").is_file() else "manifest.json")


def regtok(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Result]:
    root = tmp_path_factory.mktemp("demo") / "regtok-demo"
    result = regtok("demo", "--out", root, "--samples", "200", "--epochs", "1")
    assert result.exit_code == 0, (result.output, result.exception)
    return root, result


def test_demo_writes_every_manifest_and_prints_the_summary(demo):
    root, result = demo
    for name in MANIFESTS:
        m = json.loads((root / name).read_text())
        assert m["kind"] == {"shards": "dataset", "featur": "features", "run/ma": "run", "eval/m": "eval"}[name[:6]]
        assert str(root / name) in result.stderr  # every manifest's path is in the summary
    assert "cross-modal R@1 (mean of both directions, N = 100)" in result.stderr
    assert "material class from vision's shared registers" in result.stderr
    assert "leakage" in result.stderr and "complementarity" in result.stderr  # the split, from the fixed probes
    assert "reconstruction cosine at k=8" in result.stderr and "per-position mean" in result.stderr
    assert json.loads((root / "features-train/manifest.json").read_text())["samples"] == 200
    assert (root / "eval" / "report.md").is_file()
    assert result.stdout.strip() == str(root / "eval" / "report.md")  # stdout carries the result


def test_demo_refuses_to_overwrite_without_the_flag(demo):
    root, _ = demo
    before = {p: p.stat().st_mtime_ns for p in root.rglob("manifest.json")}
    line = one_line_error(regtok("demo", "--out", root, "--samples", "200", "--epochs", "1"))
    assert "--overwrite" in line
    assert {p: p.stat().st_mtime_ns for p in root.rglob("manifest.json")} == before  # nothing touched


@pytest.mark.parametrize("stage", ["shards-train", "features-test", "run", "eval"])
def test_rerun_reproduces_each_kind(demo, tmp_path, stage):
    root, _ = demo
    result = regtok("rerun", root / stage, "--out", tmp_path / "re")
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout.strip() == str(tmp_path / "re")
    assert "reproduced" in result.stderr and "DIFFERS" not in result.stderr
    kind = json.loads(manifest_of(root / stage).read_text())["kind"]
    expected = {"dataset": "shard-000003.tar", "features": "array /", "run": "weights identical", "eval": "report"}
    assert expected[kind] in result.stderr


def test_rerun_never_writes_over_a_result(demo):
    root, _ = demo
    before = (root / "run" / "checkpoint.safetensors").read_bytes()
    assert "not empty" in one_line_error(regtok("rerun", root / "run", "--out", root / "run"))
    assert "not empty" in one_line_error(regtok("rerun", root / "run", "--out", root / "eval"))
    assert (root / "run" / "checkpoint.safetensors").read_bytes() == before


def test_rerun_names_a_tampered_shard_hash(demo, tmp_path):
    root, _ = demo
    shutil.copytree(root / "shards-test", tmp_path / "shards")
    path = tmp_path / "shards" / "dataset.json"
    m = json.loads(path.read_text())
    m["shards"][0]["sha256"] = "0" * 64
    path.write_text(json.dumps(m))
    result = regtok("rerun", path, "--out", tmp_path / "re")
    assert result.exit_code == 1, result.output
    assert "DIFFERS" in result.stderr and m["shards"][0]["path"] in result.stderr
    assert "NOT reproduced" in result.stderr


def test_rerun_of_a_report_from_an_older_eval_method_says_so_first(demo, tmp_path):
    root, _ = demo
    older = root / "eval-method-1"  # beside the demo's report, so its manifest's relative inputs still resolve
    shutil.copytree(root / "eval", older)
    try:
        report = json.loads((older / "report.json").read_text())
        assert report.pop("eval_method") == 2
        (older / "report.json").write_text(json.dumps(report))
        result = regtok("rerun", older, "--out", tmp_path / "re")
    finally:
        shutil.rmtree(older)
    assert result.exit_code == 1, result.output
    assert "eval method" in result.stderr and "made by eval method 1" in result.stderr and "by design" in result.stderr
    assert "report.eval_method only in rerun" in result.stderr


def test_rerun_run_outside_the_tree_and_a_changed_weight(demo, tmp_path):
    """A copied run reads the demo's features: outside its tree, so refused unless --allow-outside; then a
    changed weight in the recorded checkpoint is a named difference."""
    import torch
    from safetensors.torch import load_file, save_file

    root, _ = demo
    run = tmp_path / "elsewhere" / "run"
    shutil.copytree(root / "run", run)
    line = one_line_error(regtok("rerun", run, "--out", tmp_path / "re0"))
    assert "outside the manifest's tree" in line and "--allow-outside" in line
    assert not (tmp_path / "re0").exists() or not any((tmp_path / "re0").iterdir())
    assert regtok("rerun", run, "--allow-outside", "--out", tmp_path / "re1").exit_code == 0

    weights = load_file(str(run / "checkpoint.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + torch.full_like(weights[name], 1e-3)
    save_file(weights, str(run / "checkpoint.safetensors"))
    result = regtok("rerun", run, "--allow-outside", "--out", tmp_path / "re2")
    assert result.exit_code == 1, result.output
    assert "weights identical" in result.stderr and name in result.stderr and "DIFFERS" in result.stderr


def test_rerun_of_a_gpu_run_compares_metrics_within_the_tolerance(demo, tmp_path):
    """A run recorded on another device is compared by its final metrics (within METRIC_TOLERANCE)."""
    from regtok.pipeline.lineage.rerun import METRIC_TOLERANCE

    root, _ = demo
    run = root / f"gpu-run-{tmp_path.name}"
    shutil.copytree(root / "run", run)
    m = json.loads((run / "manifest.json").read_text())
    m["environment"]["device"] = "cuda:0"
    (run / "manifest.json").write_text(json.dumps(m))
    result = regtok("rerun", run, "--out", tmp_path / "re0")
    assert result.exit_code == 0 and f"within {METRIC_TOLERANCE}" in result.stderr, result.output
    m["metrics"]["loss"] += 2 * METRIC_TOLERANCE
    (run / "manifest.json").write_text(json.dumps(m))
    result = regtok("rerun", run, "--out", tmp_path / "re1")
    assert result.exit_code == 1 and "metrics.loss" in result.stderr, result.output


def _edited_features(demo_root: Path, tmp_path: Path, edit) -> Path:
    """A copy of the training store's manifest, inside the demo's tree, with ``edit(manifest)`` applied (beside
    links to the store's index and parts, which rerun compares against)."""
    path = demo_root / f"edited-{tmp_path.name}" / "manifest.json"
    path.parent.mkdir()
    for name in ("features.h5", "parts"):
        (path.parent / name).symlink_to(demo_root / "features-train" / name)
    m = json.loads((demo_root / "features-train" / "manifest.json").read_text())
    edit(m)
    path.write_text(json.dumps(m))
    return path


def test_rerun_refuses_pipe_shards_and_runs_nothing(demo, tmp_path):
    root, _ = demo
    witness = tmp_path / "pwned"
    path = _edited_features(root, tmp_path, lambda m: m["config"].update(shards=f"pipe:touch {witness}"))
    line = one_line_error(regtok("rerun", path, "--out", tmp_path / "re"))
    assert "pipe:" in line
    assert not witness.exists() and not (tmp_path / "re").exists()


def test_rerun_refuses_a_checkpoint_that_needs_unpickling(demo, tmp_path):
    import torch

    root, _ = demo
    witness = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(witness), "w"))  # unpickling this creates the witness file

    evil = root / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Evil()}, evil)
    assert not witness.exists()

    def edit(m):
        m["config"]["encoders"] = [["vision", f"timm:vit_tiny_patch16_224@{evil}"], ["tactile", "tiny:1"]]

    line = one_line_error(regtok("rerun", _edited_features(root, tmp_path, edit), "--out", tmp_path / "re"))
    assert "unpickle" in line
    assert not witness.exists()


def test_rerun_refuses_relative_weights_outside_the_tree(demo, tmp_path):
    """A relative weights path (resolved from the working directory, here the checkout) is guarded too:
    one that climbs out of the working directory and of the manifest's tree is refused."""
    root, _ = demo

    def edit(m):
        m["config"]["encoders"] = [["vision", "timm:vit_tiny_patch16_224@../elsewhere/w.pth"], ["tactile", "tiny:1"]]

    line = one_line_error(regtok("rerun", _edited_features(root, tmp_path, edit), "--out", tmp_path / "re"))
    assert "outside the manifest's tree" in line and "../elsewhere/w.pth" in line


@pytest.mark.parametrize("case", ["invalid json", "missing field", "config not a mapping", "encoders wrong type",
                                  "batch size wrong type", "shards list wrong type", "eval without its run"])
def test_rerun_edited_manifest_is_one_line(demo, tmp_path, case):
    root, _ = demo
    stage = {"shards list wrong type": "shards-test", "eval without its run": "eval"}.get(case, "features-test")
    path = tmp_path / stage / manifest_of(root / stage).name
    path.parent.mkdir()
    text = manifest_of(root / stage).read_text()
    m = json.loads(text)
    if case == "invalid json":
        text = text[: len(text) // 2]
    else:
        if case == "missing field":
            del m["config"]
        elif case == "config not a mapping":
            m["config"] = [1, 2]
        elif case == "encoders wrong type":
            m["config"]["encoders"] = {"vision": 5, "tactile": None}
        elif case == "batch size wrong type":
            m["config"]["batch_size"] = "lots"
        elif case == "shards list wrong type":
            m["shards"] = 7
        elif case == "eval without its run":
            m["inputs"] = [r for r in m["inputs"] if r["role"] not in ("run", "run_config")]
        text = json.dumps(m)
    path.write_text(text)
    one_line_error(regtok("rerun", path, "--allow-outside", "--out", tmp_path / "re"))


def test_show_prints_the_chain_back_to_the_shards(demo):
    root, _ = demo
    result = CliRunner(env={"COLUMNS": "400"}).invoke(main, ["show", str(root / "eval")])
    assert result.exit_code == 0, result.output
    out = result.stdout
    chain = [str(root / "eval/manifest.json"), str(root / "run/manifest.json"),
             str(root / "features-train/manifest.json"), str(root / "shards-train/dataset.json"),
             "shards: shard-000000.tar, shard-000001.tar, shard-000002.tar, shard-000003.tar (4)"]
    positions = [out.find(item) for item in chain]
    assert -1 not in positions and positions == sorted(positions), out
    assert str(root / "features-test/manifest.json") in out and "changed" not in out and "missing" not in out


def test_verify_reports_a_changed_file(demo, tmp_path):
    root, _ = demo
    shutil.copytree(root / "shards-test", tmp_path / "shards")
    ok = regtok("verify", tmp_path / "shards")
    assert ok.exit_code == 0 and ok.stdout.startswith("ok"), ok.output
    shard = tmp_path / "shards" / json.loads((tmp_path / "shards" / "dataset.json").read_text())["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    bad = regtok("verify", tmp_path / "shards")
    assert bad.exit_code == 1
    assert [line.split()[0] for line in bad.stdout.splitlines()] == ["changed"]
    assert shard.name in bad.stdout and "0/1 files match" in bad.stderr
