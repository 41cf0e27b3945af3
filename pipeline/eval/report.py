"""The report files of an evaluation (report.json, report.md, prefix.png) and the demo's summary.

The eval stage itself is :mod:`regtok.pipeline.eval.stage`; the text is rendered by
:mod:`regtok.pipeline.eval.report_md` and the figure drawn by :mod:`regtok.pipeline.eval.plots`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from regtok.pipeline.eval.plots import plot_prefix
from regtok.pipeline.eval.report_md import headline_sentence, parts_line, reconstruction_line, render_markdown
from regtok.pipeline.manifests.manifest import write_json_atomic
from regtok.pipeline.runtime.console import heading


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


def demo_summary(console: Console, root: Path) -> None:
    """Print the headline numbers of ``regtok demo``'s report and the path of every manifest under ``root``."""
    import json

    report = json.loads((root / "eval" / "report.json").read_text())
    rows = {r["k"]: r for r in report["retrieval"]}
    k_full, k_one = max(rows), min(rows)
    r1 = {k: (rows[k]["a_to_b"]["R@1"] + rows[k]["b_to_a"]["R@1"]) / 2 for k in (k_one, k_full)}
    chance = 1 / report["n"]
    heading(console, "[bold]demo summary")
    console.print(f"cross-modal R@1 (mean of both directions, N = {report['n']}): "
                  f"{r1[k_full]:.1%} with {k_full} shared registers, {r1[k_one]:.1%} with {k_one}; chance {chance:.1%}")
    if "headline" in report:
        console.print(headline_sentence(report["headline"]))
    material = {(p["modality"], p["group"]): p for p in report["probes"] if p["label"] == "material"
                and p["value"] is not None and (p["group"] == "raw" or (p["group"] == "shared"
                                                                        and p["k"] == report["parts"]["k_shared"]))}
    for m in report["modalities"]:
        if (m, "shared") in material and (m, "raw") in material:
            console.print(f"material class from {m}'s shared registers: {material[(m, 'shared')]['value']:.1%} "
                          f"accuracy, from its raw features {material[(m, 'raw')]['value']:.1%} (chance "
                          f"{material[(m, 'raw')].get('chance', float('nan')):.1%})")
    if report.get("parts"):
        console.print(f"what leaks into the shared part, and what the private part keeps: {parts_line(report)}")
    console.print(reconstruction_line(report))
    console.print("manifests (regtok show / verify / rerun take any of them):")
    for stage in ("shards-train/dataset.json", "shards-test/dataset.json", "features-train/manifest.json",
                  "features-test/manifest.json", "run/manifest.json", "eval/manifest.json"):
        console.print(f"  {root / stage}")
    console.print(f"report (also on stdout): {root / 'eval' / 'report.md'}")
