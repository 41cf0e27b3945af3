"""Shared test setup (CPU only, few threads, deterministic) and the helpers several test modules use."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

# Before torch is imported anywhere: the suite runs on 2 cores and starts multi-process tests; subprocesses
# inherit these. OpenMP spin-waiting makes oversubscribed threads catastrophically slow (measured: a tiny
# train step 0.02 s with 1 thread, 3.5 s with 2 threads while another process kept both cores busy).
os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 threads on 2 busy cores thrash (100x slower)
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    yield


# ── feature stores, written through the real writer ─────────────────────────────────────────────────

MODALITIES = ("vision", "tactile")
TINY = ["--preset", "tiny", "--epochs", "2", "--batch-size", "32", "--val-fraction", "0.2", "log_every=2",
        "model.n_layers=1"]  # `regtok train` flags for a run of a few seconds


def write_feature_store(root: Path, features: dict[str, dict[str, np.ndarray]], labels: dict[str, np.ndarray],
                        keys: list[str], schema: dict, specs: dict[str, str] | None = None, n_parts: int = 2) -> Path:
    """A feature store of ``features[modality][kind]`` rows, written as extract writes one: ``n_parts`` parts by
    ``PartWriter``, the index by ``write_index``, and a features manifest."""
    from regtok.pipeline.extract.store import PartWriter, write_index
    from regtok.pipeline.manifests.manifest import new_manifest, sha256_file, write_manifest

    n = len(keys)
    shapes = {m: {k: arr.shape[1:] for k, arr in kinds.items()} for m, kinds in features.items()}
    parts = []
    for i, rows in enumerate(np.array_split(np.arange(n), n_parts)):
        rel = f"parts/shard-{i:06d}.h5"
        writer = PartWriter(root / rel, shapes)
        writer.append([keys[j] for j in rows], {m: {k: arr[rows] for k, arr in kinds.items()}
                                                for m, kinds in features.items()},
                      [{name: float(col[j]) for name, col in labels.items()} for j in rows])
        writer.close()
        parts.append({"path": rel, "shard": f"shard-{i:06d}.tar", "samples": len(rows),
                      "bytes": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)})
    write_index(root, [p["path"] for p in parts], shapes, sorted(labels))
    kinds = list(next(iter(features.values())))
    encoders = {m: {"spec": (specs or {}).get(m, "test:linear"), "pooled_dim": int(f["pooled"].shape[1]),
                    "token_shape": list(f["tokens"].shape[1:]) if "tokens" in f else None, "weights_sha256": None}
                for m, f in features.items()}
    write_manifest(root / "manifest.json", new_manifest(
        "features", command=["test"], modalities=list(features), encoders=encoders, feature_kinds=kinds, samples=n,
        skipped=[], parts=parts, labels=schema))
    return root


def write_store(root: Path, n: int = 100, dim: int = 12, seed: int = 0, tokens: bool = False) -> Path:
    """A two-part store whose features are a shared latent seen through two noisy linear maps, so retrieval can
    be learned; ``tokens`` adds 3 random tokens per row."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    feats = {m: {"pooled": (z @ rng.normal(size=(4, dim)) + 0.3 * rng.normal(size=(n, dim))).astype(np.float16)}
             for m in MODALITIES}
    if tokens:
        for m in MODALITIES:
            feats[m]["tokens"] = rng.normal(size=(n, 3, dim)).astype(np.float16)
    labels = {"material": (z[:, 0] > 0).astype(np.float64)}
    return write_feature_store(root, feats, labels, [f"k{j:05d}" for j in range(n)],
                               {"material": {"type": "categorical", "classes": ["a", "b"]}})


# ── shards and `regtok extract` with the tiny encoders ──────────────────────────────────────────────

ENCODERS = (("vision", "tiny:0"), ("tactile", "tiny:1"))


def png(rng: np.random.Generator, size: int = 24) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def sample(rng: np.random.Generator, key: str, index: int) -> tuple[str, list[tuple[str, bytes]]]:
    record = {"key": key, "material": index % 3, "roughness": round(index / 10, 3), "name": "x"}
    return key, [("vision.png", png(rng)), ("tactile.png", png(rng)), ("json", json.dumps(record).encode())]


