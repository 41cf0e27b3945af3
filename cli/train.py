"""Stage 2: `regtok train`, `regtok sweep` and `regtok compare`."""

from __future__ import annotations

import click

from regtok.cli import CONTEXT, device_option, main
from regtok.errors import RegtokError
from regtok.pipeline.sweep import KEEP, METRICS, PRUNERS, SAMPLERS
from regtok.pipeline.sweep_study import MAX_GRID_POINTS


def _train_config_options(command):
    """The options that build a training config, shared by `train` and `sweep` (each trial starts from them)."""
    from regtok.config import LOSS_TYPES, PRESETS, TrainConfig

    def default(key: str) -> str:
        """Where a flag's value comes from when it is not given: the config's default, and each preset's."""
        presets = ", ".join(f"{p} preset {v[key]:g}" for p, v in PRESETS.items() if key in v)
        return f"[default: {getattr(TrainConfig(), key):g} (TrainConfig){'; ' + presets if presets else ''}]"

    options = [
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                     help="YAML config diff (only what differs; examples in configs/)."),
        click.option("--preset", type=click.Choice(list(PRESETS)), help="Named preset applied before the YAML."),
        click.option("--loss", type=click.Choice(LOSS_TYPES), help="model.loss_type"),
        click.option("--epochs", type=int, help=f"Training epochs.  {default('epochs')}"),
        click.option("--batch-size", type=int, help=f"Global batch (all ranks together).  {default('batch_size')}"),
        click.option("--lr", type=float, help=f"Peak learning rate.  {default('lr')}"),
        click.option("--seed", type=int),
        device_option(None, f"[default: {TrainConfig().device} (TrainConfig)]"),
        click.option("--val-fraction", type=float, help="Else hold out this seeded fraction of --features."),
        click.argument("overrides", nargs=-1),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _train_config(preset: str | None, config_file: str | None, saved: dict | None, overrides: tuple[str, ...],
                  **flags):
    """defaults → preset → (a resumed run's saved config) → YAML → flags → key=value overrides."""
    from regtok.config import TrainConfig, resolve
    from regtok.pipeline.runtime.config_io import load_yaml, parse_overrides

    loss = flags.pop("loss", None)
    flags = {("compile" if k == "compile_" else k): v for k, v in flags.items() if v is not None}
    if loss is not None:
        flags["model"] = {"loss_type": loss}
    return resolve(TrainConfig, preset, saved, load_yaml(config_file) if config_file else None, flags,
                   parse_overrides(overrides))


@main.command(context_settings=CONTEXT)
@click.option("--features", type=click.Path(exists=True), help="Feature store (dir or manifest).  [required]")
@click.option("--val-features", type=click.Path(exists=True), help="Held-out store for per-epoch validation.")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory.  [required]")
@click.option("--print-config", is_flag=True, help="Print the resolved config (YAML) and exit; nothing is trained.")
@click.option("--resume", is_flag=True, help="Continue from the run's last checkpoint (same config).")
@click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the loss step.")
@click.option("--tensorboard", is_flag=True, help="Also write TensorBoard event files to RUN_DIR/tb/ "
              "(needs the tensorboard package: pip install -e '.[tb]').")
@click.option("--overwrite", is_flag=True, help="Write into --out even if it holds something other than a run, "
              "or start the run there again (its files are replaced).")
