"""`regtok rerun`: re-execute a stage from its manifest alone into a new directory, and compare the results.

What "the same" means per kind:

- dataset (synth or pack): every shard byte-identical (sha256);
- features: every array of ``features.h5`` identical (keys, labels, pooled and token features), same skips;
- run: identical weights when the run and the rerun are both on the CPU; otherwise final metrics within
  ``METRIC_TOLERANCE`` (GPU kernels are not bit-reproducible);
- eval: identical report numbers.

Manifests are data, not code: before anything runs, every path the stage would read is checked, after
symlinks are resolved: the shards a dataset manifest lists, the parts and virtual sources of a feature
store, the files of a run, and the recorded results the rerun compares against (which must exist). Shard specs
that execute commands (``pipe:``) or name URLs are refused; paths outside the manifest's tree are refused
unless ``allow_outside``. The tree is ``root`` when given, else the directory that holds the stage's
directory (``exp/run/manifest.json`` → ``exp/``) together with the current directory (so a project laid out
as ``shards/…``, ``features/…``, ``runs/…`` reruns from its top). Encoder checkpoints are loaded the only way
regtok loads them (``weights_only=True`` / safetensors), so a file that needs arbitrary unpickling fails to
load instead of running code.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regtok.errors import RegtokError
from regtok.pipeline.manifests.manifest import ManifestError, manifest_path, read_manifest, resolve_path

METRIC_TOLERANCE = 0.02  # absolute, for metrics of non-CPU training reruns
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


@dataclass(frozen=True)
class Check:
    """One comparison between the recorded result and the rerun's."""

    what: str
    matched: bool
    detail: str = ""


@dataclass
class RerunResult:
    kind: str
    out: Path
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.matched for c in self.checks)


class PathGuard:
    """Refuses paths outside every one of ``roots`` (unless allowed) and anything that is a command or a URL."""

    def __init__(self, roots: list[Path], allow_outside: bool) -> None:
        self.roots, self.allow_outside = [r.resolve() for r in roots], allow_outside

    def check(self, path: str | Path, what: str) -> Path:
        text = str(path)
        if _SCHEME.match(text) and not text.startswith("file:"):
            raise RegtokError(f"refusing {what} {text!r}: manifests may name local files only (no 'pipe:' or URLs)")
        p = Path(text.removeprefix("file:")).resolve()
        if not self.allow_outside and not any(p.is_relative_to(r) for r in self.roots):
            trees = " or ".join(str(r) for r in self.roots)
            raise RegtokError(f"refusing {what} {text}: it lies outside the manifest's tree ({trees}); "
                              f"pass --root or --allow-outside to permit it")
        return p


def rerun_stage(path: str | Path, out: str | Path, *, root: str | Path | None = None, allow_outside: bool = False,
          log: Callable[[str], None] = lambda msg: None) -> RerunResult:
    """Re-execute the stage recorded in the manifest at ``path`` into ``out`` and compare."""
    mpath = manifest_path(path)
    m = read_manifest(mpath)
    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()):
        raise RegtokError(f"{out} is not empty; rerun writes into a new directory")
    guard = PathGuard([Path(root)] if root else [mpath.absolute().parent.parent, Path.cwd()], allow_outside)
    if out.resolve() == mpath.absolute().parent.resolve():
        raise RegtokError("rerun must write into a new directory, not over the recorded result")
    if m["kind"] == "sweep":
        trial = mpath.parent / "trials" / "0000"
        raise RegtokError(f"{mpath} is a sweep: rerun one of its trials (a run, e.g. {trial}), or run the sweep's "
                          "command again to continue it")
    runner = {"dataset": _rerun_dataset, "features": _rerun_features, "run": _rerun_run, "eval": _rerun_eval}
    try:
        _check_recorded(mpath, m, guard)
        checks = runner[m["kind"]](mpath, m, out, guard, log)
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"{mpath}: the manifest does not describe a runnable {m['kind']} stage "
                            f"({type(e).__name__}: {e}); was it edited?") from None
    return RerunResult(m["kind"], out, checks)


def _config(m: dict[str, Any]) -> dict[str, Any]:
    cfg = m["config"]
    if not isinstance(cfg, dict) or not cfg:
        raise KeyError("config")
    return cfg


def _input(mpath: Path, m: dict[str, Any], role: str, guard: PathGuard) -> Path:
    for ref in m["inputs"]:
        if ref.get("role") == role:
            return guard.check(resolve_path(mpath, ref["path"]), f"{role} input")
    raise KeyError(f"no input with role {role!r}")


