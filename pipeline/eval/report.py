"""The report files of an evaluation: report.json, report.md and prefix.png.

The eval stage itself is :mod:`regtok.pipeline.eval.stage`; the text is rendered by
:mod:`regtok.pipeline.eval.report_md` and the figure drawn by :mod:`regtok.pipeline.eval.plots`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from regtok.pipeline.eval.plots import plot_prefix
from regtok.pipeline.eval.report_md import render_markdown
from regtok.pipeline.manifests.manifest import write_json_atomic


def write_report_files(report: dict[str, Any], out: Path, console: Console | None = None) -> list[Path]:
    """report.json, report.md and (with matplotlib) prefix.png; returns the paths written."""
    paths = [out / "report.json", out / "report.md"]
    write_json_atomic(paths[0], report)
    paths[1].write_text(render_markdown(report))
    png = plot_prefix(report, out / "prefix.png")
    if png is None:
        (console or Console(stderr=True)).print("[yellow]matplotlib is not installed: prefix.png skipped "
                                                "(pip install 'regtok[plot]')")
    else:
        paths.append(png)
    return paths