def write_shards(root: Path, counts: list[int], seed: int = 0) -> list[Path]:
    from regtok.pipeline.data.shards import write_shard

    rng, paths, index = np.random.default_rng(seed), [], 0
    for s, n in enumerate(counts):
        items = []
        for _ in range(n):
            items.append(sample(rng, f"s{index:05d}", index))
            index += 1
        paths.append(root / f"shard-{s:06d}.tar")
        write_shard(paths[-1], items)
    return paths


def extract(shards: str, out: Path, **kw) -> tuple[Path, dict]:
    from regtok.pipeline.extract.stage import ExtractConfig, run_extract

    cfg = ExtractConfig(shards=shards, out=str(out), encoders=ENCODERS, batch_size=kw.pop("batch_size", 4),
                        workers=kw.pop("workers", 0), **kw)
    return run_extract(cfg, command=["regtok", "extract"], show_progress=False)


def arrays(store_dir: Path) -> dict[str, np.ndarray]:
    import h5py

    with h5py.File(store_dir / "features.h5", "r") as f:
        out = {}
        f.visititems(lambda name, obj: out.__setitem__(name, obj[:]) if isinstance(obj, h5py.Dataset) else None)
    return out


def one_line_error(result) -> str:
    """The exit-2 contract of a click ``Result``: no traceback, and the last line on stderr is the only one that
    starts with 'error:' (progress may come before it)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def regtok_cli(*args) -> Any:
    """`regtok ARGS…` through click's test runner (paths may be Path objects)."""
    from click.testing import CliRunner

    from regtok.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def cli_ok(result) -> Any:
    """``result`` after asserting exit status 0 (the output and exception otherwise)."""
    assert result.exit_code == 0, (result.output, result.exception)
    return result


# ── subprocess sweeps whose trials hang or kill their worker (issue 20) ─────────────────────────────

# sitecustomize.py for a subprocess test (on PYTHONPATH, so every Python process of it loads it, spawned sweep
# workers included). REGTOK_TEST_HOOK is "hang" (every trial hangs), "hang:NNNN" (trial NNNN hangs) or
# "kill:NNNN" (trial NNNN kills its process with -9); a trial that starts leaves a mark NNNN.PID. No process draws
# figures (they cost more than a 1-epoch tiny trial).
SWEEP_HOOK = """
import os

if os.environ.get("REGTOK_TEST_HOOK"):
    import time
    from pathlib import Path

    from regtok.pipeline import train as _train
    from regtok.pipeline.sweep import report as _report
    from regtok.pipeline.train import stage as _train_stage

    _real = _train.train_run
    _train_stage.plot_curves = lambda *a, **kw: None
    _report.plot_sweep = lambda *a, **kw: False

    def _hooked(features, out, cfg, **kw):
        mode, _, which = os.environ["REGTOK_TEST_HOOK"].partition(":")
        name = Path(out).name
        (Path(os.environ["REGTOK_TEST_MARKS"]) / f"{name}.{os.getpid()}").touch()
        if which in ("", name):
            if mode == "hang":
                time.sleep(120)
            if mode == "kill":
                os.kill(os.getpid(), 9)
        return _real(features, out, cfg, **kw)

    _train.train_run = _hooked
"""


def hooked_env(tmp_path: Path, mode: str) -> dict[str, str]:
    """The variables that make a Python process started from now on (a subprocess, or a sweep worker this process
    spawns) load :data:`SWEEP_HOOK` in ``mode``; marks go to tmp/marks."""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(SWEEP_HOOK)
    (tmp_path / "marks").mkdir()
    return {"PYTHONPATH": str(tmp_path / "hook"), "REGTOK_TEST_HOOK": mode,
            "REGTOK_TEST_MARKS": str(tmp_path / "marks"), "REGTOK_NO_PROGRESS": "1"}


@pytest.fixture
def hook(tmp_path, monkeypatch):
    """``hook(mode)``: the sweep workers this test spawns load :data:`SWEEP_HOOK` in ``mode``."""
    def set_mode(mode: str) -> Path:
        for key, value in hooked_env(tmp_path, mode).items():
            monkeypatch.setenv(key, value)
        return tmp_path / "marks"

    return set_mode


@pytest.fixture
def no_figures(monkeypatch):
    """Trials and sweeps without curves.png and sweep.png (tests of what happens to trials, not of figures)."""
    from regtok.pipeline.sweep import report as sweep_report
    from regtok.pipeline.train import stage as train_stage

    monkeypatch.setattr(train_stage, "plot_curves", lambda *a, **kw: None)
    monkeypatch.setattr(sweep_report, "plot_sweep", lambda *a, **kw: False)
