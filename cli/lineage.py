"""The whole pipeline and its records: `regtok demo`, `show`, `rerun`, `verify`."""

from __future__ import annotations

import click

from regtok.cli import CONTEXT, main
from regtok.errors import RegtokError


@main.command(context_settings=CONTEXT)
@click.option("--out", default="regtok-demo", type=click.Path(file_okay=False), help="Directory for every stage.")
@click.option("--samples", default=2000, type=click.IntRange(min=200), help="Training pairs (held-out: a quarter).")
@click.option("--epochs", default=5, type=click.IntRange(min=1), help="Training epochs.")
@click.option("--overwrite", is_flag=True, help="Delete the demo's stage directories in --out first.")
def demo(out: str, samples: int, epochs: int, overwrite: bool) -> None:
    """Run the whole pipeline on the embedded synthetic set: synth → extract → train → eval.

    \b
    OUT/shards-train, shards-test   synthetic shards (seeds 0 and 1) and their dataset.json
    OUT/features-train, -test       tiny random-init encoders' token features (HDF5) + manifest.json
    OUT/run                         the trained register modules (tiny preset; 10 % of the training split
                                    validates and picks the kept epoch) + manifest.json
    OUT/eval                        report.json, report.md, prefix.png + manifest.json, with the linear
                                    baselines fitted on the same training rows
    """
    from regtok.pipeline.lineage import run_demo
    from regtok.pipeline.runtime.console import stderr_console
    from regtok.pipeline.runtime.startup import keep_freed_memory

    keep_freed_memory()
    report = run_demo(out, samples, epochs, overwrite=overwrite, console=stderr_console())
    click.echo(str(report))  # the result, on stdout


@main.command()
@click.argument("manifest", type=click.Path(exists=True))
def show(manifest: str) -> None:
    """Print the chain of manifests behind MANIFEST (a file or a stage directory) back to the shards."""
    from rich.tree import Tree

    from regtok.pipeline.lineage import lineage, summary_line
    from regtok.pipeline.runtime.console import stdout_console

    def add(tree: Tree, node) -> None:
        mark = {"ok": "[green]✓[/]", "missing": "[red]missing[/]", "changed": "[red]changed since recorded[/]"}
        kind = node.manifest["kind"] if node.manifest else "?"
        label = f"[bold]{kind}[/] {node.path}  {mark.get(node.status, node.status)}"
        if node.manifest:
            label += f"\n[dim]{summary_line(node.manifest)}[/]"
        branch = tree.add(label)
        for parent in node.parents:
            add(branch, parent)
        trials = (node.manifest or {}).get("trials") or [] if kind == "sweep" else []
        for t in trials[:5]:
            value = f"{100 * t['value']:.1f} %" if isinstance(t.get("value"), float) else "—"
            params = ", ".join(f"{k}={v}" for k, v in (t.get("params") or {}).items())
            branch.add(f"[dim]trial {t.get('number')} {t.get('state')} {value}  {t.get('path')}  {params}[/]")
        if len(trials) > 5:
            branch.add(f"[dim]… {len(trials) - 5} more trials (report.md)[/]")
        shards = (node.manifest or {}).get("shards") or []
        if shards:
            names = [s.get("path", "?") for s in shards]
            branch.add(f"[dim]shards: {', '.join(names[:4])}{' …' if len(names) > 4 else ''} ({len(names)})[/]")

    root, node = Tree("lineage"), lineage(manifest)
    add(root, node)
    stdout_console().print(root)
    if node.manifest is None:  # the manifest asked for is missing or unreadable: not a lineage at all
        raise RegtokError(node.status.removeprefix("unreadable: ") if node.status != "missing"
                          else f"{node.path}: no manifest here")


@main.command()
@click.argument("manifest", type=click.Path(exists=True))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="New directory for the rerun [default: a fresh temporary directory].")
@click.option("--root", type=click.Path(exists=True, file_okay=False), default=None,
              help="Directory the manifest may read from [default: the current directory and the one holding the "
              "stage's directory].")
@click.option("--allow-outside", is_flag=True, help="Let the manifest name files outside --root.")
def rerun(manifest: str, out: str | None, root: str | None, allow_outside: bool) -> None:
    """Re-execute the stage that wrote MANIFEST into a new directory and compare the results.

    \b
    dataset:  shards byte-identical          features: arrays identical
    run:      weights identical (CPU)        eval:     report numbers identical
    A GPU training run is compared by its final metrics within a tolerance. Exit status 1 on a difference.
    """
    import tempfile

    from regtok.pipeline.lineage import rerun_stage
    from regtok.pipeline.runtime.console import stderr_console
    from regtok.pipeline.runtime.startup import keep_freed_memory

    keep_freed_memory()  # as in the stage it reruns
    console = stderr_console()
    target = out or tempfile.mkdtemp(prefix="regtok-rerun-")
    result = rerun_stage(manifest, target, root=root, allow_outside=allow_outside,
                         log=lambda msg: console.print(f"[dim]{msg}[/]"))
    for c in result.checks:
        mark = "[green]match[/]" if c.matched else "[red]DIFFERS[/]"
        console.print(f"{mark:>20s}  {c.what}  [dim]{c.detail}[/]")
    verdict = "reproduced" if result.ok else "NOT reproduced"
    console.print(f"[bold]{result.kind} {verdict}[/]: {sum(c.matched for c in result.checks)}/{len(result.checks)} "
                  f"checks match; rerun in {result.out}")
    click.echo(result.out)
    if not result.ok:
        raise SystemExit(1)


@main.command()
@click.argument("manifest", type=click.Path(exists=True))
def verify(manifest: str) -> None:
    """Check that every file MANIFEST records (inputs, shards, parts, outputs) still matches its sha256."""
    from regtok.pipeline.lineage import verify as verify_files

    checks = verify_files(manifest)
    bad = [c for c in checks if c.status != "ok"]
    for c in checks:
        click.echo(f"{c.status:8s} {c.role:7s} {c.recorded}")
    click.echo(f"{len(checks) - len(bad)}/{len(checks)} files match their recorded sha256", err=True)
    if bad:
        raise SystemExit(1)
