"""The token path at any width, in bounded memory (issue 22): the chunked and streamed paths give what the
in-memory ones give, tokens wider than TOKEN_DIM train, evaluate and reconstruct, the fixed buffers are stored
once, and a run of an older layout loads or is refused in one line. The sizes themselves are measured by
benchmarks/scale.py, not here."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import MODALITIES, cli_ok, one_line_error, regtok_cli, write_feature_store

import regtok.data
import regtok.pipeline.extract.store
import regtok.reduce
from regtok.data import feature_stats, make_batches
from regtok.errors import RegtokError
from regtok.reduce import Reducer

# ── regtok.reduce: chunks equal the whole array ─────────────────────────────────────────────────────


def offset_rows(*shape: int, seed: int = 0) -> torch.Tensor:
    """Low-rank rows with a large common offset (as frozen encoders' features have) plus noise."""
    g = torch.Generator().manual_seed(seed)
    n, rest = shape[0], shape[1:]
    width = int(np.prod(rest))
    x = torch.randn(n, 6, generator=g) @ torch.randn(6, width, generator=g) + 0.1 * torch.randn(n, width, generator=g)
    return (x + 20.0).reshape(n, *rest)


def naive_pca(x: torch.Tensor, k: int) -> torch.Tensor:
    """The reference: standardise every flattened dimension over all rows, project on the top-k right singular
    vectors (float64, one SVD)."""
    f = x.reshape(len(x), -1).double()
    z = (f - f.mean(0)) / f.std(0)
    return z @ torch.linalg.svd(z, full_matrices=False)[2][:k].T


@pytest.mark.parametrize("shape", [(150, 3, 10), (40, 3, 20)])  # covariance form (N > F); Gram form (N < F)
def test_the_reducer_in_chunks_equals_one_pca_of_the_whole_array(monkeypatch, shape):
    x = offset_rows(*shape)
    monkeypatch.setattr(regtok.reduce, "CHUNK", 7)
    red = Reducer.fit(x, 4, token_dim=shape[2])  # tokens as wide as token_dim: no token PCA
    assert red.token_basis is None and red.components.shape == (shape[1] * shape[2], 4)
    torch.testing.assert_close(red(x).double().abs(), naive_pca(x, 4).abs(), atol=1e-4, rtol=1e-4)  # signs free


def test_wide_tokens_are_reduced_each_by_the_pca_of_every_token(monkeypatch):
    x = offset_rows(120, 4, 12)
    monkeypatch.setattr(regtok.reduce, "CHUNK", 7)
    red = Reducer.fit(x, 4, token_dim=5)
    tokens = x.reshape(-1, 12).double()  # (N·T, D)
    evecs = torch.linalg.eigh(torch.cov(tokens.T, correction=0))[1][:, -5:].flip(1)  # (D, 5)
    torch.testing.assert_close(red.token_basis.double().abs(), evecs.abs(), atol=1e-4, rtol=1e-4)
    reduced = (x.double() @ evecs).reshape(len(x), -1)  # (N, T·5)
    torch.testing.assert_close(red(x).double().abs(), naive_pca(reduced, 4).abs(), atol=2e-3, rtol=2e-3)


# ── regtok.data and the store: bounded reads give the same rows ─────────────────────────────────────


class TokenStore:
    """A store stand-in of (n, T, D) token arrays."""

    def __init__(self, n: int = 40, t: int = 3, d: int = 5):
        self.modalities, self.n = MODALITIES, n
        g = np.random.default_rng(0)
        self.arrays = {m: g.normal(size=(n, t, d)).astype(np.float16) for m in MODALITIES}

    def shape(self, kind, modality):
        return self.arrays[modality].shape[1:]

    def read(self, kind, modality, rows=None):
        return self.arrays[modality] if rows is None else self.arrays[modality][rows]


def test_batches_read_in_bounded_bytes_are_the_in_memory_batches(monkeypatch):
    store, cpu, rows = TokenStore(), torch.device("cpu"), np.arange(2, 39)
    mem = make_batches(store, "tokens", rows, 4, seed=3, device=cpu)
    whole = [torch.cat([b[m] for b in mem.all()]) for m in MODALITIES]
    stats = feature_stats(mem.all())
    monkeypatch.setattr(regtok.data, "STREAM_CHUNK_BYTES", 1)  # one batch per sorted read
    monkeypatch.setattr(regtok.data, "ALL_BATCH_BYTES", 100)  # a row or two per batch of all()
    stream = make_batches(store, "tokens", rows, 4, seed=3, device=cpu, memory_budget=0)
    assert stream.streaming and len(next(iter(stream.all()))["vision"]) == 1
    for a, b in zip(mem.epoch(1), stream.epoch(1), strict=True):
        assert all(torch.equal(a[m], b[m]) for m in MODALITIES)
    assert all(torch.equal(w, torch.cat([b[m] for b in stream.all()])) for w, m in zip(whole, MODALITIES, strict=True))
    for m, (mean, std) in feature_stats(stream.all()).items():
        torch.testing.assert_close((mean, std), stats[m], atol=1e-6, rtol=1e-6)


def test_store_rows_read_through_bounded_gaps_are_the_rows_asked_for(tmp_path, monkeypatch):
    data = np.random.default_rng(1).normal(size=(300, 4, 6)).astype(np.float16)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        ds = f.create_dataset("x", data=data, chunks=(7, 4, 6))
        expected = {}
        rng = np.random.default_rng(2)
        asks = [rng.integers(-300, 300, size=k) for k in (0, 1, 5, 60, 400)] + [rng.random(300) < 0.2]
        for i, rows in enumerate(asks):
            expected[i] = regtok.pipeline.extract.store.read_rows(ds, rows, 300)
            assert np.array_equal(expected[i], data[rows])
        monkeypatch.setattr(regtok.pipeline.extract.store, "_GAP_BYTES", 3 * 48)  # gaps of 3 rows, reads of 5
        monkeypatch.setattr(regtok.pipeline.extract.store, "_READ_BYTES", 5 * 48)
        for i, rows in enumerate(asks):
            assert np.array_equal(regtok.pipeline.extract.store.read_rows(ds, rows, 300), expected[i])


# ── a run whose tokens are wider than TOKEN_DIM ─────────────────────────────────────────────────────

WIDE = 80  # > TOKEN_DIM = 64: each token goes through the token PCA before the read flattens it


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> tuple[Path, Path]:
    """(run, test store): a tiny run on 3 tokens of 80 that share a planted latent across modalities."""
    root = tmp_path_factory.mktemp("wide")
    g = np.random.default_rng(0)
    maps = {m: g.normal(size=(6, 3 * WIDE)) for m in MODALITIES}
    stores = {}
    for name, n, seed in (("train", 160, 1), ("test", 60, 2)):
        z = np.random.default_rng(seed).normal(size=(n, 6))
        noise = np.random.default_rng(seed + 10)
        feats = {m: {"pooled": z @ maps[m][:, :12] + 0.1 * noise.normal(size=(n, 12)),
                     "tokens": (z @ maps[m] + 0.3 * noise.normal(size=(n, 3 * WIDE)) + 5).reshape(n, 3, WIDE)}
                 for m in MODALITIES}
        feats = {m: {k: v.astype(np.float16) for k, v in f.items()} for m, f in feats.items()}
        stores[name] = write_feature_store(root / name, feats, {"material": (z[:, 0] > 0).astype(float)},
                                           [f"{name}{i:04d}" for i in range(n)],
                                           {"material": {"type": "categorical", "classes": ["a", "b"]}})
    cli_ok(regtok_cli("train", "--features", stores["train"], "--out", root / "run", "--preset", "tiny", "--epochs",
                      "1", "--batch-size", "32", "--val-fraction", "0.2", "feature_kind=tokens"))
    return root / "run", stores["test"]


def test_wide_tokens_train_evaluate_and_reconstruct(wide, tmp_path):
    from regtok.pipeline.train.run_load import load_run

    run, test = wide
    enc = load_run(run).model.encoders["vision"]
    basis = enc.token_basis  # (80, 64), orthonormal columns
    assert basis.shape == (WIDE, 64) and torch.allclose(basis.T @ basis, torch.eye(64), atol=1e-4)
    assert enc.read_basis.shape[0] == 3 * 64  # the read flattens the reduced tokens
    x = torch.from_numpy(h5py.File(test / "features.h5")["vision/tokens"][:]).float()
    target = enc.as_tokens(x) @ basis @ basis.T  # the input within the token PCA's span
    with torch.no_grad():
        back = enc.decode_code(enc.read_code(x))  # the read's way back: exact on its span (K = 192 ≥ 3·64)
    torch.testing.assert_close(back, target, atol=2e-3, rtol=2e-3)
    cli_ok(regtok_cli("eval", "--run", run, "--features", test, "--out", tmp_path / "eval", "--device", "cpu"))
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    full = report["retrieval"][-1]
    assert (full["a_to_b"]["R@1"] + full["b_to_a"]["R@1"]) / 2 > 0.5  # chance 1/60
    last = [r for r in report["reconstruction"] if r["k"] == max(r["k"] for r in report["reconstruction"])]
    assert all(r["cosine"] > r["mean_reference"] for r in last), last
    assert report["baselines"]["linear"]["cca"]["fit"]["input_dims"] == {"vision": 192, "tactile": 192}


def test_fixed_buffers_of_a_wide_run_are_stored_once(wide):
    from safetensors.torch import load_file

    run, _ = wide
    fixed = load_file(str(run / "buffers.safetensors"))
    assert {f"encoders.{m}.{b}" for m in MODALITIES for b in ("token_basis", "read_basis")} <= set(fixed)
    for name in ("best.safetensors", "checkpoint.safetensors"):
        assert not any(k.endswith(("token_basis", "read_basis")) for k in load_file(str(run / name)))


def test_a_run_of_the_older_wide_token_layout_is_refused_in_one_line(wide, tmp_path):
    """Before the token PCA, a read of tokens wider than 64 flattened them whole: (T·D_in) × K, no token_basis."""
    import shutil

    from safetensors.torch import load_file, save_file

    from regtok.pipeline.train.run_load import load_run

    run, test = wide
    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / "manifest.json").unlink()  # as a run still training: its files are not checked against a manifest
    fixed = load_file(str(old / "buffers.safetensors"))
    fixed = {k: (torch.zeros(3 * WIDE, v.shape[1]) if k.endswith("read_basis") else v) for k, v in fixed.items()
             if not k.endswith("token_basis")}
    save_file(fixed, str(old / "buffers.safetensors"))
    with pytest.raises(RegtokError, match="older regtok.*wider than 64.*train the run again"):
        load_run(old)
    error = one_line_error(regtok_cli("eval", "--run", old, "--features", test, "--out", tmp_path / "e"))
    assert "token_basis is missing" in error


# ── benchmarks/scale.py's planted stores ────────────────────────────────────────────────────────────


@pytest.mark.parametrize("tokens", [None, (2, 64)])  # --pooled writes pooled features only
def test_the_scale_benchmarks_planted_stores_open_as_feature_stores(tmp_path, monkeypatch, tokens):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import scale_stores

    from regtok.pipeline.extract import open_store

    parts = scale_stores.parts_for(tmp_path / "parts", "p", 30, 20, 5, tokens, 12, log=lambda _m: None)
    store = open_store(scale_stores.write_store(tmp_path / "store", parts, tokens, 12))
    assert store.n == 30 and [p["samples"] for p in parts] == [20, 10] and store.has("tokens") == bool(tokens)
    pooled = store.read("pooled", "vision")
    assert pooled.shape == (30, 12) and np.isfinite(pooled).all() and pooled.std(0).min() > 0.1
    if tokens:
        assert store.read("tokens", "tactile", np.arange(3)).shape == (3, *tokens)