def _check_recorded(mpath: Path, m: dict[str, Any], guard: PathGuard) -> None:
    """The recorded results a rerun compares against must exist, beside the manifest or in the tree, before
    anything runs (a manifest copied away from its outputs would otherwise redo the whole stage first)."""
    files = [rec["path"] for rec in m["outputs"].get("files") or [] if isinstance(rec, dict)]
    if m["kind"] == "features":
        files += [rec["path"] for rec in m.get("parts") or [] if isinstance(rec, dict)]
    if m["kind"] == "eval":
        files.append("report.json")
    here = PathGuard([*guard.roots, mpath.absolute().parent], guard.allow_outside)
    for rel in dict.fromkeys(files):
        p = here.check(resolve_path(mpath, str(rel)), "recorded output")
        if not p.is_file():
            raise RegtokError(f"{mpath}: the recorded output {rel} is missing (was the manifest copied away from "
                              f"its outputs?); rerun compares against it, so nothing was run")


def _guard_store(guard: PathGuard, store: Path, what: str) -> None:
    """A feature store's manifest, its index, every part it lists and every file the index's virtual datasets
    read must lie in the tree."""
    import h5py

    from regtok.pipeline.extract import virtual_sources

    mpath = guard.check(manifest_path(store), f"{what} manifest")
    m = read_manifest(mpath, kind="features")
    index = guard.check(mpath.parent / m["outputs"].get("index", "features.h5"), f"{what} index")
    for rec in m.get("parts") or []:
        guard.check(resolve_path(mpath, rec["path"]), f"{what} part")
    if not index.is_file():
        return  # opening the store says so
    with h5py.File(index, "r") as f:
        sources = virtual_sources(f)
    for name in sorted(sources):
        guard.check(name if Path(name).is_absolute() else index.parent / name, f"{what} virtual source")


def _guard_run(guard: PathGuard, run_dir: Path) -> None:
    """The files eval reads from a run directory, and the stores its manifest names, must lie in the tree."""
    from regtok.pipeline.train import BEST, BUFFERS, CHECKPOINT, CONFIG, MANIFEST, START

    for name in (CONFIG, CHECKPOINT, BEST, BUFFERS, START, MANIFEST):
        if (run_dir / name).exists() or (run_dir / name).is_symlink():
            guard.check(run_dir / name, f"run file {name}")
    if (run_dir / MANIFEST).is_file():
        for ref in read_manifest(run_dir / MANIFEST, kind="run")["inputs"]:
            if ref.get("role") in ("features", "val_features"):
                _guard_store(guard, resolve_path(run_dir / MANIFEST, ref["path"]).parent, f"run {ref['role']}")


# ── per kind ────────────────────────────────────────────────────────────────────────────────────────


def _rerun_dataset(mpath: Path, m: dict, out: Path, guard: PathGuard, log: Callable[[str], None]) -> list[Check]:
    old_shards = {s["path"]: s["sha256"] for s in m["shards"]}  # a malformed record fails before anything runs
    if m.get("generator"):
        from regtok.pipeline.data import synthesize

        p = m["generator"]["params"]
        log(f"synth: {p['samples']} samples in {p['shards']} shards, seed {p['seed']}")
        new = synthesize(out, samples=int(p["samples"]), shards=int(p["shards"]), seed=int(p["seed"]),
                         image_size=int(p["image_size"]), families=p.get("families"))
    else:
        from regtok.pipeline.data import pack_csv

        src, cfg = m["source"], _config(m)
        log(f"pack: {src['csv']}")
        kwargs = {k: v for k, v in cfg.items() if k not in ("csv", "root", "out")}
        kwargs["allow_outside_root"] = bool(kwargs.get("allow_outside_root")) and guard.allow_outside
        if "labels_from" in kwargs:  # recorded beside the manifest (or absolute) in its inputs, not cwd-relative
            kwargs["labels_from"] = _input(mpath, m, "labels_from", guard)
        new = pack_csv(guard.check(src["csv"], "CSV"), guard.check(src["root"], "image root"), out, **kwargs)
    new_shards = {s["path"]: s["sha256"] for s in new["shards"]}
    checks = [Check("shard list", list(old_shards) == list(new_shards), f"{len(new_shards)} shards")]
    for name, sha in old_shards.items():
        checks.append(Check(f"shard {name}", new_shards.get(name) == sha, "sha256"))
    return checks


