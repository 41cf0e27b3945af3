"""The `regtok` command line: glue only (parse flags, build the config, call the library, print a summary).

Heavy imports (torch, h5py, open_clip …) happen inside each command so that `regtok --help` is instant.
Progress and logs go to stderr; stdout carries only results. A user error is one line and exit status 2.
"""

from __future__ import annotations

import click

from regtok.errors import RegtokError

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


class _Group(click.Group):
    """A click group that turns :class:`RegtokError` into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RegtokError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # in the order of the pipeline, not alphabetical


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(package_name="regtok", prog_name="regtok")
def main() -> None:
    """regtok: align two sensing modalities with register tokens on cached frozen-encoder features.

    \b
    Pipeline:  shards ──extract──▶ feature store ──train──▶ run ──eval──▶ report
    Every stage writes a manifest.json that the next stage reads.
    """


# ── data: synth, pack ───────────────────────────────────────────────────────────────────────────────


# ── stage 1: extract ────────────────────────────────────────────────────────────────────────────────


# ── stage 2: train ──────────────────────────────────────────────────────────────────────────────────


# ── stage 3: eval ───────────────────────────────────────────────────────────────────────────────────


# ── pipeline: demo, show, verify, rerun ─────────────────────────────────────────────────────────────


@main.command()
@click.argument("manifest", type=click.Path(exists=True))
def show(manifest: str) -> None:
    """Print the chain of manifests behind MANIFEST (a file or a stage directory) back to the shards."""
    from rich.console import Console
    from rich.tree import Tree

    from pipeline.lineage import lineage, summary_line

    def add(tree: Tree, node) -> None:
        mark = {"ok": "[green]✓[/]", "missing": "[red]missing[/]", "changed": "[red]changed since recorded[/]"}
        kind = node.manifest["kind"] if node.manifest else "?"
        label = f"[bold]{kind}[/] {node.path}  {mark.get(node.status, node.status)}"
        if node.manifest:
            label += f"\n[dim]{summary_line(node.manifest)}[/]"
        branch = tree.add(label)
        for parent in node.parents:
            add(branch, parent)
        shards = (node.manifest or {}).get("shards") or []
        if shards:
            names = [s.get("path", "?") for s in shards]
            branch.add(f"[dim]shards: {', '.join(names[:4])}{' …' if len(names) > 4 else ''} ({len(names)})[/]")

    root = Tree("lineage")
    add(root, lineage(manifest))
    Console().print(root)


@main.command()
@click.argument("manifest", type=click.Path(exists=True))
def verify(manifest: str) -> None:
    """Check that every file MANIFEST records (inputs, shards, parts, outputs) still matches its sha256."""
    from pipeline.lineage import verify as verify_files

    checks = verify_files(manifest)
    bad = [c for c in checks if c.status != "ok"]
    for c in checks:
        click.echo(f"{c.status:8s} {c.role:7s} {c.recorded}")
    click.echo(f"{len(checks) - len(bad)}/{len(checks)} files match their recorded sha256", err=True)
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
