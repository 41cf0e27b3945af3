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


if __name__ == "__main__":
    main()
