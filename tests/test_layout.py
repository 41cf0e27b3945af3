"""The code's layout (issue 23, STYLE.md): one folder per stage under pipeline/, imports between stages only through
a stage's package, never from a shared concern up into a stage; files of at most 400 lines, functions of at most 60.
Read from the source text alone (nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = {"manifests", "runtime", "encoders"}  # concerns every stage uses; they import no stage


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _imports(path: Path) -> list[tuple[ast.AST, str]]:
    """Every absolute module a file imports (``from M import …`` and ``import M``), with its node."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node, node.module))
        elif isinstance(node, ast.Import):
            out += [(node, alias.name) for alias in node.names]
    return out


def test_the_library_imports_no_pipeline_code():
    """regtok/ (model, losses, training, evaluation) works on arrays; only the package's entry points reach the
    pipeline: __init__ re-exports its Python API (regtok.load_run, regtok.Embedder …), __main__ runs the CLI."""
    wrong = [f"{path.relative_to(ROOT)}:{node.lineno} imports {name}" for path in _sources("regtok")
             if path.name not in ("__init__.py", "__main__.py") for node, name in _imports(path)
             if name.startswith(("regtok.pipeline", "regtok.cli"))]
    assert not wrong, "\n".join(wrong)


def test_stages_import_each_other_only_through_their_packages():
    pipeline = ROOT / "pipeline"
    stages = {p.name for p in pipeline.iterdir() if (p / "__init__.py").is_file()}
    assert {"data", "extract", "train", "sweep", "eval", "embed", "lineage"} <= stages
    wrong = []
    for path in _sources("pipeline", "cli"):
        rel = path.relative_to(ROOT)
        home = rel.parts[1] if rel.parts[0] == "pipeline" and len(rel.parts) > 2 else None
        for node, name in _imports(path):
            if not name.startswith("regtok.pipeline."):
                continue
            mod = name.split(".")
            target = mod[2]
            if target not in stages:
                wrong.append(f"{rel}:{node.lineno} imports {name}, a module outside every stage's folder")
            elif target != home and home in SHARED and target not in SHARED:
                wrong.append(f"{rel}:{node.lineno}: the shared {home}/ imports the stage {name}")
            elif target != home and len(mod) > 3 and target not in SHARED:
                wrong.append(f"{rel}:{node.lineno} reaches into {name} (import from regtok.pipeline.{target})")
    assert not wrong, "\n".join(wrong)


def test_files_and_functions_fit_on_a_screen():
    long = []
    for path in _sources("pipeline", "cli", "regtok"):
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if text.count("\n") > 400:
            long.append(f"{rel}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60:
                long.append(f"{rel}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, "\n".join(long)
