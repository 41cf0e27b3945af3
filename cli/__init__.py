"""The `regtok` command line: glue only (parse flags, build the config, call the library, print a summary).

One module per stage, as ``pipeline/`` has one folder per stage: ``data`` (synth, pack), ``extract``, ``train``,
``sweep`` (sweep, compare), ``eval``, ``embed``, ``lineage`` (demo, show, rerun, verify). Installed as ``regtok.cli``.

Heavy imports (torch, h5py, open_clip …) happen inside each command so that `regtok --help` is instant.
Progress and logs go to stderr; stdout carries only results. A user error is one line and exit status 2.
"""

from __future__ import annotations

import re

import click

from regtok.errors import ENVIRONMENT_ERRNOS, RegtokError

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


class _Group(click.Group):
    """A click group that turns :class:`RegtokError`, a usage error and an OSError of the environment (disk full,
    read-only) into one line on stderr and exit status 2, and Ctrl-C into one line and exit status 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RegtokError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:  # Ctrl-C where the command has nothing to add: one line, not a traceback
            click.echo("error: interrupted", err=True)
            ctx.exit(130)
        except click.UsageError as e:  # click's own would be a usage block and a capitalised "Error:"
            message = " ".join(e.format_message().split()).rstrip(".")
            where = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
            click.echo(f"error: {message[:1].lower()}{message[1:]}{where}", err=True)
        except OSError as e:
            if e.errno not in ENVIRONMENT_ERRNOS:
                raise
            click.echo(f"error: {e.strerror}" + (f": {e.filename}" if e.filename else ""), err=True)
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



def config_default(cls: type, name: str):
    """The default of a config dataclass field: the one source every option's default comes from."""
    import dataclasses

    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def config_option(cls: type, name: str, *decls: str, **kwargs):
    """A click option for the field ``name`` of config ``cls``, its default taken from the dataclass (tuples are
    shown and parsed as comma-separated lists by the option's callback)."""
    default = config_default(cls, name)
    if isinstance(default, tuple):
        default = ",".join(map(str, default))
    return click.option(*(decls or (f"--{name.replace('_', '-')}",)), name, default=default, **kwargs)


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not DEVICE.fullmatch(value):
        raise click.BadParameter(f"{value!r}: expected auto, cpu, cuda or cuda:N")
    return value


def device_option(default: str | None = "auto", note: str = ""):
    """``--device``: auto (a GPU when there is one), cpu, cuda or cuda:N; the same option on every command."""
    return click.option("--device", default=default, callback=_device, metavar="auto|cpu|cuda[:N]",
                        help=f"Where the work runs.{' ' + note if note else ''}")


def workers_count(ctx: click.Context, param: click.Parameter, value: str) -> int | str:
    """``--workers``: auto, or a count of DataLoader workers >= 0 (extract and embed)."""
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise click.BadParameter(f"{value!r}: expected auto or a count >= 0")
    return n


# The commands register themselves on ``main`` when imported, in the pipeline's order.
from regtok.cli import data, extract, train, sweep, eval, embed, lineage  # noqa: E402, F401, I001
