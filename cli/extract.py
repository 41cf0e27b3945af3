"""Stage 1: `regtok extract`, frozen encoders over shards into a feature store."""

from __future__ import annotations

import click

from regtok.cli import CONTEXT, config_default, config_option, device_option, main, workers_count
from regtok.pipeline.extract import ExtractConfig


def _encoder_pair(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in value:
        modality, sep, spec = item.partition("=")
        if not sep or not modality.strip() or not spec.strip():
            raise click.BadParameter(f"{item!r}: expected MODALITY=SPEC, e.g. tactile=tiny")
        pairs.append((modality.strip(), spec.strip()))
    return tuple(pairs)


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
@config_option(ExtractConfig, "batch_size", type=click.IntRange(min=1), help="Images per forward pass.")
@config_option(ExtractConfig, "workers", callback=workers_count,
               help="DataLoader workers decoding shards, or auto: none on the CPU (the forward uses every core), "
               "up to 8 per GPU.")
@device_option(config_default(ExtractConfig, "device"), "Under torchrun, cuda is each rank's GPU.")
@config_option(ExtractConfig, "max_skip_fraction", type=click.FloatRange(0, 1),
               help="Exit non-zero (after writing the store) when more input than this was skipped.")
@click.option("--overwrite", is_flag=True, help="Write into --out even if it holds something other than an "
              "earlier extraction.")
@click.option("--label-group", "label_groups", multiple=True, metavar="LABEL=GROUP",
              help="Which part should hold a label (repeatable): shared (both views depend on it) or a modality's "
              "name (that view only); eval reads leakage and complementarity from them.")
def extract(shards: str, out: str, encoders: tuple[tuple[str, str], ...], tokens: bool, batch_size: int,
            workers: int | str, device: str, max_skip_fraction: float, overwrite: bool = False,
            label_groups: tuple[str, ...] = ()) -> None:
    """Run frozen encoders over WebDataset shards into an HDF5 feature store (one part per shard).

    Rerunning the same command resumes: finished parts are kept. Under `torchrun --nproc_per_node=N`
    the ranks split the shards. Prints the store's manifest path on stdout.
    """
    import os
    import sys
    from pathlib import Path

    from regtok.pipeline.manifests.labels import parse_groups
    from regtok.pipeline.runtime.console import stderr_console
    from regtok.pipeline.runtime.startup import gc_paused, keep_freed_memory

    groups = tuple(parse_groups(label_groups).items())
    keep_freed_memory()  # CPU forward passes without faulting their activations in again
    with gc_paused(freeze=True):  # torch's import: ~0.1 s less
        from regtok.pipeline.extract import run_extract

    spec = "::".join(str(Path(part).absolute()) for part in shards.split("::"))  # reruns may start elsewhere
    config = ExtractConfig(shards=spec, out=str(Path(out).absolute()), encoders=encoders, tokens=tokens,
                           batch_size=batch_size, workers=workers, device=device,
                           max_skip_fraction=max_skip_fraction, label_groups=groups)
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


