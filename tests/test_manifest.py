"""The manifest schema, lineage walking and hash verification."""

from __future__ import annotations

import json

import pytest

from regtok.config import PRESETS, ModelConfig, TrainConfig, from_dict, merge, resolve, to_dict
from regtok.errors import RegtokError
from regtok.pipeline.lineage.chain import lineage, verify
from regtok.pipeline.manifests.manifest import (
    ManifestError,
    file_record,
    input_ref,
    new_manifest,
    read_manifest,
    write_manifest,
)
from regtok.pipeline.runtime.config_io import parse_overrides


def _chain(tmp_path):
    """dataset.json ← features/manifest.json ← run/manifest.json, each with one output file."""
    (tmp_path / "data").mkdir()
    shard = tmp_path / "data" / "shard-000000.tar"
    shard.write_bytes(b"tar bytes")
    ds = new_manifest("dataset", command=["regtok", "synth"], config={"seed": 0},
                      shards=[file_record(shard, tmp_path / "data")], samples=1)
    write_manifest(tmp_path / "data" / "dataset.json", ds)
    feats = tmp_path / "store"
    feats.mkdir()
    (feats / "features.h5").write_bytes(b"h5")
    fm = new_manifest("features", inputs=[input_ref("dataset", tmp_path / "data" / "dataset.json", feats)],
                      outputs={"files": [file_record(feats / "features.h5", feats)]}, samples=1)
    write_manifest(feats / "manifest.json", fm)
    run = tmp_path / "run"
    run.mkdir()
    rm = new_manifest("run", inputs=[input_ref("features", feats / "manifest.json", run)])
    write_manifest(run / "manifest.json", rm)
    return tmp_path


def test_roundtrip_and_common_fields(tmp_path):
    m = new_manifest("features", command=["regtok", "extract"], config={"a": 1}, samples=3)
    write_manifest(tmp_path / "manifest.json", m)
    back = read_manifest(tmp_path, kind="features")
    assert back == json.loads((tmp_path / "manifest.json").read_text())
    for key in ("kind", "schema_version", "command", "config", "inputs", "outputs", "environment", "timings"):
        assert key in back
    assert back["environment"]["torch"] is not None and back["environment"]["python"]


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"kind": "features"}', "missing field"),
])
def test_corrupt_manifest_is_a_clear_error(tmp_path, text, message):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path / "manifest.json")


def test_wrong_kind_and_schema(tmp_path):
    m = new_manifest("run")
    write_manifest(tmp_path / "manifest.json", m)
    with pytest.raises(ManifestError, match="expected features"):
        read_manifest(tmp_path, kind="features")
    m["schema_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="schema_version"):
        read_manifest(tmp_path)


def test_verify_detects_changed_and_missing(tmp_path):
    root = _chain(tmp_path)
    assert {c.status for c in verify(root / "store")} == {"ok"}
    (root / "store" / "features.h5").write_bytes(b"tampered")
    statuses = {c.recorded: c.status for c in verify(root / "store")}
    assert statuses["features.h5"] == "changed"
    (root / "data" / "shard-000000.tar").unlink()
    assert [c.status for c in verify(root / "data" / "dataset.json")] == ["missing"]


def test_lineage_walks_back_to_dataset(tmp_path):
    root = _chain(tmp_path)
    node = lineage(root / "run")
    assert node.manifest["kind"] == "run" and node.status == "ok"
    (feat,) = node.parents
    assert feat.manifest["kind"] == "features" and feat.status == "ok"
    (ds,) = feat.parents
    assert ds.manifest["kind"] == "dataset" and ds.parents == []
    # Editing an upstream manifest shows up as a changed link.
    text = (root / "store" / "manifest.json").read_text().replace('"samples": 1', '"samples": 2')
    (root / "store" / "manifest.json").write_text(text)
    assert lineage(root / "run").parents[0].status == "changed"


def test_config_resolution_order_and_unknown_keys(tmp_path):
    cfg = resolve(TrainConfig, "tiny", {"lr": 1e-2}, parse_overrides(["model.n_layers=3", "epochs=7"]))
    assert cfg.lr == 1e-2 and cfg.model.n_layers == 3 and cfg.epochs == 7
    assert cfg.model.hidden_dim == PRESETS["tiny"]["model"]["hidden_dim"] != ModelConfig().hidden_dim  # from the preset
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg
    with pytest.raises(RegtokError, match="unknown config key 'model.n_layyers'"):
        merge(cfg, {"model": {"n_layyers": 2}})
    with pytest.raises(RegtokError, match="must be int"):
        merge(cfg, {"epochs": "many"})
    with pytest.raises(RegtokError, match="loss_type"):
        ModelConfig(loss_type="magic")
    with pytest.raises(RegtokError, match="key=value"):
        parse_overrides(["lr"])
