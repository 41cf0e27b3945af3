"""`regtok demo`: the whole pipeline on the embedded synthetic set, each stage through its entry point.

    OUT/shards-train, shards-test   synthetic shards (seeds 0 and 1) and their dataset.json (data/)
    OUT/features-train, -test       tiny random-init encoders' token features + manifest.json (extract/)
    OUT/run                         the trained register modules, tiny preset + manifest.json (train/)
    OUT/eval                        report.json, report.md, prefix.png + manifest.json (eval/)

Every manifest records the equivalent stage command, so `regtok rerun` takes any of them.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from regtok.errors import RegtokError
from regtok.pipeline.runtime.console import heading

# The demo's choices: random-init encoders keep information in their tokens, not their pooled output
# (DESIGN.md, "Measured"), so the demo trains on token features with the tiny preset. Everything else is each
# stage's config default.
DEMO_ENCODERS = (("vision", "tiny:0"), ("tactile", "tiny:1"))
DEMO_PREFIXES = (1, 2, 4, 8)
STAGES = ("shards-train", "shards-test", "features-train", "features-test", "run", "eval")


def run_demo(out: str | Path, samples: int, epochs: int, *, overwrite: bool, console: Console) -> Path:
    """synth → extract → train → eval into ``out`` (its demo directories replaced only with ``overwrite``), then
    the headline numbers on ``console``; returns the path of report.md."""
    root = Path(out).absolute()
    present = [s for s in STAGES if (root / s).exists()]
    if present and not overwrite:
        raise RegtokError(f"{root} already holds a demo ({', '.join(present)}); pass --overwrite or another --out")
    for s in present:
        shutil.rmtree(root / s)
    steps = demo_steps(root, samples, epochs, console)
    for i, (title, step) in enumerate(steps, 1):
        heading(console, f"[bold]{i}/{len(steps)} {title}")
        step()
    demo_summary(console, root)
    return root / "eval" / "report.md"


def demo_steps(root: Path, samples: int, epochs: int, console: Console) -> list[tuple[str, Callable[[], None]]]:
    """The demo's stages as (title, call) pairs: each stage's function with its config object; every manifest
    records the equivalent stage command."""
    from regtok.config import EvalConfig, TrainConfig, resolve
    from regtok.pipeline.data import synthesize
    from regtok.pipeline.eval import run_eval
    from regtok.pipeline.extract import ExtractConfig, run_extract
    from regtok.pipeline.runtime.console import train_progress
    from regtok.pipeline.train import train_run

    def shards(split: str, n: int, count: int, seed: int):
        return lambda: console.print(f"{synthesize(root / f'shards-{split}', n, count, seed)['samples']} pairs in "
                                     f"{root / f'shards-{split}'}")

    def features(split: str):
        cfg = ExtractConfig(shards=str(root / f"shards-{split}" / "dataset.json"), out=str(root / f"features-{split}"),
                            encoders=DEMO_ENCODERS, tokens=True, max_skip_fraction=0.0)
        command = ["regtok", "extract", "--shards", cfg.shards, "--out", cfg.out, "--tokens", "--max-skip-fraction",
                   "0", *[a for m, spec in DEMO_ENCODERS for a in ("--encoder", f"{m}={spec}")]]
        return lambda: run_extract(cfg, command=command, console=console)

    def train():
        cfg = resolve(TrainConfig, "tiny", {"epochs": epochs, "seed": 0, "feature_kind": "tokens"})
        command = ["regtok", "train", "--features", str(root / "features-train"), "--out", str(root / "run"),
                   "--preset", "tiny", "--epochs", str(epochs), "--seed", "0", "feature_kind=tokens"]
        with train_progress(console, disable=not console.is_terminal) as on_step:
            train_run(root / "features-train", root / "run", cfg, command=command, on_step=on_step,
                      notify=console.print)

    def evaluate():
        command = ["regtok", "eval", "--run", str(root / "run"), "--features", str(root / "features-test"), "--out",
                   str(root / "eval"), "--prefixes", ",".join(map(str, DEMO_PREFIXES))]
        run_eval(root / "run", root / "features-test", root / "eval", EvalConfig(prefixes=DEMO_PREFIXES),
                 command=command, console=console)

    return [("synthesise training shards", shards("train", samples, 4, 0)),
            ("synthesise held-out shards", shards("test", max(100, samples // 4), 1, 1)),
            ("extract train features", features("train")), ("extract test features", features("test")),
            ("train register modules", train), ("evaluate on the held-out split", evaluate)]


def demo_summary(console: Console, root: Path) -> None:
    """Print the headline numbers of ``regtok demo``'s report and the path of every manifest under ``root``."""
    import json

    from regtok.pipeline.eval import headline_sentence, parts_line, reconstruction_line

    report = json.loads((root / "eval" / "report.json").read_text())
    rows = {r["k"]: r for r in report["retrieval"]}
    k_full, k_one = max(rows), min(rows)
    r1 = {k: (rows[k]["a_to_b"]["R@1"] + rows[k]["b_to_a"]["R@1"]) / 2 for k in (k_one, k_full)}
    chance = 1 / report["n"]
    heading(console, "[bold]demo summary")
    console.print(f"cross-modal R@1 (mean of both directions, N = {report['n']}): "
                  f"{r1[k_full]:.1%} with {k_full} shared registers, {r1[k_one]:.1%} with {k_one}; chance {chance:.1%}")
    if "headline" in report:
        console.print(headline_sentence(report["headline"]))
    material = {(p["modality"], p["group"]): p for p in report["probes"] if p["label"] == "material"
                and p["value"] is not None and (p["group"] == "raw" or (p["group"] == "shared"
                                                                        and p["k"] == report["parts"]["k_shared"]))}
    for m in report["modalities"]:
        if (m, "shared") in material and (m, "raw") in material:
            console.print(f"material class from {m}'s shared registers: {material[(m, 'shared')]['value']:.1%} "
                          f"accuracy, from its raw features {material[(m, 'raw')]['value']:.1%} (chance "
                          f"{material[(m, 'raw')].get('chance', float('nan')):.1%})")
    if report.get("parts"):
        console.print(f"what leaks into the shared part, and what the private part keeps: {parts_line(report)}")
    console.print(reconstruction_line(report))
    console.print("manifests (regtok show / verify / rerun take any of them):")
    for stage in ("shards-train/dataset.json", "shards-test/dataset.json", "features-train/manifest.json",
                  "features-test/manifest.json", "run/manifest.json", "eval/manifest.json"):
        console.print(f"  {root / stage}")
    console.print(f"report (also on stdout): {root / 'eval' / 'report.md'}")
