"""Manifest lineage: walk a manifest's inputs back to the shards, and verify recorded hashes on disk."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regtok.pipeline.manifests.manifest import ManifestError, manifest_path, read_manifest, resolve_path, sha256_file

# Fields of a manifest that hold records of files ({"path", "sha256", ...}), besides "inputs".
FILE_FIELDS = ("shards", "parts")


@dataclass(frozen=True)
class FileCheck:
    """The outcome of checking one recorded file against the disk."""

    role: str  # "input", "output", "shard", "part"
    recorded: str  # the path as written in the manifest
    path: Path  # resolved against the manifest's directory
    status: str  # "ok", "missing", "changed"


def recorded_files(m: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every ``(role, record)`` of a manifest that names a file with a sha256."""
    for ref in m.get("inputs", []):
        if isinstance(ref, dict) and isinstance(ref.get("path"), str) and ref.get("sha256"):
            yield "input", ref
    for name in FILE_FIELDS:
        for rec in m.get(name) or []:
            if isinstance(rec, dict) and isinstance(rec.get("path"), str) and rec.get("sha256"):
                yield name.rstrip("s"), rec
    for rec in (m.get("outputs") or {}).get("files", []):
        if isinstance(rec, dict) and isinstance(rec.get("path"), str) and rec.get("sha256"):
            yield "output", rec


def verify(path: str | Path) -> list[FileCheck]:
    """Check every file a manifest records against its sha256 (inputs, shards, parts, outputs)."""
    mpath = manifest_path(path)
    m = read_manifest(mpath)
    checks = []
    for role, rec in recorded_files(m):
        p = resolve_path(mpath, rec["path"])
        if not p.is_file():
            status = "missing"
        else:
            status = "ok" if sha256_file(p) == rec["sha256"] else "changed"
        checks.append(FileCheck(role, rec["path"], p, status))
    return checks


@dataclass
class LineageNode:
    """One manifest in the chain, with the manifests it was made from."""

    path: Path
    manifest: dict[str, Any] | None  # None when the file is missing or unreadable
    status: str  # "ok", "missing", "changed" (hash differs from what the child recorded), "unreadable: …"
    parents: list[LineageNode]


def lineage(path: str | Path, recorded_sha: str | None = None, _depth: int = 0) -> LineageNode:
    """The manifest at ``path`` and, recursively, the upstream manifests its inputs reference."""
    p = manifest_path(path)
    if not p.is_file():
        return LineageNode(p, None, "missing", [])
    status = "ok"
    if recorded_sha is not None and sha256_file(p) != recorded_sha:
        status = "changed"
    try:
        m = read_manifest(p)
    except ManifestError as e:
        return LineageNode(p, None, f"unreadable: {e}", [])
    parents = []
    if _depth < 16:  # a chain is at most dataset → features → run → eval; guard against cycles
        for ref in m.get("inputs", []):
            if str(ref.get("path", "")).endswith(".json"):
                parents.append(lineage(resolve_path(p, ref["path"]), ref.get("sha256"), _depth + 1))
    return LineageNode(p, m, status, parents)


def summary_line(m: dict[str, Any]) -> str:
    """A short human description of a manifest for the lineage tree."""
    kind = m["kind"]
    if kind == "dataset":
        gen = m.get("generator") or {}
        src = f"generator {gen.get('name')} v{gen.get('version')}" if gen else "packed from " + str(
            (m.get("source") or {}).get("csv", "?"))
        return f"{m.get('samples', '?')} samples in {len(m.get('shards') or [])} shards, {src}"
    if kind == "features":
        enc = ", ".join(f"{k}={v.get('spec')}" for k, v in (m.get("encoders") or {}).items())
        return f"{m.get('samples', '?')} samples, {', '.join(m.get('feature_kinds') or [])}; {enc}"
    if kind == "run":
        model = (m.get("config") or {}).get("model") or {}
        metrics = m.get("metrics") or {}
        r1 = metrics.get("val/R@1") if isinstance(metrics, dict) else None
        r1s = f", val R@1 {100 * r1:.1f} % (last epoch)" if isinstance(r1, (int, float)) else ""
        kept = m.get("kept") or {}
        score = metrics.get("best/val_select") if isinstance(metrics, dict) else None
        kept_s = (f"; kept epoch {kept['epoch']}" + (f" (val/select {100 * score:.1f} %)" if isinstance(
            score, (int, float)) else "")) if kept.get("epoch") is not None else ""
        return f"loss {model.get('loss_type', '?')}, {model.get('n_registers', '?')} registers{r1s}{kept_s}"
    if kind == "sweep":
        trials = [t for t in m.get("trials") or [] if isinstance(t, dict)]
        states = {s: sum(t.get("state") == s for t in trials) for s in ("complete", "pruned", "fail")}
        best = next((t for t in trials if t.get("number") == m.get("best")), None)
        best_s = f"; best {m.get('metric')} {100 * best['value']:.1f} % (trial {best['number']})" if best else ""
        return (f"{m.get('sampler')} sweep, {len(trials)} trials ({states['complete']} complete, "
                f"{states['pruned']} pruned, {states['fail']} failed){best_s}")
    if kind == "eval":
        return f"{m.get('samples', (m.get('outputs') or {}).get('n', '?'))} held-out pairs"
    return ""