def _rerun_features(mpath: Path, m: dict, out: Path, guard: PathGuard, log: Callable[[str], None]) -> list[Check]:
    from regtok.pipeline.data import expand_shards
    from regtok.pipeline.encoders import parse_spec
    from regtok.pipeline.extract import ExtractConfig, SkipLimitError, run_extract

    cfg = dict(_config(m))
    for part in str(cfg["shards"]).split("::"):
        guard.check(part, "shard spec")
    for shard in expand_shards(str(cfg["shards"])):  # the shards a dataset manifest or a directory names
        guard.check(shard, "shard")
    encoders = list(cfg["encoders"].items() if isinstance(cfg["encoders"], dict) else cfg["encoders"])
    for modality, spec in encoders:
        if not (isinstance(modality, str) and isinstance(spec, str)):
            raise TypeError(f"encoder {modality!r}: {spec!r} is not a MODALITY=SPEC pair of strings")
        parsed = parse_spec(spec)
        if parsed.is_file:  # every weights file, relative paths included, must lie in the tree
            guard.check(parsed.source, f"{modality} encoder weights")
    cfg["out"] = str(out)
    log(f"extract: {cfg['shards']} with {dict(encoders)}")
    try:
        run_extract(ExtractConfig.from_dict(cfg), command=list(m["command"]), show_progress=True)
    except SkipLimitError:
        pass  # the recorded run may have exceeded the limit too; the comparison below says whether it matches
    new = read_manifest(out / "manifest.json", kind="features")
    checks = [Check("samples", new["samples"] == m["samples"], f"{new['samples']} vs {m['samples']}"),
              Check("skipped samples", _skips(new) == _skips(m), f"{len(new['skipped'])} recorded skips")]
    checks += compare_h5(mpath.parent / m["outputs"].get("index", "features.h5"), out / "features.h5")
    return checks


def _rerun_run(mpath: Path, m: dict, out: Path, guard: PathGuard, log: Callable[[str], None]) -> list[Check]:
    from regtok.config import TrainConfig, from_dict, from_saved
    from regtok.pipeline.train import BEST, CHECKPOINT, stopped_after, train_run

    cfg = from_dict(TrainConfig, from_saved(_config(m)))
    features = _input(mpath, m, "features", guard).parent
    val = next((r for r in m["inputs"] if r.get("role") == "val_features"), None)
    val_features = _input(mpath, m, "val_features", guard).parent if val else None
    for store in (features, val_features):
        if store is not None:
            _guard_store(guard, store, "features")
    log(f"train: {features} ({cfg.model.loss_type}, {cfg.epochs} epochs, seed {cfg.seed})")
    stopped = m.get("stopped")  # a pruned sweep trial ended after this epoch; so does its rerun
    stop = None
    if isinstance(stopped, dict):
        after = stopped_after(stopped)
        log(f"the run stopped after epoch {after} ({stopped.get('reason')}); so does the rerun")

        def stop(record: dict) -> str | None:
            return str(stopped.get("reason") or "stopped") if record["epoch"] >= after else None
    path, result = train_run(features, out, cfg, val_features=val_features, command=list(m["command"]), stop=stop)
    new = read_manifest(path, kind="run")
    old_device, new_device = m["environment"].get("device", ""), new["environment"].get("device", "")
    if old_device == new_device == "cpu":  # the last weights, or the best ones where a sweep kept only those
        name = CHECKPOINT if (mpath.parent / CHECKPOINT).is_file() else BEST
        return compare_weights(mpath.parent / name, out / name)
    log(f"recorded on {old_device!r}, rerun on {new_device!r}: comparing metrics within {METRIC_TOLERANCE}")
    return compare_numbers(m.get("metrics") or {}, new.get("metrics") or {}, "metrics", tol=METRIC_TOLERANCE)


