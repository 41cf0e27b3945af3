"""regtok pack: a TVL/SSVTP-style CSV of relative image paths becomes shards; bad rows are skipped and listed."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from regtok.cli import main
from regtok.pipeline.data.shards import iter_shard
from regtok.pipeline.manifests.manifest import read_manifest, sha256_file


def _image(path, seed, fmt):
    rgb = np.random.default_rng(seed).integers(0, 255, size=(12, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


@pytest.fixture
def tvl(tmp_path):
    """root/images/…: rows 1, 2, 4, 5 are good; row 3 lacks its tactile image; row 6's vision image is garbage."""
    root = tmp_path / "data"
    rows = []
    materials = ["wood", "metal", "wood", "fabric", "metal", "wood"]
    for i, material in enumerate(materials, start=1):
        vision, tactile = f"images/{i}/rgb.jpg", f"images/{i}/tac.png"
        _image(root / vision, i, "JPEG")
        if i != 3:
            _image(root / tactile, 100 + i, "PNG")
        rows.append({"url": vision, "tactile": tactile, "caption": f"surface {i}, rough",
                     "material": material, "force": str(0.5 * i)})
    (root / "images/6/rgb.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["url", "tactile", "caption", "material", "force"])
        writer.writeheader()
        writer.writerows(rows)
    return path, root


def _pack(csv_path, root, out, *extra):
    args = ["pack", str(csv_path), "--root", str(root), "--out", str(out), "--label-col", "material",
            "--label-col", "force", *extra]
    return CliRunner().invoke(main, args)


def test_pack_copies_images_and_labels_and_lists_skipped_rows(tvl, tmp_path):
    csv_path, root = tvl
    result = _pack(csv_path, root, tmp_path / "out", "--samples-per-shard", "3")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "out" / "dataset.json")
    assert "skipped 2" in result.stderr
    m = read_manifest(tmp_path / "out" / "dataset.json", kind="dataset")
    assert m["samples"] == 4 and [s["samples"] for s in m["shards"]] == [3, 1]
    assert [(s["row"], s["reason"].split()[0]) for s in m["skipped"]] == [(3, "missing"), (6, "unreadable")]
    assert m["labels"]["material"] == {"type": "categorical", "classes": ["fabric", "metal", "wood"]}
    # label classes and ranges come from the packed rows only: row 6 (force 3.0) is skipped
    assert m["labels"]["force"] == {"type": "continuous", "range": [0.5, 2.5]}
    assert m["source"]["rows"] == 6 and m["modalities"] == ["vision", "tactile"]
    assert m["inputs"][0]["sha256"] == sha256_file(csv_path)

    samples = [s for shard in m["shards"] for s in iter_shard(tmp_path / "out" / shard["path"])]
    assert [s.key for s in samples] == ["000001", "000002", "000004", "000005"]
    first = samples[0]
    assert set(first.files) == {"vision.jpg", "tactile.png", "json"}
    assert first.files["vision.jpg"] == (root / "images/1/rgb.jpg").read_bytes()  # bytes copied, not re-encoded
    assert first.files["tactile.png"] == (root / "images/1/tac.png").read_bytes()
    record = json.loads(samples[2].files["json"])
    assert record["caption"] == "surface 4, rough" and record["row"] == 4
    assert record["material"] == 0 and record["material_name"] == "fabric" and record["force"] == 2.0


def test_pack_reads_back_with_webdataset(tvl, tmp_path):
    wds = pytest.importorskip("webdataset")
    csv_path, root = tvl
    assert _pack(csv_path, root, tmp_path / "out").exit_code == 0
    got = list(wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in got] == ["000001", "000002", "000004", "000005"]
    assert all({"vision.jpg", "tactile.png", "json"} <= set(s) for s in got)


def test_pack_is_deterministic(tvl, tmp_path):
    csv_path, root = tvl
    a, b = _pack(csv_path, root, tmp_path / "a"), _pack(csv_path, root, tmp_path / "b")
    assert a.exit_code == b.exit_code == 0
    assert (tmp_path / "a/shard-000000.tar").read_bytes() == (tmp_path / "b/shard-000000.tar").read_bytes()


