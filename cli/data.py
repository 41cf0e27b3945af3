"""Data in: `regtok synth` (the embedded synthetic set) and `regtok pack` (a CSV of image pairs)."""

from __future__ import annotations

import click

from regtok.cli import CONTEXT, main


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

    from regtok.pipeline.data import check_args, check_families, synthesize
    from regtok.pipeline.runtime.console import progress, stderr_console

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
@click.option("--vision-col", default=None, help="CSV column with the vision image path  [default: url, unless only "
              "--tactile-col is given: then touch alone is packed]")
@click.option("--tactile-col", default=None, help="CSV column with the tactile image path  [default: tactile, unless "
              "only --vision-col is given: then vision alone is packed]")
@click.option("--label-col", "label_cols", multiple=True,
              help="Label column (repeatable): numeric columns stay numbers, text columns become class indices, "
              "free text (a caption) stays text; COL:class or COL:text decides.")
@click.option("--labels-from", type=click.Path(dir_okay=False), default=None, metavar="TRAIN/dataset.json",
              help="Reuse another split's label schema, so class indices match it (its labels are the default "
              "--label-col); a class it lacks is an error.")
@click.option("--label-group", "label_groups", multiple=True, metavar="LABEL=GROUP",
              help="Which part should hold a label (repeatable): shared (both views depend on it), vision or "
              "tactile (that view only); eval reads leakage and complementarity from them.")
@click.option("--samples-per-shard", default=1000, type=int, help="Samples per tar shard.")
@click.option("--allow-outside-root", is_flag=True,
              help="Read image paths that resolve outside --root (else such rows are skipped and listed).")
@click.option("--overwrite", is_flag=True, help="Write into --out even if it holds something other than an "
              "earlier pack output.")
def pack(csv_path: str, root: str | None, out_dir: str, vision_col: str | None, tactile_col: str | None,
         label_cols: tuple[str, ...], samples_per_shard: int, allow_outside_root: bool = False,
         overwrite: bool = False, labels_from: str | None = None, label_groups: tuple[str, ...] = ()) -> None:
    """Pack a paired dataset given as a CSV of relative image paths (TVL / SSVTP layout) into shards.

    Image bytes are copied unchanged after a decode check; every CSV column goes into KEY.json (as text; the
    --label-col columns also as numbers). Give only one of --vision-col/--tactile-col to pack that modality alone
    (e.g. touch-only images for `regtok embed`). Rows with a missing or unreadable image are skipped and listed in
    dataset.json. Prints the path of OUT_DIR/dataset.json.
    """
    from pathlib import Path

    from regtok.pipeline.data import pack_csv
    from regtok.pipeline.manifests.labels import parse_groups
    from regtok.pipeline.runtime.console import progress, stderr_console

    if vision_col is None and tactile_col is None:
        vision_col, tactile_col = "url", "tactile"  # TVL's columns
    console = stderr_console()
    bar = progress(console)

    def start(rows: int) -> None:  # once the CSV and its columns are checked, so an error there is one line
        bar.start()
        bar.add_task("pack", total=rows)

    try:
        m = pack_csv(csv_path, root, out_dir, vision_col=vision_col, tactile_col=tactile_col,
                     label_cols=label_cols, samples_per_shard=samples_per_shard,
                     progress=lambda n: bar.advance(bar.task_ids[0], n), on_rows=start,
                     allow_outside_root=allow_outside_root, overwrite=overwrite, labels_from=labels_from,
                     label_groups=parse_groups(label_groups))
    finally:
        bar.stop()
    skipped = m["skipped"]
    console.print(f"Packed {m['samples']:,} of {m['source']['rows']:,} rows into {len(m['shards'])} shard(s) "
                  f"in {m['timings']['seconds']:.1f} s; skipped {len(skipped)}"
                  + (f" (first: row {skipped[0]['row']}, {skipped[0]['reason']})" if skipped else "")
                  + f". Labels: {', '.join(m['labels']) or 'none'}.")
    click.echo(str(Path(out_dir) / "dataset.json"))

