"""Where `regtok synth`'s time goes, as ratios (issue 2: 2,000 pairs at 64 px well under a minute on 2 cores).

    python benchmarks/synth.py [--samples 500] [--image-size 64]

Measures, in one process, per sample: drawing + rendering both views, PNG encoding, and the whole
``synthesize`` call (tar writing and hashing included); prints each as a share of the whole, the projected
time for 2,000 pairs, and the cost of 128 px relative to 64 px.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from regtok.pipeline.data import synth


def _per_sample(fn, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n


def measure(samples: int, size: int) -> dict[str, float]:
    """Seconds per sample of rendering, PNG encoding, and the whole synthesize call."""

    def render(i: int):
        rng = synth.sample_rng(0, i)
        return synth.render_pair(synth.draw_factors(rng), size, rng)

    pairs = [render(i) for i in range(min(samples, 50))]
    render_s = _per_sample(render, samples)
    encode_s = _per_sample(lambda i: [synth.encode_png(x) for x in pairs[i % len(pairs)]], samples)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        synth.synthesize(tmp, samples, 2, seed=0, image_size=size)
        total_s = (time.perf_counter() - start) / samples
    return {"render": render_s, "encode": encode_s, "total": total_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    small = measure(args.samples, args.image_size)
    large = measure(max(args.samples // 4, 10), args.image_size * 2)
    t = small["total"]
    print(f"{args.image_size} px: {1 / t:.0f} pairs/s, 2,000 pairs in {2000 * t:.1f} s (one process)")
    print(f"  render both views {small['render'] / t:.0%}, PNG encode {small['encode'] / t:.0%}, "
          f"rest (json, tar, sha256) {max(0.0, 1 - (small['render'] + small['encode']) / t):.0%}")
    print(f"{args.image_size * 2} px costs {large['total'] / t:.1f}x the time per pair of {args.image_size} px")


if __name__ == "__main__":
    main()