@pytest.mark.parametrize("case", ["bad column", "bad label column", "missing csv", "missing root"])
def test_user_errors_are_one_line_and_exit_2(tvl, tmp_path, case):
    csv_path, root = tvl
    if case == "bad column":
        result = _pack(csv_path, root, tmp_path / "out", "--tactile-col", "gelsight")
        expected = "no column 'gelsight'"
    elif case == "bad label column":
        result = _pack(csv_path, root, tmp_path / "out", "--label-col", "hardness")
        expected = "no column 'hardness'"
    elif case == "missing csv":
        result = _pack(tmp_path / "nope.csv", root, tmp_path / "out")
        expected = "CSV not found"
    else:
        result = _pack(csv_path, tmp_path / "nowhere", tmp_path / "out")
        expected = "image root"
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_a_csv_whose_rows_all_fail_is_an_error(tvl, tmp_path):
    csv_path, _ = tvl
    result = _pack(csv_path, tmp_path, tmp_path / "out")  # wrong root: every image is missing
    assert result.exit_code == 2 and "no row could be packed" in result.stderr


def _split(tmp_path, name, materials, broken=(), captions=None):
    """A CSV ``name``: row i has material ``materials[i - 1]``; rows in ``broken`` lack their tactile image."""
    root = tmp_path / "data"
    rows = []
    for i, material in enumerate(materials, start=1):
        vision, tactile = f"{name}/{i}/rgb.jpg", f"{name}/{i}/tac.png"
        _image(root / vision, i, "JPEG")
        if i not in broken:
            _image(root / tactile, 100 + i, "PNG")
        rows.append({"url": vision, "tactile": tactile, "material": material, "force": str(i),
                     "caption": captions[i - 1] if captions else f"row {i}"})
    path = tmp_path / f"{name}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["url", "tactile", "material", "force", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return path, root


def _records(out):
    m = read_manifest(out / "dataset.json", kind="dataset")
    return m, [json.loads(s.files["json"]) for shard in m["shards"] for s in iter_shard(out / shard["path"])]


def test_only_packed_rows_enter_the_schema(tmp_path):
    csv_path, root = _split(tmp_path, "train", ["wood", "metal", "glass", "wood"], broken=(3,))
    assert _pack(csv_path, root, tmp_path / "out").exit_code == 0
    m, records = _records(tmp_path / "out")
    assert m["labels"]["material"]["classes"] == ["metal", "wood"]  # glass only on the skipped row
    assert m["labels"]["force"]["range"] == [1.0, 4.0] and [r["material"] for r in records] == [1, 0, 1]


def test_labels_from_gives_every_split_the_same_indices(tmp_path):
    train_csv, root = _split(tmp_path, "train", ["wood", "metal", "fabric", "metal"])
    test_csv, _ = _split(tmp_path, "test", ["metal", "wood", "glass"], broken=(3,))  # no fabric; glass is skipped
    assert _pack(train_csv, root, tmp_path / "train").exit_code == 0
    train = tmp_path / "train" / "dataset.json"
    result = CliRunner().invoke(main, ["pack", str(test_csv), "--root", str(root), "--out", str(tmp_path / "test"),
                                       "--labels-from", str(train)])
    assert result.exit_code == 0, result.output
    m, records = _records(tmp_path / "test")
    assert m["labels"] == read_manifest(train, kind="dataset")["labels"]  # its labels are the default --label-col
    assert [(r["material"], r["material_name"]) for r in records] == [(1, "metal"), (2, "wood")]
    assert m["config"]["labels_from"] == str(train) and m["inputs"][1]["role"] == "labels_from"
    assert m["inputs"][1]["sha256"] == sha256_file(train) and "--labels-from" in m["command"]