def _rerun_eval(mpath: Path, m: dict, out: Path, guard: PathGuard, log: Callable[[str], None]) -> list[Check]:
    from regtok.config import from_dict
    from regtok.evaluate import EvalConfig
    from regtok.pipeline.eval import EVAL_METHOD, EVAL_METHODS, run_eval

    cfg = from_dict(EvalConfig, _config(m))
    run_ref = next((r for r in m["inputs"] if r.get("role") in ("run", "run_config")), None)
    if run_ref is None:
        raise KeyError("no input with role 'run'")
    run_dir = guard.check(resolve_path(mpath, run_ref["path"]), "run").parent
    features = _input(mpath, m, "features", guard).parent
    save_embeddings = any(Path(f["path"]).name == "embeddings.h5" for f in m["outputs"].get("files", []))
    base = next((r["role"] for r in m["inputs"] if r.get("role") in ("fit_features", "baseline_features")), None)
    base_features = _input(mpath, m, base, guard).parent if base else None  # baseline_features: older manifests
    _guard_run(guard, run_dir)
    for store in (features, base_features):
        if store is not None:
            _guard_store(guard, store, "features")
    log(f"eval: run {run_dir} on {features}")
    new = run_eval(run_dir, features, out, cfg, save_embeddings=save_embeddings, command=list(m["command"]),
                   fit_features=base_features)
    old = json.loads((mpath.parent / "report.json").read_text())
    method = old.get("eval_method", 1)
    checks = [] if method == EVAL_METHOD else [Check(
        "eval method", False, f"the report was made by eval method {method} ({EVAL_METHODS.get(method, 'unknown')}); "
        f"this regtok's is {EVAL_METHOD} ({EVAL_METHODS[EVAL_METHOD]}), so those numbers differ by design")]
    return checks + compare_numbers(old, json.loads(json.dumps(new)), "report", tol=0.0)


def _skips(m: dict) -> list[tuple]:
    return sorted((str(s.get("shard")), str(s.get("key")), str(s.get("reason"))) for s in m.get("skipped", []))


# ── comparisons ─────────────────────────────────────────────────────────────────────────────────────


def compare_h5(old: Path, new: Path) -> list[Check]:
    """Every dataset of two HDF5 files (virtual datasets read through) compared for exact equality."""
    import h5py
    import numpy as np

    checks = []
    with h5py.File(old, "r") as a, h5py.File(new, "r") as b:
        names: list[str] = []
        a.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        extra = set()
        b.visititems(lambda name, obj: extra.add(name) if isinstance(obj, h5py.Dataset) else None)
        for name in names:
            if name not in b:
                checks.append(Check(f"array /{name}", False, "missing in the rerun"))
                continue
            x, y = a[name][()], b[name][()]
            same = x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)
            detail = f"{x.shape} {x.dtype}"
            if not same and x.shape == y.shape and np.issubdtype(x.dtype, np.number):
                detail += f", max |diff| {float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()):.3g}"
            checks.append(Check(f"array /{name}", same, detail))
        for name in sorted(extra - set(names)):
            checks.append(Check(f"array /{name}", False, "only in the rerun"))
    return checks


def compare_weights(old: Path, new: Path) -> list[Check]:
    """Every tensor of two safetensors checkpoints compared for exact equality."""
    from regtok.pipeline.train import read_weights

    a, b = read_weights(old), read_weights(new)  # each with its run's fixed buffers
    checks = [Check("parameter names", sorted(a) == sorted(b), f"{len(a)} tensors")]
    differing = [k for k in a if k in b and not (a[k].shape == b[k].shape and bool((a[k] == b[k]).all()))]
    checks.append(Check("weights identical", not differing and sorted(a) == sorted(b),
                        f"{len(differing)} differ: {', '.join(differing[:3])}" if differing else "bit-identical"))
    return checks


def compare_numbers(old: Any, new: Any, where: str, tol: float) -> list[Check]:
    """Walk two JSON trees; every number equal within ``tol`` (absolute), everything else equal."""
    diffs: list[str] = []
    _walk(old, new, where, tol, diffs)
    return [Check(where, not diffs, "; ".join(diffs[:5]) + (f" (+{len(diffs) - 5} more)" if len(diffs) > 5 else "")
                  if diffs else "all numbers identical" if tol == 0 else f"all within {tol}")]


def _walk(a: Any, b: Any, where: str, tol: float, diffs: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in ("seconds", "timings") or k.endswith("_seconds"):
                continue
            if k not in a or k not in b:
                diffs.append(f"{where}.{k} only in {'rerun' if k in b else 'recorded'}")
            else:
                _walk(a[k], b[k], f"{where}.{k}", tol, diffs)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            diffs.append(f"{where}: {len(a)} vs {len(b)} items")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            _walk(x, y, f"{where}[{i}]", tol, diffs)
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
        if not both_nan and abs(a - b) > tol:
            diffs.append(f"{where}: {a} vs {b}")
    elif a != b:
        diffs.append(f"{where}: {a!r} vs {b!r}")
