"""What `regtok sweep` gains over a shell loop of `regtok train`, as ratios measured side by side (issue 12).

    python benchmarks/sweep.py [--samples 2000] [--jobs 2] [--space configs/tiny-space.yaml] [--work DIR]

Builds the embedded set (``regtok synth`` → ``regtok extract`` with the tiny encoders, pooled features), then
times, on the same store and the same 12-point grid at the tiny preset:

1. ``regtok sweep --jobs J --no-prune`` (J workers, each reading the store once and running trials in-process);
2. the same 12 configs as ``regtok train`` commands one after another (each pays its process start and store load);
3. ``regtok sweep --jobs J`` with the median pruner, for the time pruning saves.

Prints the ratios, and whether every trial's final validation R@1 equals its single run's (it should on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from regtok.config import nested  # noqa: E402
from regtok.pipeline.sweep.space import as_overrides, parse_space  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "REGTOK_NO_PROGRESS": "1"})
    return time.perf_counter() - t0


def grid_points(space_file: Path) -> list[dict]:
    import itertools

    space = parse_space(yaml.safe_load(space_file.read_text()), str(space_file))
    names = list(space)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(space[n].values for n in names))]


def final_r1(run: Path) -> float:
    return json.loads((run / "manifest.json").read_text())["metrics"]["val_select"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--space", type=Path, default=ROOT / "configs" / "tiny-space.yaml")
    ap.add_argument("--work", type=Path, default=None, help="Reuse this directory (the store is kept).")
    args = ap.parse_args()
    from train import build_embedded, regtok_cli  # torch: after --help has answered

    work = args.work or Path(tempfile.mkdtemp(prefix="regtok-bench-sweep-"))
    _, store = build_embedded(work, args.samples)
    cli, common = regtok_cli(), ["--preset", "tiny", "--device", "cpu"]
    points = grid_points(args.space)
    for d in ("sweep", "pruned", "runs"):
        subprocess.run(["rm", "-rf", str(work / d)], check=True)

    t_sweep = timed([*cli, "sweep", "--features", str(store), "--out", str(work / "sweep"), "--space", str(args.space),
                     "--jobs", str(args.jobs), "--no-prune", *common])
    t_loop = 0.0
    for i, point in enumerate(points):
        t_loop += timed([*cli, "train", "--features", str(store), "--out", str(work / "runs" / f"{i:02d}"), *common,
                         *as_overrides(nested(point))])
    t_pruned = timed([*cli, "sweep", "--features", str(store), "--out", str(work / "pruned"), "--space",
                      str(args.space), "--jobs", str(args.jobs), "--prune", *common])

    report = json.loads((work / "sweep" / "report.json").read_text())
    by_params = {json.dumps(t["params"], sort_keys=True): t for t in report["trials"]}
    diffs = []
    for i, point in enumerate(points):
        trial = by_params[json.dumps(point, sort_keys=True)]
        diffs.append(abs(trial["value"] - final_r1(work / "runs" / f"{i:02d}")))
    pruned = json.loads((work / "pruned" / "report.json").read_text())
    print(f"store: {store} ({args.samples} pairs, pooled tiny-encoder features); grid of {len(points)} at the tiny "
          f"preset from {args.space.name}; {args.jobs} sweep workers")
    print(f"regtok sweep --jobs {args.jobs} --no-prune: {t_sweep:7.1f} s")
    ratio = t_loop / t_sweep
    print(f"{len(points)} x regtok train, one after another:  {t_loop:7.1f} s   → sweep {ratio:.2f}x faster "
          f"({'meets' if ratio >= 1.3 else 'MISSES'} the 1.3x target; {os.cpu_count()} cores)")
    print(f"regtok sweep --jobs {args.jobs} --prune:    {t_pruned:7.1f} s   → pruning saves "
          f"{1 - t_pruned / t_sweep:.0%} ({pruned['counts']['pruned']} of {len(points)} trials pruned; best trial "
          f"{pruned['best']['params'] if pruned['best'] else None} vs {report['best']['params']} without)")
    same = sum(d == 0 for d in diffs)
    print(f"final val R@1, sweep trial vs its single run: {same}/{len(points)} identical, max |diff| {max(diffs):.4g}")


if __name__ == "__main__":
    main()
