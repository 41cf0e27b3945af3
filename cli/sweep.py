"""Searching and comparing configurations: `regtok sweep` and `regtok compare`."""

from __future__ import annotations

import click

from regtok.cli import CONTEXT, main
from regtok.cli.train import check_device, train_config, train_config_options
from regtok.errors import RegtokError
from regtok.pipeline.sweep import KEEP, MAX_GRID_POINTS, METRICS, PRUNERS, SAMPLERS


@main.command(context_settings=CONTEXT)
@click.option("--features", required=True, type=click.Path(exists=True), help="Feature store (dir or manifest).")
@click.option("--val-features", type=click.Path(exists=True), help="Held-out store every trial validates on.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Sweep directory.")
@click.option("--space", "space_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML search space: config key → list of choices, or {low, high, log} (see configs/).")
@click.option("--grid", multiple=True, metavar="KEY=V1,V2,…", help="A grid axis given inline (repeatable).")
@click.option("--sampler", type=click.Choice(SAMPLERS), default="grid",
              help=f"Optuna sampler (a grid has at most {MAX_GRID_POINTS:,} points).")
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Finished trials to reach  [default: the grid's size; 20 for tpe and random]")
@click.option("--jobs", type=click.IntRange(min=1), default=1,
              help="Worker processes on this machine (at most one per trial left).")
@click.option("--storage", default=None, help="Optuna storage URL, shared by workers on several machines  "
              "[default: sqlite:///OUT/study.db]")
@click.option("--study", "study_name", default="regtok", help="Study name in the storage.")
@click.option("--metric", type=click.Choice(METRICS), default="val/select", metavar="NAME",
              help="What trials are scored by: val/select (what keep_best ranks epochs by: full-prefix R@1, after "
                   "transport for flow_matching runs), val/R@1 (full prefix, untransported), or a val_r1_* key.")
@click.option("--prune/--no-prune", default=True, help="Stop hopeless trials early (after each epoch).")
@click.option("--pruner", type=click.Choice(PRUNERS), default="median")
@click.option("--tensorboard", is_flag=True, help="TensorBoard events in every trial and the HParams experiment "
              "(tensorboard --logdir OUT).")
@click.option("--keep", type=click.Choice(KEEP), default="best", help="Weight files a finished trial keeps: best (what "
              "eval needs: the best weights and the start), last (what --resume needs; eval then uses the last "
              "weights and fits the start again), all.")
@click.option("--overwrite", is_flag=True, help="Write into --out even if it holds files that are not a sweep's.")
@train_config_options
def sweep(features: str, val_features: str | None, out: str, space_file: str | None, grid: tuple[str, ...],
          sampler: str, trials: int | None, jobs: int, storage: str | None, study_name: str, metric: str,
          prune: bool, pruner: str, tensorboard: bool, keep: str, config_file: str | None, preset: str | None,
          loss: str | None, epochs: int | None, batch_size: int | None, lr: float | None, seed: int | None,
          device: str | None, val_fraction: float | None, overrides: tuple[str, ...], overwrite: bool = False) -> None:
    """Search training configs on one feature store with Optuna; each trial is an ordinary run in OUT/trials/.

    \b
    The train flags and key=value overrides are shared by every trial; the space varies the rest.
    Rerunning the same command continues a stopped sweep. Writes OUT/report.json, report.md, sweep.png,
    best.yaml (for `regtok train --config`) and manifest.json; prints report.json's path.
    """
    import sys
    from pathlib import Path

    from regtok.pipeline.runtime.config_io import load_yaml
    from regtok.pipeline.runtime.console import stderr_console
    from regtok.pipeline.runtime.startup import gc_paused
    from regtok.pipeline.sweep import SweepConfig, parse_grid, parse_space

    with gc_paused(freeze=True):
        from regtok.pipeline.sweep import run_sweep

    if not space_file and not grid:
        raise RegtokError("give a search space: --space SPACE.yaml or --grid KEY=V1,V2,…")
    raw = {**(load_yaml(space_file) if space_file else {}), **parse_grid(grid)}
    space = parse_space(raw, space_file or "--grid")
    base = train_config(preset, config_file, None, overrides, val_fraction=val_fraction, epochs=epochs,
                         batch_size=batch_size, lr=lr, seed=seed, device=device, loss=loss)
    check_device(base.device)
    if tensorboard:
        from regtok.pipeline.train import require_tensorboard

        require_tensorboard()
    scfg = SweepConfig(sampler=sampler, trials=trials, jobs=jobs, storage=storage, study=study_name, metric=metric,
                       prune=prune, pruner=pruner, seed=base.seed, tensorboard=tensorboard, keep=keep)
    console = stderr_console()
    report = run_sweep(features, out, scfg, space, base, val_features=val_features,
                       command=["regtok", *sys.argv[1:]], console=console, overwrite=overwrite)
    _print_trials(console, report)
    click.echo(str(Path(out) / "report.json"))
    if report["trials"] and not report["counts"]["complete"] + report["counts"]["pruned"]:
        first = report["trials"][0]
        raise RegtokError(f"every trial failed (first: trial {first['number']}: {first['error']}); see report.md")


def _print_trials(console, report: dict, top: int = 10) -> None:
    from rich.table import Table

    from regtok.pipeline.sweep import notes, pct

    names = list(report["space"])
    table = Table("trial", "state", f"{report['metric']} (%)", "kept epoch", "epochs", "s", *names,
                  title=f"top trials of {len(report['trials'])} ({report['sampler']} sampler)")
    for r in report["trials"][:top]:
        table.add_row(str(r["number"]), r["state"], pct(r["value"]), str(r["kept_epoch"] or "—"),
                      str(r["epochs"] or "—"), f"{r['seconds']:.1f}" if r["seconds"] else "—",
                      *(str(r["params"].get(k, "—")) for k in names))
    console.print(table)
    for g in report["groups"]:
        params = ", ".join(f"{k}={v}" for k, v in g["params"].items())
        console.print(f"over seeds: {params}: {pct(g['mean'])} ± {pct(g['std'])} % (n={g['n']})", markup=False,
                      highlight=False, soft_wrap=True)
    for line in notes(report):
        console.print(line.replace("**", ""), markup=False, highlight=False, soft_wrap=True)
    failed = [r for r in report["trials"] if r["state"] == "fail" and r["retried_as"] is None]
    if failed:
        console.print(f"[yellow]{len(failed)} trial(s) failed[/], first: trial {failed[0]['number']}: "
                      f"{failed[0]['error']}")
    if report["best"] is not None:
        console.print(f"best: trial {report['best']['number']} → best.yaml")



@main.command(context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Also write OUT/compare.md and OUT/curves.png (the validation score against epoch per row).")
@click.option("--all-keys", is_flag=True, help="Show every config key, not only those that differ.")
@click.option("--overwrite", is_flag=True, help="Write into --out even if it holds something other than an "
              "earlier compare output.")
def compare(paths: tuple[str, ...], out: str | None, all_keys: bool, overwrite: bool = False) -> None:
    """Put runs, eval reports or sweeps (their trials) side by side: one row per configuration, runs that differ
    only in seed together as mean ± std (n); the config keys that differ are highlighted. Recalls in %."""
    from rich.table import Table

    from regtok.pipeline.runtime.console import stdout_console
    from regtok.pipeline.sweep import run_compare

    tables, written = run_compare(paths, out, all_keys=all_keys, overwrite=overwrite,
                                  warn=lambda msg: click.echo(f"warning: {msg}", err=True))
    console = stdout_console()  # piped or logged: the whole table, never a truncated cell
    for t in tables:
        table = Table(*[f"[bold yellow]{c}[/]" if i in t.highlight else c for i, c in enumerate(t.columns)],
                      title=t.title)
        for row in t.rows:
            table.add_row(*row)
        console.print(table)
        for note in t.notes:
            console.print(note, markup=False, highlight=False, soft_wrap=True)
    if written is not None:
        click.echo(str(written), err=True)
