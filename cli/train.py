"""Stage 2: `regtok train` (the config options it shares with `regtok sweep` are here too)."""

from __future__ import annotations

import click

from regtok.cli import CONTEXT, device_option, main


def train_config_options(command):
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


def train_config(preset: str | None, config_file: str | None, saved: dict | None, overrides: tuple[str, ...],
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
@train_config_options
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
    cfg = train_config(preset, config_file, saved, overrides, val_fraction=val_fraction, epochs=epochs,
                        batch_size=batch_size, lr=lr, seed=seed, device=device, compile_=compile_, loss=loss)
    if print_config:
        click.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
        return
    if not features or not out:
        raise click.UsageError("--features and --out are required (unless --print-config)")
    check_device(cfg.device)  # before the resolved config is printed
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

    from regtok.pipeline.sweep import pct

    table = Table("final epoch", "value", title=f"{out}: {result.step} steps (recalls in %)")
    for k, v in result.metrics.items():
        if "/" not in k or k in ("val/R@1", "best/val_select", "best/epoch"):
            table.add_row(k, pct(v) if "val" in k else f"{v:.4g}")
    console.print(table)


def check_device(device: str) -> None:
    """A device that is not here (--device cuda without CUDA) is one error line before any output."""
    from regtok.distributed import resolve_device

    resolve_device(device)
