"""regtok synth: deterministic shards, readable with webdataset, factors in range, factor groups respected."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from regtok.cli import main
from regtok.errors import RegtokError
from regtok.pipeline.data import surfaces, synth
from regtok.pipeline.data.shards import iter_shard
from regtok.pipeline.manifests.manifest import read_manifest, sha256_file

N, SIZE = 20, 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "a"
    return out, synth.synthesize(out, N, 3, seed=7, image_size=SIZE)


def _members(path):
    return {s.key: s.files for s in iter_shard(path)}


def test_same_arguments_give_identical_bytes(dataset, tmp_path):
    out, manifest = dataset
    again = synth.synthesize(tmp_path / "b", N, 3, seed=7, image_size=SIZE)
    for a, b in zip(manifest["shards"], again["shards"], strict=True):
        assert (out / a["path"]).read_bytes() == (tmp_path / "b" / b["path"]).read_bytes()
    other = synth.synthesize(tmp_path / "c", N, 3, seed=8, image_size=SIZE)
    assert other["shards"][0]["sha256"] != manifest["shards"][0]["sha256"]


def test_samples_do_not_depend_on_the_shard_count(dataset, tmp_path):
    out, manifest = dataset
    single = synth.synthesize(tmp_path / "one", N, 1, seed=7, image_size=SIZE)
    merged = {}
    for s in manifest["shards"]:
        merged.update(_members(out / s["path"]))
    assert merged == _members(tmp_path / "one" / single["shards"][0]["path"])


def test_manifest_records_shards_hashes_and_labels(dataset):
    out, manifest = dataset
    assert read_manifest(out / "dataset.json", kind="dataset")["samples"] == N
    assert [s["path"] for s in manifest["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sum(s["samples"] for s in manifest["shards"]) == N
    for s in manifest["shards"]:
        assert sha256_file(out / s["path"]) == s["sha256"]
        assert (out / s["path"]).stat().st_size == s["bytes"]
    assert manifest["modalities"] == ["vision", "tactile"]
    assert manifest["labels"]["material"]["classes"] == list(surfaces.FAMILIES)
    assert len(surfaces.FAMILIES) >= 8
    assert manifest["generator"]["params"]["seed"] == 7
    assert manifest["config"] == {"samples": N, "shards": 3, "seed": 7, "image_size": SIZE}


def test_shards_read_back_with_webdataset(dataset):
    wds = pytest.importorskip("webdataset")
    out, manifest = dataset
    labels = manifest["labels"]
    keys = []
    for s in manifest["shards"]:
        for sample in wds.WebDataset(str(out / s["path"]), shardshuffle=False):
            assert {"vision.png", "tactile.png", "json"} <= set(sample)
            keys.append(sample["__key__"])
            record = json.loads(sample["json"])
            assert record["key"] == sample["__key__"] == f"{record['index']:06d}"
            assert record["material_name"] == labels["material"]["classes"][record["material"]]
            for name, spec in labels.items():
                value = record[name]
                assert isinstance(value, (int, float)), name
                if spec["type"] == "continuous":
                    assert spec["range"][0] <= value <= spec["range"][1], name
            for modality in ("vision", "tactile"):
                img = Image.open(io.BytesIO(sample[f"{modality}.png"]))
                assert img.size == (SIZE, SIZE) and img.mode == "RGB"
    assert keys == [f"{i:06d}" for i in range(N)]


def _pair(factors, size=48):
    return synth.render_pair(factors, size, synth.sample_rng(0, 0))


def test_vision_only_and_tactile_only_factors_touch_one_view():
    base = synth.draw_factors(synth.sample_rng(3, 1))
    vision, tactile = _pair(base)
    v2, t2 = _pair({**base, "light_azimuth": (base["light_azimuth"] + 120) % 360, "albedo_hue": 0.1})
    assert np.array_equal(tactile, t2) and not np.array_equal(vision, v2)
    v3, t3 = _pair({**base, "press_depth": 1.0 if base["press_depth"] < 0.8 else 0.5, "gel_blur": 1.4})
    assert np.array_equal(vision, v3) and not np.array_equal(tactile, t3)
    v4, t4 = _pair({**base, "material": (base["material"] + 1) % len(surfaces.FAMILIES)})
    assert not np.array_equal(vision, v4) and not np.array_equal(tactile, t4)


def test_views_look_like_a_photo_and_a_gelsight_image():
    """Photos take the albedo's colour; the gel keeps its own colour, and its flat parts stay background."""
    base = synth.draw_factors(synth.sample_rng(3, 2))
    red, t_red = _pair({**base, "albedo_hue": 0.0, "albedo_saturation": 0.45})
    blue, t_blue = _pair({**base, "albedo_hue": 2 / 3, "albedo_saturation": 0.45})
    assert red[..., 0].mean() > red[..., 2].mean() + 20 and blue[..., 2].mean() > blue[..., 0].mean() + 20
    assert np.array_equal(t_red, t_blue)
    flat = surfaces.render_gelsight(np.zeros((48, 48), np.float32), 1.0, 0.0, np.random.default_rng(0))
    assert flat.std(axis=(0, 1)).max() < 20  # smooth background, no structure without contact
    assert np.abs(t_red.astype(float) - flat).mean() > 3  # contact shows


