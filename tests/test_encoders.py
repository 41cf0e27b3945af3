"""Encoder specs, safe checkpoint loading in every supported format, and the preprocessing split."""

from __future__ import annotations

import argparse
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from regtok.errors import RegtokError
from regtok.pipeline.encoders.encoder import EncoderSpec, load_encoder, parse_spec, tiny_encoder
from regtok.pipeline.encoders.kinds import open_clip_tag

OC_MODEL = "regtok-test-vit"
OC_CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8,
                                           "head_width": 32},
          "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}


def _uint8_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)  # (n, 3, S, S)


def _png(seed: int, size: int = 40) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size + 7, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("text, kind, model, source, seed", [
    ("tiny", "tiny", "tiny-vit", None, 0),
    ("tiny:7", "tiny", "tiny-vit", None, 7),
    ("open_clip:ViT-L-14@openai", "open_clip", "ViT-L-14", "openai", 0),
    ("open_clip:ViT-B-32@/w/b32.pt", "open_clip", "ViT-B-32", "/w/b32.pt", 0),
    ("timm:vit_small_patch16_224@w.safetensors", "timm", "vit_small_patch16_224", "w.safetensors", 0),
    ("tvl:vit_tiny_patch16_224@/ckpt/tvl.pth", "tvl", "vit_tiny_patch16_224", "/ckpt/tvl.pth", 0),
])
def test_parse_spec(text, kind, model, source, seed):
    assert parse_spec(text) == EncoderSpec(kind, model, source, seed)


@pytest.mark.parametrize("text", ["", "clip:ViT-B-32@openai", "timm:vit_tiny_patch16_224", "timm:vit@openai",
                                  "tiny:x", "open_clip:@openai"])
def test_parse_spec_rejects(text):
    with pytest.raises(RegtokError):
        parse_spec(text)


def test_tiny_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = tiny_encoder(0), tiny_encoder(0), tiny_encoder(1)
    assert torch.equal(torch.rand(1), before)
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    x = _uint8_images(4, 64)
    pa, ta = a.encode(x, tokens=True)
    pb, _ = b.encode(x)
    assert torch.equal(pa, pb) and not torch.allclose(pa, c.encode(x)[0])
    assert pa.shape == (4, a.pooled_dim) and ta.shape == (4, *a.token_shape)


def test_tiny_pooled_features_keep_information():
    """The pooled output must not collapse: images that differ give features that differ in many directions."""
    enc = tiny_encoder(0)
    pooled = enc.encode(_uint8_images(96, 64, seed=3))[0].numpy()
    x = pooled - pooled.mean(0)
    ev = np.clip(np.linalg.eigvalsh(np.cov(x.T)), 0, None)
    assert ev.sum() ** 2 / (ev ** 2).sum() > 5  # participation ratio (i.i.d. noise images)
    assert np.linalg.matrix_rank(x, tol=1e-4 * np.abs(x).max()) > 40


def _save_timm(tmp_path, num_classes: int = 7):
    import safetensors.torch
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes).eval()
    safetensors.torch.save_file(model.state_dict(), tmp_path / "w.safetensors")
    torch.save(model.state_dict(), tmp_path / "w.pth")
    return model


def test_timm_formats_load_back_equal(tmp_path):
    model = _save_timm(tmp_path)
    x = _uint8_images(2, 224)
    for name in ("w.safetensors", "w.pth"):
        enc = load_encoder(f"timm:vit_tiny_patch16_224@{tmp_path / name}")
        pooled, tokens = enc.encode(x, tokens=True)
        with torch.no_grad():
            feats = model.forward_features(enc.prep.normalize(x))
            ref = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pooled, ref, rtol=0, atol=0)
        torch.testing.assert_close(tokens, feats[:, 1:], rtol=0, atol=0)  # class token dropped
        assert enc.pooled_dim == 192 and enc.token_shape == (196, 192)
        assert enc.prep.mean == (0.5, 0.5, 0.5) and enc.prep.size == (224, 224)  # timm's data config


