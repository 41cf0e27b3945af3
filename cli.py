"""The `regtok` command line: glue only (parse flags, build the config, call the library, print a summary).

Heavy imports (torch, h5py, open_clip …) happen inside each command so that `regtok --help` is instant.
Progress and logs go to stderr; stdout carries only results. A user error is one line and exit status 2.
"""

from __future__ import annotations

import errno

import click

from pipeline.sweep import METRICS, PRUNERS, SAMPLERS
from regtok.errors import RegtokError

# OSErrors a user's environment causes (a full disk, a read-only or forbidden --out): one line, not a traceback.
USER_OS_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR)

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


class _Group(click.Group):
    """A click group that turns :class:`RegtokError`, a usage error and an OSError of the environment (disk full,
    read-only) into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RegtokError as e:
            click.echo(f"error: {e}", err=True)
        except click.UsageError as e:  # click's own would be a usage block and a capitalised "Error:"
            message = " ".join(e.format_message().split()).rstrip(".")
            where = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
            click.echo(f"error: {message[:1].lower()}{message[1:]}{where}", err=True)
        except OSError as e:
            if e.errno not in USER_OS_ERRORS:
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


# ── data: synth, pack ───────────────────────────────────────────────────────────────────────────────


@main.command(context_settings=CONTEXT)
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--samples", default=2000, type=int, help="Number of vision/tactile pairs.")
@click.option("--shards", default=4, type=int, help="Number of tar shards (samples split evenly, in key order).")
@click.option("--seed", default=0, type=int, help="Seed; each sample's generator is derived from (seed, index).")
@click.option("--image-size", default=64, type=int, help="Width and height of both images, in pixels.")
@click.option("--families", default=None, metavar="NAME,…",
              help="Draw only these material families (comma-separated), e.g. a test split of surfaces the "
                   "training split never holds  [default: all eight]")
@click.option("--overwrite", is_flag=True, help="Write into OUT_DIR even if it holds something other than an "
              "earlier synth output.")
def synth(out_dir: str, samples: int, shards: int, seed: int, image_size: int, families: str | None,
          overwrite: bool = False) -> None:
    """Write the embedded synthetic set: paired photo / GelSight-style images of procedural surfaces.

    Shared factors (material family, roughness, frequency, orientation) shape both images; albedo, light and
    camera noise change only the photo; press depth, gel blur and sensor noise only the touch. KEY.json holds
    every factor. Same arguments give byte-identical shards. Prints the path of OUT_DIR/dataset.json.
    """
    from pathlib import Path

    from pipeline.console import progress, stderr_console
    from pipeline.synth import check_args, check_families, synthesize

    check_args(samples, shards, image_size)  # before the progress bar shows, so an error is one line
    chosen = check_families(None if families is None else [f.strip() for f in families.split(",") if f.strip()])
    console = stderr_console()
    with progress(console) as bar:
        task = bar.add_task("synth", total=samples)
        m = synthesize(out_dir, samples, shards, seed, image_size, progress=lambda n: bar.advance(task, n),
                       families=chosen, overwrite=overwrite)
    size = sum(s["bytes"] for s in m["shards"])
    console.print(f"Wrote {m['samples']:,} vision/tactile pairs ({image_size} px PNG, "
                  f"material families {', '.join(chosen)}) in {len(m['shards'])} shard(s), "
                  f"{size / 1e6:.1f} MB, in {m['timings']['seconds']:.1f} s with seed {seed}. "
                  f"Labels: {', '.join(m['labels'])}.")
    click.echo(str(Path(out_dir) / "dataset.json"))


@main.command(context_settings=CONTEXT)
@click.argument("csv_path", metavar="CSV", type=click.Path(dir_okay=False))
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Folder the CSV's image paths are relative to  [default: the CSV's folder]")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--vision-col", default="url", help="CSV column with the vision image path.")
@click.option("--tactile-col", default="tactile", help="CSV column with the tactile image path.")
@click.option("--label-col", "label_cols", multiple=True,
              help="Label column (repeatable): numeric columns stay numbers, text columns become class indices, "
              "free text (a caption) stays text unless named COL:class.")
@click.option("--labels-from", type=click.Path(dir_okay=False), default=None, metavar="TRAIN/dataset.json",
              help="Reuse another split's label schema, so class indices match it (its labels are the default "
              "--label-col); a class it lacks is an error.")
@click.option("--samples-per-shard", default=1000, type=int, help="Samples per tar shard.")
@click.option("--allow-outside-root", is_flag=True,
              help="Read image paths that resolve outside --root (else such rows are skipped and listed).")
@click.option("--overwrite", is_flag=True, help="Write into --out even if it holds something other than an "
              "earlier pack output.")
def pack(csv_path: str, root: str | None, out_dir: str, vision_col: str, tactile_col: str,
         label_cols: tuple[str, ...], samples_per_shard: int, allow_outside_root: bool = False,
         overwrite: bool = False, labels_from: str | None = None) -> None:
    """Pack a paired dataset given as a CSV of relative image paths (TVL / SSVTP layout) into shards.

    Image bytes are copied unchanged after a decode check; every CSV column goes into KEY.json. Rows with a
    missing or unreadable image are skipped and listed in dataset.json. Prints the path of OUT_DIR/dataset.json.
    """
    from pathlib import Path

    from pipeline.console import progress, stderr_console
    from pipeline.pack import pack as pack_csv

    console = stderr_console()
    bar = progress(console)

    def start(rows: int) -> None:  # once the CSV and its columns are checked, so an error there is one line
        bar.start()
        bar.add_task("pack", total=rows)

    try:
        m = pack_csv(csv_path, root, out_dir, vision_col=vision_col, tactile_col=tactile_col,
                     label_cols=label_cols, samples_per_shard=samples_per_shard,
                     progress=lambda n: bar.advance(bar.task_ids[0], n), on_rows=start,
                     allow_outside_root=allow_outside_root, overwrite=overwrite, labels_from=labels_from)
    finally:
        bar.stop()
    skipped = m["skipped"]
    console.print(f"Packed {m['samples']:,} of {m['source']['rows']:,} rows into {len(m['shards'])} shard(s) "
                  f"in {m['timings']['seconds']:.1f} s; skipped {len(skipped)}"
                  + (f" (first: row {skipped[0]['row']}, {skipped[0]['reason']})" if skipped else "")
                  + f". Labels: {', '.join(m['labels']) or 'none'}.")
    click.echo(str(Path(out_dir) / "dataset.json"))


# ── stage 1: extract ────────────────────────────────────────────────────────────────────────────────


def _encoder_pair(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in value:
        modality, sep, spec = item.partition("=")
        if not sep or not modality.strip() or not spec.strip():
            raise click.BadParameter(f"{item!r}: expected MODALITY=SPEC, e.g. tactile=tiny")
        pairs.append((modality.strip(), spec.strip()))
    return tuple(pairs)


def _workers(ctx: click.Context, param: click.Parameter, value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise click.BadParameter(f"{value!r}: expected auto or a count >= 0")
    return n


@main.command(context_settings=CONTEXT)
@click.option("--shards", required=True, help="Brace pattern (data/shard-{000000..000015}.tar), a directory of "
              ".tar files, or a dataset.json from `regtok synth`/`regtok pack`.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Feature store directory.")
@click.option("--encoder", "encoders", multiple=True, required=True, callback=_encoder_pair,
              metavar="MODALITY=SPEC", help="One per modality, in pair order (A first). SPEC: open_clip:MODEL@TAG, "
              "open_clip:hf-hub:ORG/NAME, open_clip:MODEL@/path/weights, timm:MODEL.TAG (timm's pretrained tags), "
              "timm:MODEL@/path/weights.{pth,safetensors}, "
              "tvl:MODEL@/path/ckpt.pth (TVL Stage-1 tactile encoder), tiny[:SEED] (random-init test encoder).")
@click.option("--tokens", is_flag=True, help="Also store token features (n, T, D_tok) per modality.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="Images per forward pass.")
@click.option("--workers", default="auto", show_default=True, callback=_workers,
              help="DataLoader workers decoding shards, or auto: none on the CPU (the forward uses every core), "
              "up to 8 per GPU.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--max-skip-fraction", type=click.FloatRange(0, 1), default=0.01,
              help="Exit non-zero (after writing the store) when more input than this was skipped.")
@click.option("--overwrite", is_flag=True, help="Write into --out even if it holds something other than an "
              "earlier extraction.")
def extract(shards: str, out: str, encoders: tuple[tuple[str, str], ...], tokens: bool, batch_size: int,
            workers: int | str, device: str, max_skip_fraction: float, overwrite: bool = False) -> None:
    """Run frozen encoders over WebDataset shards into an HDF5 feature store (one part per shard).

    Rerunning the same command resumes: finished parts are kept. Under `torchrun --nproc_per_node=N`
    the ranks split the shards. Prints the store's manifest path on stdout.
    """
    import os
    import sys
    from pathlib import Path

    from pipeline.console import stderr_console
    from pipeline.startup import gc_paused, keep_freed_memory

    keep_freed_memory()  # CPU forward passes without faulting their activations in again
    with gc_paused(freeze=True):  # torch's import: ~0.1 s less
        from pipeline.extract import ExtractConfig, run_extract

    spec = "::".join(str(Path(part).absolute()) for part in shards.split("::"))  # reruns may start elsewhere
    config = ExtractConfig(shards=spec, out=str(Path(out).absolute()), encoders=encoders, tokens=tokens,
                           batch_size=batch_size, workers=workers, device=device,
                           max_skip_fraction=max_skip_fraction)
    console = stderr_console()
    path, manifest = run_extract(config, command=["regtok", *sys.argv[1:]], console=console,
                                 show_progress=os.environ.get("REGTOK_NO_PROGRESS") is None, overwrite=overwrite)
    if manifest is None:
        return  # a torchrun rank other than 0
    t = manifest["timings"]
    stored_tokens = "tokens" in manifest.get("feature_kinds", [])  # the encoders know a token shape either way
    dims = ", ".join(f"{m} {e['pooled_dim']}" + (f" tok {tuple(e['token_shape'])}" if stored_tokens else "")
                     for m, e in manifest["encoders"].items())
    console.print(f"extracted {manifest['samples']} samples in {len(manifest['parts'])} parts ({dims}); "
                  f"skipped {manifest['skip_count']}; {t['images_per_s']} images/s over {t['seconds']} s")
    click.echo(str(path))



# ── stage 2: train ──────────────────────────────────────────────────────────────────────────────────


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
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"])),
        click.option("--val-fraction", type=float, help="Else hold out this seeded fraction of --features."),
        click.argument("overrides", nargs=-1),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _train_config(preset: str | None, config_file: str | None, saved: dict | None, overrides: tuple[str, ...],
                  **flags):
    """defaults → preset → (a resumed run's saved config) → YAML → flags → key=value overrides."""
    from pipeline.config_io import load_yaml, parse_overrides
    from regtok.config import TrainConfig, resolve

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
@_train_config_options
def train(features: str, val_features: str | None, val_fraction: float | None, out: str, config_file: str | None,
          preset: str | None, loss: str | None, epochs: int | None, batch_size: int | None, lr: float | None,
          seed: int | None, device: str | None, resume: bool, compile_: bool | None,
          overrides: tuple[str, ...], tensorboard: bool = False, print_config: bool = False) -> None:
    """Train the register modules on a cached feature store; prints the run manifest's path.

    \b
    Config: defaults → --preset → --config YAML → flags → key=value overrides (e.g. model.n_layers=2 lr=1e-3).
    Under `torchrun --nproc_per_node=N --no-python regtok train …` it runs DDP; rank 0 writes RUN_DIR.
    """
    import os

    import yaml

    from pipeline.console import stderr_console
    from pipeline.startup import gc_paused, keep_freed_memory
    from regtok.config import to_dict

    keep_freed_memory()  # CPU forward passes without faulting their activations in again
    with gc_paused(freeze=True):  # torch's import: ~0.1 s less
        from pipeline.runs import epoch_line, saved_train_config, train_progress, train_run

    saved = saved_train_config(out) if resume and out else None
    cfg = _train_config(preset, config_file, saved, overrides, val_fraction=val_fraction, epochs=epochs,
                        batch_size=batch_size, lr=lr, seed=seed, device=device, compile_=compile_, loss=loss)
    if print_config:
        click.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
        return
    if not features or not out:
        raise click.UsageError("--features and --out are required (unless --print-config)")
    if tensorboard:
        _require_tensorboard()
    console = stderr_console()
    is_main = os.environ.get("RANK", "0") == "0"
    if is_main:
        console.print("[bold]resolved config[/]\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    plain = not console.is_terminal  # a log file, nohup, CI: one complete line per epoch instead of a bar
    on_epoch = None
    if is_main and plain:
        def on_epoch(record: dict) -> None:
            console.print(epoch_line(record, cfg.epochs), markup=False, highlight=False, soft_wrap=True)
    with train_progress(console, disable=not is_main or plain) as on_step:
        manifest, result = train_run(features, out, cfg, val_features=val_features, resume=resume,
                                     on_step=on_step, notify=lambda msg: is_main and console.print(msg),
                                     on_epoch=on_epoch, tensorboard=tensorboard and is_main)
    if manifest is not None:
        from rich.table import Table

        table = Table("final epoch", "value", title=f"{out}: {result.step} steps")
        for k, v in result.metrics.items():
            if "/" not in k or k == "val/R@1":
                table.add_row(k, f"{v:.4g}")
        console.print(table)
        click.echo(str(manifest))


def _require_tensorboard() -> None:
    """One error line, before any work, when the tensorboard package is missing."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise RegtokError("--tensorboard needs the tensorboard package: pip install -e '.[tb]'")


@main.command(context_settings=CONTEXT)
@click.option("--features", required=True, type=click.Path(exists=True), help="Feature store (dir or manifest).")
@click.option("--val-features", type=click.Path(exists=True), help="Held-out store every trial validates on.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Sweep directory.")
@click.option("--space", "space_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML search space: config key → list of choices, or {low, high, log} (see configs/).")
@click.option("--grid", multiple=True, metavar="KEY=V1,V2,…", help="A grid axis given inline (repeatable).")
@click.option("--sampler", type=click.Choice(SAMPLERS), default="grid", help="Optuna sampler.")
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Finished trials to reach  [default: the grid's size; 20 for tpe and random]")
@click.option("--jobs", type=click.IntRange(min=1), default=1, help="Worker processes on this machine.")
@click.option("--storage", default=None, help="Optuna storage URL, shared by workers on several machines  "
              "[default: sqlite:///OUT/study.db]")
@click.option("--study", "study_name", default="regtok", help="Study name in the storage.")
@click.option("--metric", type=click.Choice(METRICS), default="val/select", metavar="NAME",
              help="What trials are scored by: val/select (what keep_best ranks epochs by: full-prefix R@1, after "
                   "transport for flow_matching runs), val/R@1 (full prefix, untransported), or a val_r1_* key.")
@click.option("--prune/--no-prune", default=True, help="Stop hopeless trials early (after each epoch).")
@click.option("--pruner", type=click.Choice(PRUNERS), default="median")
@click.option("--tensorboard", is_flag=True, help="TensorBoard events in every trial (tensorboard --logdir OUT).")
@_train_config_options
def sweep(features: str, val_features: str | None, out: str, space_file: str | None, grid: tuple[str, ...],
          sampler: str, trials: int | None, jobs: int, storage: str | None, study_name: str, metric: str,
          prune: bool, pruner: str, tensorboard: bool, config_file: str | None, preset: str | None,
          loss: str | None, epochs: int | None, batch_size: int | None, lr: float | None, seed: int | None,
          device: str | None, val_fraction: float | None, overrides: tuple[str, ...]) -> None:
    """Search training configs on one feature store with Optuna; each trial is an ordinary run in OUT/trials/.

    \b
    The train flags and key=value overrides are shared by every trial; the space varies the rest.
    Rerunning the same command continues a stopped sweep. Writes OUT/report.json, report.md, sweep.png,
    best.yaml (for `regtok train --config`) and manifest.json; prints report.json's path.
    """
    import sys
    from pathlib import Path

    from pipeline.config_io import load_yaml
    from pipeline.console import stderr_console
    from pipeline.space import parse_grid, parse_space
    from pipeline.startup import gc_paused
    from pipeline.sweep import SweepConfig

    with gc_paused(freeze=True):
        from pipeline.sweep import run_sweep

    if not space_file and not grid:
        raise RegtokError("give a search space: --space SPACE.yaml or --grid KEY=V1,V2,…")
    raw = {**(load_yaml(space_file) if space_file else {}), **parse_grid(grid)}
    space = parse_space(raw, space_file or "--grid")
    base = _train_config(preset, config_file, None, overrides, val_fraction=val_fraction, epochs=epochs,
                         batch_size=batch_size, lr=lr, seed=seed, device=device, loss=loss)
    if tensorboard:
        _require_tensorboard()
    scfg = SweepConfig(sampler=sampler, trials=trials, jobs=jobs, storage=storage, study=study_name, metric=metric,
                       prune=prune, pruner=pruner, seed=base.seed, tensorboard=tensorboard)
    console = stderr_console()
    report = run_sweep(features, out, scfg, space, base, val_features=val_features,
                       command=["regtok", *sys.argv[1:]], console=console)
    _print_trials(console, report)
    click.echo(str(Path(out) / "report.json"))
    if report["trials"] and not report["counts"]["complete"] + report["counts"]["pruned"]:
        first = report["trials"][0]
        raise RegtokError(f"every trial failed (first: trial {first['number']}: {first['error']}); see report.md")


def _print_trials(console, report: dict, top: int = 10) -> None:
    from rich.table import Table

    names = list(report["space"])
    table = Table("trial", "state", report["metric"], "epochs", "s", *names,
                  title=f"top trials of {len(report['trials'])} ({report['sampler']} sampler)")
    for r in report["trials"][:top]:
        value = f"{r['value']:.4f}" if r["value"] is not None else "—"
        table.add_row(str(r["number"]), r["state"], value, str(r["epochs"] or "—"),
                      f"{r['seconds']:.1f}" if r["seconds"] else "—", *(str(r["params"].get(k, "—")) for k in names))
    console.print(table)
    failed = [r for r in report["trials"] if r["state"] == "fail" and r["retried_as"] is None]
    if failed:
        console.print(f"[yellow]{len(failed)} trial(s) failed[/], first: trial {failed[0]['number']}: "
                      f"{failed[0]['error']}")
    if report["best"] is not None:
        console.print(f"best: trial {report['best']['number']} → best.yaml")


@main.command(context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Also write OUT/compare.md and OUT/curves.png (validation R@1 against epoch per run).")
@click.option("--all-keys", is_flag=True, help="Show every config key, not only those that differ.")
def compare(paths: tuple[str, ...], out: str | None, all_keys: bool) -> None:
    """Put runs, eval reports or sweeps (their trials) side by side; config keys that differ are highlighted."""
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from pipeline.compare import load_entries, plot_curves, render_markdown, tables

    entries = load_entries(list(paths))
    console = Console()
    if not console.is_terminal:  # piped or logged: the whole table, never a truncated cell
        console = Console(width=1000)
    for title, columns, rows in tables(entries, all_keys):
        table = Table("", *columns, title=title)
        for label, cells, differs in rows:
            style = "bold yellow" if differs else None
            table.add_row(label, *cells, style=style)
        console.print(table)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        plot_curves(entries, Path(out) / "curves.png")
        (Path(out) / "compare.md").write_text(render_markdown(entries, all_keys))
        click.echo(str(Path(out) / "compare.md"), err=True)


# ── stage 3: eval ───────────────────────────────────────────────────────────────────────────────────


def _int_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """"1,2,4" → (1, 2, 4); a bad list is a usage error (exit 2)."""
    try:
        items = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not items or min(items) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return items


@main.command(name="eval", context_settings=CONTEXT)
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True), help="Run directory (regtok train).")
@click.option("--features", required=True, type=click.Path(exists=True), help="Held-out feature store.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report directory.")
@click.option("--prefixes", default="1,2,4,8,16,32", callback=_int_list,
              help="Prefix lengths k (<= n_registers) for probes; retrieval uses those <= n_shared.")
@click.option("--flow-steps", default="1,4,16", callback=_int_list, help="Euler steps for flow transport.")
@click.option("--save-embeddings", is_flag=True, help="Also write embeddings.h5 (shared embedding per k).")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--seed", default=0, type=int, help="Seed of the probe split.")
@click.option("--probe-test-fraction", default=0.3, type=float, help="Held-out part of the split for probes.")
@click.option("--probe-max-samples", default=10_000, type=int, help="Probes use a seeded subset (0: all).")
@click.option("--batch-size", default=512, type=int, help="Samples per model forward.")
@click.option("--chunk-size", default=4096, type=int, help="Retrieval queries per score matrix chunk.")
@click.option("--baselines/--no-baselines", default=True,
              help="Fit the linear baselines (CCA, linear InfoNCE head) on the run's training store and report "
                   "regtok against the best of them.")
@click.option("--baseline-features", type=click.Path(exists=True, file_okay=False), default=None,
              help="Fit the baselines on this store instead  [default: the run's training store, from its manifest]")
def eval_(run_dir: str, features: str, out: str, prefixes: tuple[int, ...], flow_steps: tuple[int, ...],
          save_embeddings: bool, device: str, seed: int, probe_test_fraction: float, probe_max_samples: int,
          batch_size: int, chunk_size: int, baselines: bool = True, baseline_features: str | None = None) -> None:
    """Retrieval per shared prefix (both directions), flow transport, prefix probes; prints report.json's path.

    \b
    Linear baselines (regularised CCA and a linear InfoNCE head, fitted on the run's training rows) are rows of
    the retrieval table; the summary states regtok's full-prefix R@1 as a ratio to the best of them.
    Writes OUT/report.json, report.md, prefix.png (with matplotlib), manifest.json, and embeddings.h5 with
    --save-embeddings. The feature store must match the run's modalities, encoders and dims.
    """
    import sys
    from pathlib import Path

    from pipeline.console import stderr_console
    from pipeline.startup import gc_paused, keep_freed_memory

    keep_freed_memory()  # CPU forward passes without faulting their activations in again
    with gc_paused(freeze=True):  # torch's import: ~0.1 s less
        from pipeline.report import run_eval
        from regtok.evaluate import EvalConfig

    cfg = EvalConfig(prefixes=prefixes, flow_steps=flow_steps, probe_test_fraction=probe_test_fraction,
                     probe_max_samples=probe_max_samples, seed=seed, chunk_size=chunk_size, batch_size=batch_size,
                     device=device, baselines=baselines)
    run_eval(run_dir, features, out, cfg, save_embeddings=save_embeddings, command=["regtok", *sys.argv[1:]],
             console=stderr_console(), baseline_features=baseline_features)
    click.echo(str(Path(out) / "report.json"))


@main.command(context_settings=CONTEXT)
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Run directory.")
@click.option("--shards", required=True, help="New shards (as for extract): a brace pattern, a directory of .tar "
              "files or a dataset.json.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Embeddings file (HDF5).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="Images per encoder forward pass.")
@click.option("--workers", default="auto", callback=_workers, help="DataLoader workers decoding shards.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
def embed(run_dir: str, shards: str, out: str, batch_size: int, workers: int | str, device: str) -> None:
    """Embed new images with a run: its frozen encoders (from its lineage), then its register modules.

    Writes OUT (HDF5): /keys and /<modality>/k<k>, the (N, E) shared embedding at every shared prefix k, as
    `regtok eval --save-embeddings` does. Undecodable samples are skipped and counted. Prints OUT.
    """
    import os

    from pipeline.api import embed_shards
    from pipeline.console import stderr_console

    console = stderr_console()
    result = embed_shards(run_dir, shards, out, batch_size=batch_size, device=device, workers=workers,
                          console=console, show_progress=os.environ.get("REGTOK_NO_PROGRESS") is None)
    console.print(f"embedded {result['samples']} samples (skipped {result['skipped']}) at prefixes "
                  f"{', '.join(map(str, result['prefixes']))}")
    click.echo(str(result["path"]))


# ── pipeline: demo, show, verify, rerun ─────────────────────────────────────────────────────────────

# The demo's choices: random-init encoders keep information in their tokens, not their pooled output
# (DESIGN.md, "Measured"), so the demo trains on token features with the tiny preset.
DEMO_ENCODERS = (("vision", "tiny:0"), ("tactile", "tiny:1"))
DEMO_TRAIN = ("feature_kind=tokens",)


@main.command(context_settings=CONTEXT)
@click.option("--out", default="regtok-demo", type=click.Path(file_okay=False), help="Directory for every stage.")
@click.option("--samples", default=2000, type=click.IntRange(min=200), help="Training pairs (held-out: a quarter).")
@click.option("--epochs", default=5, type=click.IntRange(min=1), help="Training epochs.")
@click.option("--overwrite", is_flag=True, help="Delete the demo's stage directories in --out first.")
@click.pass_context
def demo(ctx: click.Context, out: str, samples: int, epochs: int, overwrite: bool) -> None:
    """Run the whole pipeline on the embedded synthetic set: synth → extract → train → eval.

    \b
    OUT/shards-train, shards-test   synthetic shards (seeds 0 and 1) and their dataset.json
    OUT/features-train, -test       tiny random-init encoders' token features (HDF5) + manifest.json
    OUT/run                         the trained register modules (tiny preset; 10 % of the training split
                                    validates and picks the kept epoch) + manifest.json
    OUT/eval                        report.json, report.md, prefix.png + manifest.json, with the linear
                                    baselines fitted on the same training rows
    """
    import shutil
    from pathlib import Path

    from pipeline.console import stderr_console
    from pipeline.report import demo_summary

    root = Path(out)
    stages = ("shards-train", "shards-test", "features-train", "features-test", "run", "eval")
    present = [s for s in stages if (root / s).exists()]
    if present and not overwrite:
        raise RegtokError(f"{root} already holds a demo ({', '.join(present)}); pass --overwrite or another --out")
    for s in present:
        shutil.rmtree(root / s)
    console = stderr_console()
    steps = [
        ("synthesise training shards", synth, dict(out_dir=str(root / "shards-train"), samples=samples, shards=4,
                                                   seed=0, image_size=64)),
        ("synthesise held-out shards", synth, dict(out_dir=str(root / "shards-test"), samples=max(100, samples // 4),
                                                   shards=1, seed=1, image_size=64)),
    ]
    for split in ("train", "test"):
        steps.append((f"extract {split} features", extract, dict(
            shards=str(root / f"shards-{split}" / "dataset.json"), out=str(root / f"features-{split}"),
            encoders=DEMO_ENCODERS, tokens=True, batch_size=64, workers="auto", device="auto", max_skip_fraction=0.0)))
    steps.append(("train register modules", train, dict(
        features=str(root / "features-train"), val_features=None, val_fraction=None,
        out=str(root / "run"), config_file=None, preset="tiny", loss=None, epochs=epochs, batch_size=None, lr=None,
        seed=0, device=None, resume=False, compile_=None, overrides=DEMO_TRAIN, tensorboard=False)))
    steps.append(("evaluate on the held-out split", eval_, dict(
        run_dir=str(root / "run"), features=str(root / "features-test"), out=str(root / "eval"), prefixes=(1, 2, 4, 8),
        flow_steps=(1, 4, 16), save_embeddings=False, device="auto", seed=0, probe_test_fraction=0.3,
        probe_max_samples=10_000, batch_size=512, chunk_size=4096)))
    for i, (title, command, kwargs) in enumerate(steps, 1):
        console.rule(f"[bold]{i}/{len(steps)} {title}")
        ctx.invoke(command, **kwargs)
    demo_summary(console, root)


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
        trials = (node.manifest or {}).get("trials") or [] if kind == "sweep" else []
        for t in trials[:5]:
            value = f"{t['value']:.4f}" if isinstance(t.get("value"), float) else "—"
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
    Console().print(root)
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

    from rich.console import Console

    from pipeline.rerun import rerun as rerun_stage
    from pipeline.startup import keep_freed_memory

    keep_freed_memory()  # as in the stage it reruns
    console = Console(stderr=True)
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