@pytest.mark.parametrize("family", range(len(surfaces.FAMILIES)))
def test_every_family_makes_a_structured_height_field(family):
    rng = np.random.default_rng(family)
    h = surfaces.height_field(family, 64, 4.0, 0.3, rng)
    assert h.shape == (64, 64) and h.dtype == np.float32
    assert h.min() >= 0.0 and h.max() <= 1.0 and h.std() > 0.08
    turned = surfaces.height_field(family, 64, 4.0, 0.3 + np.pi / 4, np.random.default_rng(family))
    assert np.abs(turned - h).mean() > 0.05  # orientation is visible


def test_families_differ_from_each_other():
    fields = [surfaces.height_field(f, 64, 4.0, 0.0, np.random.default_rng(0)) for f in range(len(surfaces.FAMILIES))]
    spectra = [np.abs(np.fft.fft2(h - h.mean())).ravel() for h in fields]
    spectra = [s / np.linalg.norm(s) for s in spectra]
    sim = np.array([[a @ b for b in spectra] for a in spectra])
    assert sim[~np.eye(len(sim), dtype=bool)].max() < 0.95


def test_bad_arguments_and_foreign_folders_are_refused(tmp_path):
    with pytest.raises(RegtokError, match="--shards"):
        synth.synthesize(tmp_path / "x", 3, 5, seed=0)
    with pytest.raises(RegtokError, match="--samples"):
        synth.synthesize(tmp_path / "x", 0, 1, seed=0)
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "other.tar").write_bytes(b"")
    with pytest.raises(RegtokError, match="other.tar"):
        synth.synthesize(tmp_path / "y", 2, 1, seed=0, image_size=16)


def test_rerun_with_fewer_shards_removes_the_stale_ones(tmp_path):
    synth.synthesize(tmp_path, 6, 3, seed=0, image_size=16)
    synth.synthesize(tmp_path, 6, 2, seed=0, image_size=16)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]


def test_cli_prints_the_manifest_path_and_a_summary(tmp_path):
    result = CliRunner().invoke(main, ["synth", str(tmp_path / "d"), "--samples", "4", "--shards", "2",
                                       "--seed", "1", "--image-size", "16"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "d" / "dataset.json")
    assert "Wrote 4" in result.stderr
    bad = CliRunner().invoke(main, ["synth", str(tmp_path / "e"), "--samples", "2", "--shards", "3"])
    assert bad.exit_code == 2 and bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error:")



def test_demo_manifest_matches_the_generator(tmp_path):
    """data_manifests/demo.json must be regenerated whenever the generator's output changes."""
    from pathlib import Path

    from regtok.pipeline.data.shards import write_shard

    demo = read_manifest(Path(__file__).resolve().parent.parent / "data_manifests" / "demo.json", kind="dataset")
    assert demo["labels"] == synth.declared_labels()
    import platform

    if demo["generator"]["params"]["numpy"] != np.__version__:
        pytest.skip("byte-identical shards are promised for the numpy version demo.json records")
    if demo["environment"]["platform"] != platform.platform():
        # float32 blur and shading round to the same uint8 pixels only where the BLAS kernels agree
        pytest.skip("byte-identical shards are promised on the platform demo.json was made on")
    cfg = demo["config"]
    first = synth.shard_ranges(cfg["samples"], cfg["shards"])[0]  # the first shard only, not all 2,000 samples
    width = synth.key_width(cfg["samples"])
    write_shard(tmp_path / "s.tar", (synth.make_sample(cfg["seed"], i, cfg["image_size"], width) for i in first))
    assert sha256_file(tmp_path / "s.tar") == demo["shards"][0]["sha256"], \
        "the generator changed: regenerate data_manifests/demo.json (see data_manifests/README.md)"