@_train_config_options
def train(features: str, val_features: str | None, val_fraction: float | None, out: str, config_file: str | None,
          preset: str | None, loss: str | None, epochs: int | None, batch_size: int | None, lr: float | None,
          seed: int | None, device: str | None, resume: bool, compile_: bool | None,
          overrides: tuple[str, ...], tensorboard: bool = False, print_config: bool = False,
          overwrite: bool = False) -> None:
    """Train the register modules on a cached feature store; prints the run manifest's path.

    \b
    Config: defaults → --preset → --config YAML → flags → key=value overrides (e.g. model.n_layers=2 lr=1e-3).
    Under `torchrun --nproc_per_node=N --no-python regtok train …` it runs DDP; rank 0 writes RUN_DIR.
    """

    import yaml

    from regtok.config import to_dict
    from regtok.pipeline.runtime.console import stderr_console
    from regtok.pipeline.runtime.startup import gc_paused, keep_freed_memory

    keep_freed_memory()  # CPU forward passes without faulting their activations in again
    with gc_paused(freeze=True):  # torch's import: ~0.1 s less
        from regtok.pipeline.runtime.console import epoch_line, train_progress
        from regtok.pipeline.runtime.distributed import is_main_process
        from regtok.pipeline.train import saved_train_config, train_run

    saved = saved_train_config(out) if resume and out else None
    cfg = _train_config(preset, config_file, saved, overrides, val_fraction=val_fraction, epochs=epochs,
                        batch_size=batch_size, lr=lr, seed=seed, device=device, compile_=compile_, loss=loss)
    if print_config:
        click.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
        return
    if not features or not out:
        raise click.UsageError("--features and --out are required (unless --print-config)")
    _check_device(cfg.device)  # before the resolved config is printed
    if tensorboard:
        from regtok.pipeline.train import require_tensorboard

        require_tensorboard()
    console = stderr_console()
    is_main = is_main_process()
    if is_main:
        console.print("[bold]resolved config[/]\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    plain = not console.is_terminal  # a log file, nohup, CI: one complete line per epoch instead of a bar
    on_epoch = None
    if is_main and plain:
        def on_epoch(record: dict) -> None:
            console.print(epoch_line(record, cfg.epochs), markup=False, highlight=False, soft_wrap=True)
    try:
        with train_progress(console, disable=not is_main or plain) as on_step:
            manifest, result = train_run(features, out, cfg, val_features=val_features, resume=resume,
                                         on_step=on_step, notify=lambda msg: is_main and console.print(msg),
                                         on_epoch=on_epoch, tensorboard=tensorboard and is_main, overwrite=overwrite)
    except KeyboardInterrupt:
        from regtok.errors import Interrupted

        raise Interrupted(f"interrupted; add --resume to the same command to continue {out} from its last "
                          "checkpoint") from None
    if manifest is not None:
        _print_result(console, out, result)
        click.echo(str(manifest))


def _print_result(console, out: str, result) -> None:
    from rich.table import Table

    from regtok.pipeline.spread import pct

    table = Table("final epoch", "value", title=f"{out}: {result.step} steps (recalls in %)")
    for k, v in result.metrics.items():
        if "/" not in k or k in ("val/R@1", "best/val_select", "best/epoch"):
            table.add_row(k, pct(v) if "val" in k else f"{v:.4g}")
    console.print(table)


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
              "eval needs), last (what --resume needs; eval then uses the last weights), all.")
@click.option("--overwrite", is_flag=True, help="Write into --out even if it holds files that are not a sweep's.")
@_train_config_options
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
    from regtok.pipeline.space import parse_grid, parse_space
    from regtok.pipeline.sweep import SweepConfig

    with gc_paused(freeze=True):
        from regtok.pipeline.sweep import run_sweep

    if not space_file and not grid:
        raise RegtokError("give a search space: --space SPACE.yaml or --grid KEY=V1,V2,…")
    raw = {**(load_yaml(space_file) if space_file else {}), **parse_grid(grid)}
    space = parse_space(raw, space_file or "--grid")
    base = _train_config(preset, config_file, None, overrides, val_fraction=val_fraction, epochs=epochs,
                         batch_size=batch_size, lr=lr, seed=seed, device=device, loss=loss)
    _check_device(base.device)
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

    from regtok.pipeline.spread import pct
    from regtok.pipeline.sweep_report import notes

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


def _check_device(device: str) -> None:
    """A device that is not here (--device cuda without CUDA) is one error line before any output."""
    from regtok.distributed import resolve_device

    resolve_device(device)


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
    from pathlib import Path

    from rich.table import Table

    from regtok.pipeline.compare import load_entries, plot_curves, render_markdown, tables
    from regtok.pipeline.runtime.console import stdout_console

    if out is not None:
        from regtok.pipeline.manifests.outdir import claim, compare_foreign

        claim(Path(out), compare_foreign(Path(out)), "compare", overwrite)
    entries = load_entries(list(paths), warn=lambda msg: click.echo(f"warning: {msg}", err=True))
    console = stdout_console()  # piped or logged: the whole table, never a truncated cell
    for t in tables(entries, all_keys):
        table = Table(*[f"[bold yellow]{c}[/]" if i in t.highlight else c for i, c in enumerate(t.columns)],
                      title=t.title)
        for row in t.rows:
            table.add_row(*row)
        console.print(table)
        for note in t.notes:
            console.print(note, markup=False, highlight=False, soft_wrap=True)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        plot_curves(entries, Path(out) / "curves.png")
        (Path(out) / "compare.md").write_text(render_markdown(entries, all_keys))
        click.echo(str(Path(out) / "compare.md"), err=True)