def test_wrong_keys_name_missing_and_unexpected(tmp_path):
    model = _save_timm(tmp_path)
    sd = model.state_dict()
    sd["blocks.99.extra"] = sd.pop("blocks.0.norm1.weight")
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(RegtokError, match=r"missing 1 key\(s\): blocks\.0\.norm1\.weight.*unexpected 1 key\(s\): "
                                          r"blocks\.99\.extra"):
        load_encoder(f"timm:vit_tiny_patch16_224@{tmp_path / 'bad.pth'}")


class Evil:  # a pickled object whose loading would run code
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_are_refused(tmp_path, capsys):
    model = _save_timm(tmp_path)
    torch.save({"state_dict": model.state_dict(), "extra": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(RegtokError, match="refusing to unpickle"):
        load_encoder(f"timm:vit_tiny_patch16_224@{tmp_path / 'evil.pth'}")
    assert "pwned" not in capsys.readouterr().out


def _tvl_checkpoint(tmp_path, tactile_model: str = "vit_tiny_patch16_224"):
    import timm

    tactile = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=48, global_pool="avg").eval()
    model = {f"tactile_encoder.{k}": v for k, v in tactile.state_dict().items()}
    model["logit_scale"] = torch.tensor(2.6)
    model["clip.visual.proj"] = torch.zeros(4, 4)
    ckpt = {"model": model, "epoch": 11, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
            "args": argparse.Namespace(tactile_model=tactile_model, blr=3e-4, active_modality_names=["tactile"])}
    path = tmp_path / "tvl.pth"
    torch.save(ckpt, path)
    return tactile, path


def test_tvl_checkpoint_loads_tactile_encoder(tmp_path):
    tactile, path = _tvl_checkpoint(tmp_path)
    enc = load_encoder(f"tvl:vit_tiny_patch16_224@{path}")
    x = _uint8_images(2, 224, seed=5)
    with torch.no_grad():
        ref = tactile(enc.prep.normalize(x))  # TVL's tactile embedding: the head's output
    torch.testing.assert_close(enc.encode(x)[0], ref, rtol=0, atol=0)
    assert enc.pooled_dim == 48 and enc.describe()["epoch"] == 11


def test_tvl_checkpoint_errors(tmp_path):
    _, path = _tvl_checkpoint(tmp_path, tactile_model="vit_small_patch16_224")
    with pytest.raises(RegtokError, match="tactile_model='vit_small_patch16_224'"):
        load_encoder(f"tvl:vit_tiny_patch16_224@{path}")
    torch.save({"model": {"vision.w": torch.zeros(1)}, "epoch": 1}, tmp_path / "novis.pth")
    with pytest.raises(RegtokError, match="no 'tactile_encoder"):
        load_encoder(f"tvl:vit_tiny_patch16_224@{tmp_path / 'novis.pth'}")


@pytest.fixture(scope="module")
def open_clip_model(tmp_path_factory):
    import open_clip

    cfg_dir = tmp_path_factory.mktemp("oc_cfg")
    (cfg_dir / f"{OC_MODEL}.json").write_text(json.dumps(OC_CFG))
    open_clip.add_model_config(cfg_dir)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms(OC_MODEL)
    path = tmp_path_factory.mktemp("oc") / "clip.pt"
    torch.save(model.state_dict(), path)
    return model.eval(), preprocess, path


def test_open_clip_local_file_and_tag_path_equal_in_memory_model(open_clip_model):
    model, preprocess, path = open_clip_model
    x = _uint8_images(3, 32, seed=2)
    from_file = load_encoder(f"open_clip:{OC_MODEL}@{path}")
    via_open_clip = open_clip_tag(EncoderSpec("open_clip", OC_MODEL, str(path)))  # the tag code path
    with torch.no_grad():
        ref = model.encode_image(from_file.prep.normalize(x))
    for enc in (from_file, via_open_clip):
        pooled, tokens = enc.encode(x, tokens=True)
        torch.testing.assert_close(pooled, ref, rtol=0, atol=1e-6)
        assert tokens.shape == (3, 16, 64) and enc.token_shape == (16, 64) and enc.pooled_dim == 32
    assert from_file.prep.describe() == via_open_clip.prep.describe()


def test_preprocessing_equals_the_encoders_own_transform(open_clip_model):
    _, preprocess, path = open_clip_model
    enc = load_encoder(f"open_clip:{OC_MODEL}@{path}")
    data = _png(9)
    ours = enc.prep.normalize(enc.prep.to_uint8(data)[None])[0]  # (3, H, W)
    theirs = preprocess(Image.open(io.BytesIO(data)))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_unknown_open_clip_model_and_missing_file(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(RegtokError, match="unknown open_clip model"):
        load_encoder(f"open_clip:No-Such-Model@{tmp_path / 'x.pt'}")
    with pytest.raises(RegtokError, match="not found"):
        load_encoder(f"timm:vit_tiny_patch16_224@{tmp_path / 'missing.safetensors'}")


def test_weights_hash_cache_follows_file_changes(tmp_path, monkeypatch):
    from regtok.pipeline.encoders.checkpoints import file_sha256_cached
    from regtok.pipeline.manifests.manifest import sha256_file

    monkeypatch.setenv("REGTOK_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "big.bin"
    path.write_bytes(b"a" * (1 << 24))
    assert file_sha256_cached(path) == sha256_file(path) == file_sha256_cached(path)
    assert (tmp_path / "cache" / "sha256.json").is_file()
    path.write_bytes(b"b" * (1 << 24))  # same size, new content and mtime
    os.utime(path, ns=(1, 10**18))
    assert file_sha256_cached(path) == sha256_file(path)


# ── pretrained names as timm and open_clip spell them, from a Hugging Face cache the test writes ──────────────

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache in tmp_path, offline (as the whole suite is)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _put(cache, repo: str, files: dict) -> dict:
    """Write ``files`` (name -> bytes) as the cached snapshot of ``repo`` at ``main``, in the hub cache layout."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / REV
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REV)
    return {name: snapshot / name for name in files}


def _safetensors_bytes(sd: dict) -> bytes:
    import safetensors.torch

    return safetensors.torch.save({k: v.contiguous() for k, v in sd.items()})


@pytest.mark.parametrize("text, model", [
    ("timm:vit_small_patch16_224.augreg_in21k", "vit_small_patch16_224.augreg_in21k"),
    ("open_clip:hf-hub:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K", "hf-hub:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K"),
])
def test_parse_pretrained_names(text, model):
    spec = parse_spec(text)
    assert spec == EncoderSpec(text.split(":")[0], model, None) and str(spec) == text


@pytest.mark.parametrize("text, kind, tags", [
    ("open_clip:ViT-B-32", "open_clip", ["openai", "laion2b_s34b_b79k", "datacomp_xl_s13b_b90k"]),
    ("timm:vit_small_patch16_224", "timm", ["augreg_in21k", "augreg_in1k"]),
])
def test_a_spec_without_a_tag_lists_the_tags(text, kind, tags):
    with pytest.raises(RegtokError) as e:
        parse_spec(text)
    message = str(e.value)
    assert "\n" not in message and f"{kind} knows these tags" in message and all(t in message for t in tags)


def test_timm_tag_loads_from_the_hub_cache(hub_cache):
    import timm

    from regtok.pipeline.manifests.manifest import sha256_file

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    path = _put(hub_cache, "timm/vit_tiny_patch16_224.augreg_in21k",
                {"model.safetensors": _safetensors_bytes(model.state_dict())})["model.safetensors"]
    enc = load_encoder("timm:vit_tiny_patch16_224.augreg_in21k")
    x = _uint8_images(2, 224, seed=4)
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(enc.prep.normalize(x)), pre_logits=True)
    torch.testing.assert_close(enc.encode(x)[0], ref, rtol=0, atol=0)
    info = enc.describe()
    assert info["weights_sha256"] == sha256_file(path) and info["spec"] == "timm:vit_tiny_patch16_224.augreg_in21k"
    assert (info["repo"], info["revision"], info["file"]) == ("timm/vit_tiny_patch16_224.augreg_in21k", REV,
                                                              "model.safetensors")
    assert enc.prep.mean == (0.5, 0.5, 0.5)  # the tag's own data config


def test_open_clip_hf_hub_loads_config_and_weights_from_the_cache(hub_cache, open_clip_model):
    from regtok.pipeline.manifests.manifest import sha256_file

    model, _, _ = open_clip_model
    config = {"model_cfg": OC_CFG, "preprocess_cfg": {"mean": [0.25, 0.5, 0.75], "std": [0.2, 0.3, 0.4]}}
    files = _put(hub_cache, "regtok-test/oc-hub", {"open_clip_config.json": json.dumps(config).encode(),
                                                    "open_clip_model.safetensors": _safetensors_bytes(
                                                        model.state_dict())})
    enc = load_encoder("open_clip:hf-hub:regtok-test/oc-hub")
    x = _uint8_images(3, 32, seed=6)
    with torch.no_grad():
        ref = model.encode_image(enc.prep.normalize(x))
    torch.testing.assert_close(enc.encode(x)[0], ref, rtol=0, atol=1e-6)
    assert enc.prep.mean == (0.25, 0.5, 0.75) and enc.prep.std == (0.2, 0.3, 0.4)
    assert enc.weights_sha256 == sha256_file(files["open_clip_model.safetensors"])
    assert enc.describe()["repo"] == "regtok-test/oc-hub"


def test_open_clip_tag_loads_from_the_cache(hub_cache, open_clip_model, monkeypatch):
    import open_clip.pretrained

    model, _, _ = open_clip_model
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, OC_MODEL,
                        {"regtok": {"hf_hub": "regtok-test/oc-tag/", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}})
    _put(hub_cache, "regtok-test/oc-tag", {"open_clip_model.safetensors": _safetensors_bytes(model.state_dict())})
    enc = load_encoder(f"open_clip:{OC_MODEL}@regtok")
    x = _uint8_images(3, 32, seed=7)
    with torch.no_grad():
        ref = model.encode_image(enc.prep.normalize(x))
    torch.testing.assert_close(enc.encode(x)[0], ref, rtol=0, atol=1e-6)
    assert enc.prep.mean == (0.5, 0.5, 0.5)  # the tag's preprocessing, not the model config's
    with pytest.raises(RegtokError, match=r"no such tag or file 'other'.*knows these tags for regtok-test-vit: regtok"):
        load_encoder(f"open_clip:{OC_MODEL}@other")


@pytest.mark.parametrize("spec, repo", [
    ("open_clip:ViT-B-32@openai", "timm/vit_base_patch32_clip_224.openai"),
    ("open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
    ("timm:vit_small_patch16_224.augreg_in21k", "timm/vit_small_patch16_224.augreg_in21k"),
])
def test_offline_without_cached_weights_is_one_error_line(hub_cache, tmp_path, spec, repo):
    from click.testing import CliRunner

    from regtok.cli import main
    from regtok.pipeline.data.synth import synthesize

    synthesize(tmp_path / "data", samples=2, shards=1, seed=0)
    result = CliRunner().invoke(main, ["extract", "--shards", str(tmp_path / "data" / "dataset.json"), "--out",
                                       str(tmp_path / "store"), "--encoder", f"vision={spec}", "--encoder",
                                       "tactile=tiny"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr  # no stray ERROR:root: line
    assert "HF_HUB_OFFLINE" in lines[0] and "local weights file" in lines[0] and f"hf download {repo}" in lines[0]
