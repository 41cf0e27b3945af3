"""Stage 3: `regtok eval`."""

from __future__ import annotations

import click

from regtok.cli import CONTEXT, config_default, config_option, device_option, main
from regtok.config import EvalConfig


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
@config_option(EvalConfig, "prefixes", callback=_int_list,
               help="Prefix lengths k (<= n_registers) for probes; retrieval uses those <= n_shared.")
@config_option(EvalConfig, "flow_steps", callback=_int_list, help="Euler steps for flow transport.")
@click.option("--save-embeddings", is_flag=True, help="Also write embeddings.h5 (shared embedding per k).")
@device_option(config_default(EvalConfig, "device"))
@config_option(EvalConfig, "seed", type=int, help="Seed of the probe split.")
@config_option(EvalConfig, "probe_test_fraction", type=float, help="Held-out part of the split for probes.")
@config_option(EvalConfig, "probe_max_samples", type=int, help="Probes use a seeded subset (0: all).")
@config_option(EvalConfig, "batch_size", type=int, help="Samples per model forward.")
@config_option(EvalConfig, "chunk_size", type=int, help="Retrieval queries per score matrix chunk.")
@config_option(EvalConfig, "baselines", "--baselines/--no-baselines",
               help="Fit the baselines (linear CCA, weighted CCA, the model at its start, linear and MLP InfoNCE "
                    "heads) on the run's training rows and report "
                    "regtok against the best of them.")
@click.option("--fit-features", "--baseline-features", "fit_features", type=click.Path(exists=True, file_okay=False),
              default=None, help="Fit the baselines, the probes and the reconstruction references on this store "
              "instead  [default: the rows the run trained on, from its manifest]")
@click.option("--overwrite", is_flag=True, help="Write into --out even if it holds an earlier report (replaced) or "
              "anything else.")
def eval_(run_dir: str, features: str, out: str, prefixes: tuple[int, ...], flow_steps: tuple[int, ...],
          save_embeddings: bool, device: str, seed: int, probe_test_fraction: float, probe_max_samples: int,
          batch_size: int, chunk_size: int, baselines: bool = True, fit_features: str | None = None,
          overwrite: bool = False) -> None:
    """Retrieval per shared prefix (both directions), flow transport, prefix probes; prints report.json's path.

    \b
    Linear baselines (regularised CCA and a linear InfoNCE head, fitted on the run's training rows) are rows of
    the retrieval table; the summary states regtok's full-prefix R@1 as a ratio to the best of them.
    Writes OUT/report.json, report.md, prefix.png (with matplotlib), manifest.json, and embeddings.h5 with
    --save-embeddings. The feature store must match the run's modalities, encoders and dims.
    """
    import sys
    from pathlib import Path

    from regtok.pipeline.runtime.console import stderr_console
    from regtok.pipeline.runtime.startup import gc_paused, keep_freed_memory

    keep_freed_memory()  # CPU forward passes without faulting their activations in again
    with gc_paused(freeze=True):  # torch's import: ~0.1 s less
        from regtok.pipeline.eval import run_eval

    cfg = EvalConfig(prefixes=prefixes, flow_steps=flow_steps, probe_test_fraction=probe_test_fraction,
                     probe_max_samples=probe_max_samples, seed=seed, chunk_size=chunk_size, batch_size=batch_size,
                     device=device, baselines=baselines)
    run_eval(run_dir, features, out, cfg, save_embeddings=save_embeddings, command=["regtok", *sys.argv[1:]],
             console=stderr_console(), fit_features=fit_features, overwrite=overwrite)
    click.echo(str(Path(out) / "report.json"))