def test_labels_from_refuses_a_class_the_training_split_lacks(tmp_path):
    train_csv, root = _split(tmp_path, "train", ["wood", "metal"])
    test_csv, _ = _split(tmp_path, "test", ["metal", "glass"])
    assert _pack(train_csv, root, tmp_path / "train").exit_code == 0
    result = CliRunner().invoke(main, ["pack", str(test_csv), "--root", str(root), "--out", str(tmp_path / "test"),
                                       "--labels-from", str(tmp_path / "train" / "dataset.json"), "--label-col",
                                       "material"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()  # the images are checked first: the progress line comes before
    assert lines[-1].startswith("error: row 2: material 'glass' is not a class"), result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1
    assert not (tmp_path / "test" / "dataset.json").exists()


def test_free_text_stays_text_unless_named_as_a_class(tmp_path):
    captions = [f"{w} and {i % 3}" for i, w in enumerate(["smooth", "rough", "soft", "hard"] * 3)]
    csv_path, root = _split(tmp_path, "train", ["wood", "metal"] * 6, captions=captions)
    assert _pack(csv_path, root, tmp_path / "a", "--label-col", "caption").exit_code == 0
    m, records = _records(tmp_path / "a")
    assert m["labels"]["caption"] == {"type": "text"} and m["labels"]["material"]["type"] == "categorical"
    assert [r["caption"] for r in records] == captions and "caption_name" not in records[0]
    assert _pack(csv_path, root, tmp_path / "b", "--label-col", "caption:class").exit_code == 0
    m, records = _records(tmp_path / "b")
    assert m["labels"]["caption"] == {"type": "categorical", "classes": sorted(captions)}
    assert records[0]["caption"] == sorted(captions).index(captions[0]) and records[0]["caption_name"] == captions[0]


def test_col_text_keeps_a_column_text_and_a_class_mismatch_names_a_few_classes(tmp_path):
    materials = [f"material {i % 12:02d}" for i in range(24)]  # like a caption column: 12 distinct of 24
    csv_path, root = _split(tmp_path, "train", materials)
    assert _pack(csv_path, root, tmp_path / "a").exit_code == 0  # half distinct: categorical by default
    assert _records(tmp_path / "a")[0]["labels"]["material"]["type"] == "categorical"
    assert _pack(csv_path, root, tmp_path / "b", "--label-col", "material:text").exit_code == 0
    m, records = _records(tmp_path / "b")
    assert m["labels"]["material"] == {"type": "text"} and records[3]["material"] == "material 03"
    test_csv, _ = _split(tmp_path, "test", ["glass"])
    result = CliRunner().invoke(main, ["pack", str(test_csv), "--root", str(root), "--out", str(tmp_path / "test"),
                                       "--labels-from", str(tmp_path / "a" / "dataset.json"), "--label-col",
                                       "material"])
    line = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 2 and line.endswith("(12 classes: material 00, material 01, material 02, "
                                                   "material 03, material 04, …)")
    assert len(line) < 160 + len(str(tmp_path))  # not every class name


def test_one_image_column_packs_that_modality_alone(tvl, tmp_path):
    csv_path, root = tvl
    result = CliRunner().invoke(main, ["pack", str(csv_path), "--root", str(root), "--out", str(tmp_path / "t"),
                                       "--tactile-col", "tactile"])
    assert result.exit_code == 0, result.output
    m = read_manifest(tmp_path / "t" / "dataset.json", kind="dataset")
    assert m["modalities"] == ["tactile"] and m["samples"] == 5  # row 3 lacks its tactile image; row 6 is fine now
    assert "--vision-col" not in m["command"]
    members = {name.split(".", 1)[1] for shard in m["shards"] for s in iter_shard(tmp_path / "t" / shard["path"])
               for name in [f"{s.key}.{ext}" for ext in s.files]}
    assert members == {"tactile.png", "json"}


def test_label_groups_say_which_part_should_hold_a_label(tvl, tmp_path):
    csv_path, root = tvl
    result = _pack(csv_path, root, tmp_path / "out", "--label-group", "material=shared", "--label-group",
                   "force=tactile")
    assert result.exit_code == 0, result.output
    m = read_manifest(tmp_path / "out" / "dataset.json", kind="dataset")
    assert m["labels"]["material"]["group"] == "shared" and m["labels"]["force"]["group"] == "tactile"
    assert "--label-group" in m["command"]  # rerun reproduces them
    for bad, expected in (("force=audio", "must be one of shared, vision, tactile"), ("depth=tactile", "no label"),
                          ("force", "NAME=GROUP")):
        result = _pack(csv_path, root, tmp_path / bad.replace("=", "_"), "--label-group", bad)
        assert result.exit_code == 2 and result.stderr.strip().startswith("error:") and expected in result.stderr, \
            result.stderr
