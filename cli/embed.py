"""A trained run applied to new images: `regtok embed`."""

from __future__ import annotations

import click

from regtok.cli import CONTEXT, config_default, config_option, device_option, main, workers_count
from regtok.pipeline.extract import ExtractConfig


@main.command(context_settings=CONTEXT)
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Run directory.")
@click.option("--shards", required=True, help="New shards (as for extract): a brace pattern, a directory of .tar "
              "files or a dataset.json.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Embeddings file (HDF5).")
@config_option(ExtractConfig, "batch_size", type=click.IntRange(min=1), help="Images per encoder forward pass.")
@config_option(ExtractConfig, "workers", callback=workers_count, help="DataLoader workers decoding shards.")
@device_option(config_default(ExtractConfig, "device"))
@click.option("--modality", "modalities", multiple=True, metavar="NAME",
              help="Embed only this modality (repeatable)  [default: the run's modalities the shards hold, e.g. "
                   "touch alone for shards packed with only --tactile-col]")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def embed(run_dir: str, shards: str, out: str, batch_size: int, workers: int | str, device: str,
          modalities: tuple[str, ...] = (), overwrite: bool = False) -> None:
    """Embed new images with a run: its frozen encoders (from its lineage), then its register modules.

    Writes OUT (HDF5): /keys and /<modality>/k<k>, the (N, E) shared embedding at every shared prefix k, as
    `regtok eval --save-embeddings` does, for each modality the shards hold (one is enough: touch-only query
    images). Undecodable samples are skipped and counted. Prints OUT.
    """
    import os

    from regtok.pipeline.embed import embed_shards
    from regtok.pipeline.runtime.console import stderr_console

    console = stderr_console()
    result = embed_shards(run_dir, shards, out, batch_size=batch_size, device=device, workers=workers,
                          console=console, show_progress=os.environ.get("REGTOK_NO_PROGRESS") is None,
                          modalities=modalities or None, overwrite=overwrite)
    console.print(f"embedded {result['samples']} samples (skipped {result['skipped']}) of "
                  f"{', '.join(result['modalities'])} at prefixes {', '.join(map(str, result['prefixes']))}")
    click.echo(str(result["path"]))

