"""The token path at the Stage-1 encoders' own size: memory, disk and time as the data grows (issue 22).

    python benchmarks/scale.py [--work /tmp/scale] [--quick] [--sizes 1000,4000,16000] [--test-rows 1000]
    python benchmarks/scale.py --pooled [--sizes 20000,200000] [--steps 6]

Tokens (the default): writes feature stores shaped like OpenCLIP ViT-L-14 features (257 × 1024 float16 tokens and
768-d pooled, two modalities, a planted cross-modal structure: ``benchmarks/scale_stores.py``) with the pipeline's
store writer, at N = 1,000, 4,000 and 16,000 training rows (the smaller stores index the first parts of the
largest) and 1,000 test rows. On each it runs ``regtok train --preset tiny feature_kind=tokens --epochs 1``, then
``regtok eval`` with and without the baselines, and records per N: the peak resident memory of each command (its
process and children), the CCA start's wall time, training samples/s and the epoch's time, eval's time with and
without the baselines, and the run directory's size (with its largest files). Prints a table, then how each cost
grows with N (the exponent b of cost ∝ N^b between consecutive sizes; 1 is linear). ``--quick``: N = 1,000 only.

Pooled (``--pooled``): stores of 768-d pooled features at N = 20,000 and 200,000 training rows; for each, the
``default`` preset's start (``pipeline.train.stage.load_split`` and ``build_model``, as ``regtok train`` runs them) and
``--steps`` training steps through ``regtok.train.train``, with the store in memory and streamed
(``max_memory_fraction=0``); prints samples/s per N and their ratio (target: 200,000 within 10 % of 20,000).

Numbers go to WORK/scale.json (or WORK/pooled.json) and stdout; stores stay in WORK (delete it when done).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scale_stores.py beside this file

import scale_stores  # noqa: E402

TOKENS, POOLED_DIM = (257, 1024), 768  # OpenCLIP ViT-L-14: 257 tokens of 1024; 768-d pooled output
PART_ROWS = 1000


def regtok_cli() -> list[str]:
    return [sys.executable, "-m", "regtok"]


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and every descendant, from /proc (0 once gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


def measure(cmd: list[str], env: dict[str, str], log_path: Path) -> dict:
    """Run ``cmd``; its wall time, and its peak resident memory: the larger of the kernel's record for the process
    (``wait4``'s ru_maxrss, its reaped children included) and the sum over its process tree sampled every 0.2 s."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        peak = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.2)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = log_path.read_text().splitlines()[-15:]
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n" + "\n".join(tail))
    return {"seconds": seconds, "peak_rss": max(peak, usage.ru_maxrss * 1024)}


def dir_size(path: Path) -> tuple[int, dict[str, int]]:
    files = {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}
    return sum(files.values()), dict(sorted(files.items(), key=lambda kv: -kv[1])[:5])


def r1(metrics: dict) -> float:
    return (metrics["a_to_b"]["R@1"] + metrics["b_to_a"]["R@1"]) / 2


def token_stores(work: Path, sizes: list[int], test_rows: int) -> tuple[dict[int, Path], Path]:
    """The training stores (the first parts of one set of parts) and the test store."""
    parts = scale_stores.parts_for(work / "parts", "train", max(sizes), PART_ROWS, 0, TOKENS, POOLED_DIM)
    stores = {}
    for n in sizes:
        chosen = parts[: math.ceil(n / PART_ROWS)]
        if sum(p["samples"] for p in chosen) != n:
            raise SystemExit(f"N = {n} is not a multiple of the {PART_ROWS}-row parts")
        stores[n] = scale_stores.write_store(work / f"train-{n}", chosen, TOKENS, POOLED_DIM)
    test = scale_stores.parts_for(work / "parts", "test", test_rows, PART_ROWS, 10**6, TOKENS, POOLED_DIM)
    return stores, scale_stores.write_store(work / "test", test, TOKENS, POOLED_DIM)


def one_size(n: int, store: Path, test: Path, work: Path, env: dict[str, str], device: str) -> dict:
    """Train and evaluate at one N; every number the table shows."""
    run, logs = work / f"run-{n}", work / "logs"
    logs.mkdir(exist_ok=True)
    print(f"N = {n}: regtok train", flush=True)
    train = measure([*regtok_cli(), "train", "--features", str(store), "--out", str(run), "--preset", "tiny",
                     "--epochs", "1", "--overwrite", "feature_kind=tokens", f"device={device}"], env,
                    logs / f"train-{n}.log")
    manifest = json.loads((run / "manifest.json").read_text())
    timings = manifest["timings"]
    size, largest = dir_size(run)
    row = {"n": n, "store_bytes": n * 2 * (math.prod(TOKENS) + POOLED_DIM) * 2, "train_peak_rss": train["peak_rss"],
           "train_seconds": train["seconds"], "start_seconds": timings.get("start_seconds"),
           "load_seconds": timings["load_seconds"], "epoch_seconds": timings["last_epoch_seconds"],
           "samples_per_s": timings["samples_per_s"], "run_bytes": size, "run_largest": largest,
           "val_r1": manifest["metrics"].get("val/R@1")}
    for baselines in (False, True):
        flag = "--baselines" if baselines else "--no-baselines"
        print(f"N = {n}: regtok eval {flag}", flush=True)
        out = work / f"eval-{n}{'-baselines' if baselines else ''}"
        res = measure([*regtok_cli(), "eval", "--run", str(run), "--features", str(test), "--out", str(out),
                       "--overwrite", "--device", device, flag], env, logs / f"eval-{n}{flag}.log")
        key = "eval_baselines" if baselines else "eval"
        row[f"{key}_seconds"], row[f"{key}_peak_rss"] = res["seconds"], res["peak_rss"]
        report = json.loads((out / "report.json").read_text())
        row["test_r1"] = r1(report["retrieval"][-1])
        if baselines:
            row["baseline_r1"] = {k: r1(v) for k, v in report["baselines"]["linear"].items() if "a_to_b" in v}
    print(json.dumps(row), flush=True)
    return row


GB = 1e9


def token_table(rows: list[dict]) -> list[str]:
    """The per-N table and the growth exponents between consecutive sizes."""
    lines = ["| N | store (GB) | train peak RSS (GB) | limit: store + 4 GB | CCA start (s) | epoch (s) | samples/s "
             "| eval (s) | eval + baselines (s) | ratio | eval peak RSS (GB) | run dir (MB) | test R@1 | CCA R@1 |",
             "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['store_bytes'] / GB:.2f} | {r['train_peak_rss'] / GB:.2f} | "
            f"{r['store_bytes'] / GB + 4:.2f} | {r['start_seconds']:.0f} | {r['epoch_seconds']:.0f} | "
            f"{r['samples_per_s']:.1f} | {r['eval_seconds']:.0f} | {r['eval_baselines_seconds']:.0f} | "
            f"{r['eval_baselines_seconds'] / r['eval_seconds']:.2f} | "
            f"{max(r['eval_peak_rss'], r['eval_baselines_peak_rss']) / GB:.2f} | {r['run_bytes'] / 1e6:.0f} | "
            f"{r['test_r1']:.3f} | {r['baseline_r1'].get('cca', float('nan')):.3f} |")
    costs = ("train_peak_rss", "start_seconds", "epoch_seconds", "samples_per_s", "eval_seconds",
             "eval_baselines_seconds", "eval_baselines_peak_rss", "run_bytes")
    for a, b in zip(rows, rows[1:], strict=False):
        grow = ", ".join(f"{k} N^{math.log(b[k] / a[k]) / math.log(b['n'] / a['n']):.2f}" for k in costs)
        lines.append(f"growth N {a['n']:,} → {b['n']:,}: {grow}")
    return lines


def run_tokens(args: argparse.Namespace, env: dict[str, str]) -> None:
    sizes = [1000] if args.quick else args.sizes
    stores, test = token_stores(args.work, sizes, args.test_rows)
    rows = [one_size(n, stores[n], test, args.work, env, args.device) for n in sizes]
    (args.work / "scale.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(token_table(rows)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/scale"))
    ap.add_argument("--quick", action="store_true", help="N = 1,000 only (tokens)")
    ap.add_argument("--pooled", action="store_true", help="the pooled-features rows (default preset) instead")
    ap.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=None)
    ap.add_argument("--test-rows", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=6, help="(--pooled) training steps timed per store, after one")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="train and eval on this device (cpu, cuda)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "REGTOK_NO_PROGRESS": "1"}
    if args.pooled:
        from scale_pooled import run_pooled

        args.sizes = args.sizes or [20_000, 200_000]
        run_pooled(args)
    else:
        args.sizes = args.sizes or [1000, 4000, 16000]
        run_tokens(args, env)


if __name__ == "__main__":
    main()
