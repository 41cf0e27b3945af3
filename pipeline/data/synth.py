"""The embedded synthetic visuo-tactile dataset: paired photo / GelSight-style images of procedural surfaces.

Each sample draws its factors from a generator seeded by ``(seed, global index)``, so a sample's content does
not depend on how the samples are split into shards, and the same arguments give byte-identical shards.
Shared factors (material, roughness, frequency, orientation) shape the surface both modalities see;
vision-only factors (albedo, light, camera noise) and tactile-only factors (press depth, gel blur, sensor
noise) change only one view.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from regtok.errors import RegtokError
from regtok.pipeline.data import surfaces
from regtok.pipeline.data.shards import prepare_out_dir, remove_stale_shards, shard_name, write_shard
from regtok.pipeline.manifests.manifest import environment, file_record, new_manifest, write_manifest

GENERATOR_NAME = "regtok.synth"
GENERATOR_VERSION = "1"

# name -> (low, high, group); uniform draws. Degrees for angles; gel_blur in pixels at 64 px.
FACTORS = MappingProxyType({
    "roughness": (0.3, 1.0, "shared"),
    "frequency": (2.5, 6.5, "shared"),
    "orientation": (0.0, 180.0, "shared"),
    "albedo_hue": (0.0, 1.0, "vision"),
    "albedo_saturation": (0.1, 0.45, "vision"),
    "albedo_value": (0.5, 0.9, "vision"),
    "light_azimuth": (0.0, 360.0, "vision"),
    "light_elevation": (35.0, 70.0, "vision"),
    "camera_noise": (0.0, 0.02, "vision"),
    "press_depth": (0.5, 1.0, "tactile"),
    "gel_blur": (0.5, 1.5, "tactile"),
    "sensor_noise": (0.0, 0.015, "tactile"),
})
RELIEF = 0.25  # relief height as a fraction of the pattern period: shading contrast depends on roughness only
OCCLUSION = 0.35  # extra cavity darkening in the photo per unit roughness: deeper relief, darker cavities
MODALITIES = ("vision", "tactile")
# Circular factors (period in degrees) also get <name>_cos / <name>_sin labels, which a linear probe can read.
CIRCULAR = MappingProxyType({"orientation": 180.0, "light_azimuth": 360.0})


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of sample ``index``: independent of shard count and of the order samples are made in."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def check_families(families: tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """The material families a split draws from (default: all of :data:`surfaces.FAMILIES`), validated."""
    if families is None:
        return surfaces.FAMILIES
    families = tuple(families)
    unknown = [f for f in families if f not in surfaces.FAMILIES]
    if unknown:
        raise RegtokError(f"unknown material family {unknown[0]!r}; known: {', '.join(surfaces.FAMILIES)}")
    if not families or len(set(families)) != len(families):
        raise RegtokError(f"--families needs distinct names, at least one (got {', '.join(families) or 'none'})")
    return tuple(f for f in surfaces.FAMILIES if f in families)  # canonical order: the same split, however spelt


def draw_factors(rng: np.random.Generator, families: tuple[str, ...] = surfaces.FAMILIES) -> dict[str, Any]:
    """One sample's factor values: material class and name, then every continuous factor (rounded to 1e-6).

    The material is drawn uniformly from ``families``; its class index is always into the full
    :data:`surfaces.FAMILIES`, so labels mean the same in splits that hold different families.
    """
    material = surfaces.FAMILIES.index(families[int(rng.integers(len(families)))])
    out: dict[str, Any] = {"material": material, "material_name": surfaces.FAMILIES[material]}
    for name, (lo, hi, _) in FACTORS.items():
        out[name] = round(float(rng.uniform(lo, hi)), 6)
    for name, period in CIRCULAR.items():
        angle = 2 * np.pi * out[name] / period
        out[f"{name}_cos"], out[f"{name}_sin"] = round(float(np.cos(angle)), 6), round(float(np.sin(angle)), 6)
    return out


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return (v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)).astype(np.float32)


def render_pair(factors: dict[str, Any], size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The (vision, tactile) images of one sample, each ``(size, size, 3)`` uint8."""
    h = surfaces.height_field(factors["material"], size, factors["frequency"],
                              np.deg2rad(factors["orientation"]), rng)
    relief_px = RELIEF * factors["roughness"] * size / factors["frequency"]
    albedo = _hsv_to_rgb(factors["albedo_hue"], factors["albedo_saturation"], factors["albedo_value"])
    vision = surfaces.render_photo(h, relief_px, albedo, np.deg2rad(factors["light_azimuth"]),
                                   np.deg2rad(factors["light_elevation"]), factors["camera_noise"], rng,
                                   occlusion=0.4 + OCCLUSION * factors["roughness"])
    centre = (float(rng.uniform(-0.15, 0.15)), float(rng.uniform(-0.15, 0.15)))
    indent = surfaces.press_into_gel(h, relief_px, factors["press_depth"], centre)
    tactile = surfaces.render_gelsight(indent, factors["gel_blur"] * size / 64, factors["sensor_noise"], rng)
    return vision, tactile


def encode_png(img: np.ndarray) -> bytes:
    """PNG bytes with fixed settings and no metadata (no timestamps), so equal pixels give equal bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, mode="RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def key_width(samples: int) -> int:
    """Digits of a sample key: at least 6, enough for the largest global index."""
    return max(6, len(str(max(samples - 1, 0))))


def make_sample(seed: int, index: int, size: int, width: int = 6,
                families: tuple[str, ...] = surfaces.FAMILIES) -> tuple[str, list[tuple[str, bytes]]]:
    """Sample ``index`` as ``(key, [(ext, bytes), …])``: vision.png, tactile.png, json."""
    rng = sample_rng(seed, index)
    factors = draw_factors(rng, families)
    vision, tactile = render_pair(factors, size, rng)
    key = f"{index:0{width}d}"
    record = {"key": key, "index": index, **factors}
    return key, [("vision.png", encode_png(vision)), ("tactile.png", encode_png(tactile)),
                 ("json", json.dumps(record, separators=(",", ":")).encode())]


def shard_ranges(samples: int, shards: int) -> list[range]:
    """Contiguous global-index ranges, one per shard, sizes differing by at most one."""
    return [range(i * samples // shards, (i + 1) * samples // shards) for i in range(shards)]


def declared_labels() -> dict[str, dict[str, Any]]:
    """The ``labels`` block of the dataset manifest: material is categorical, every other factor continuous.

    Each label says its ``group``: ``shared`` (both views; the material too), ``vision`` or ``tactile`` (one view).
    """
    labels: dict[str, dict[str, Any]] = {"material": {"type": "categorical", "classes": list(surfaces.FAMILIES),
                                                      "group": "shared"}}
    for name, (lo, hi, group) in FACTORS.items():
        labels[name] = {"type": "continuous", "range": [lo, hi], "group": group}
        if name in CIRCULAR:
            for part in ("cos", "sin"):
                labels[f"{name}_{part}"] = {"type": "continuous", "range": [-1.0, 1.0], "group": group,
                                            "derived_from": name}
    return labels


def generator_params(samples: int, shards: int, seed: int, image_size: int,
                     families: tuple[str, ...] = surfaces.FAMILIES) -> dict[str, Any]:
    """Every parameter that determines the output, including the factor ranges and the encoder versions.

    ``families`` are the material families this split draws from (all of them unless the split was made with
    ``--families``); the class list in the label schema stays the full one.
    """
    from PIL import __version__ as pillow_version

    return {"samples": samples, "shards": shards, "seed": seed, "image_size": image_size,
            "families": list(families), "factors": {k: list(v) for k, v in FACTORS.items()},
            "relief": RELIEF, "occlusion": OCCLUSION, "png": {"compress_level": 6, "optimize": False},
            "numpy": np.__version__, "pillow": pillow_version}


def check_args(samples: int, shards: int, image_size: int) -> None:
    """RegtokError unless the arguments of :func:`synthesize` make sense."""
    if samples < 1:
        raise RegtokError(f"--samples must be at least 1 (got {samples})")
    if not 1 <= shards <= samples:
        raise RegtokError(f"--shards must be between 1 and the number of samples ({samples}), got {shards}")
    if not 16 <= image_size <= 1024:
        raise RegtokError(f"--image-size must be between 16 and 1024 pixels (got {image_size})")


def _samples(seed: int, indices: range, size: int, width: int, families: tuple[str, ...],
             progress: Callable[[int], None] | None) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    for index in indices:
        yield make_sample(seed, index, size, width, families)
        if progress is not None:
            progress(1)


def synthesize(out_dir: str | Path, samples: int, shards: int, seed: int, image_size: int = 64,
               progress: Callable[[int], None] | None = None,
               families: tuple[str, ...] | list[str] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write ``shards`` tar shards of ``samples`` pairs and ``OUT_DIR/dataset.json``; return that manifest.

    ``families`` restricts the material families drawn (default: all), so that a test split can hold surfaces
    a training split never contains; ``progress`` (optional) is called with the number of samples just finished.
    ``OUT_DIR`` must be empty or hold an earlier synth output, unless ``overwrite``.
    """
    check_args(samples, shards, image_size)
    families = check_families(families)
    out = Path(out_dir)
    prepare_out_dir(out, "synth", overwrite)
    start = time.perf_counter()
    width = key_width(samples)
    records = []
    for i, indices in enumerate(shard_ranges(samples, shards)):
        path = out / shard_name(i)
        n = write_shard(path, _samples(seed, indices, image_size, width, families, progress))
        records.append({**file_record(path, out), "samples": n})
    remove_stale_shards(out, [out / r["path"] for r in records])
    seconds = time.perf_counter() - start
    params = generator_params(samples, shards, seed, image_size, families)
    subset = families != surfaces.FAMILIES
    command = ["regtok", "synth", str(out), "--samples", str(samples), "--shards", str(shards),
               "--seed", str(seed), "--image-size", str(image_size)]
    config = {"samples": samples, "shards": shards, "seed": seed, "image_size": image_size}
    if subset:  # an all-family split keeps the manifest it always had
        command += ["--families", ",".join(families)]
        config["families"] = list(families)
    manifest = new_manifest(
        "dataset",
        command=command,
        config=config,
        outputs={"samples": samples, "shards": len(records)},  # the shard files are listed in "shards"
        environment_=environment(),
        timings={"seconds": round(seconds, 3), "samples_per_second": round(samples / max(seconds, 1e-9), 1)},
        shards=[{"path": r["path"], "samples": r["samples"], "bytes": r["bytes"], "sha256": r["sha256"]}
                for r in records],
        samples=samples,
        modalities=list(MODALITIES),
        families=list(families),
        labels=declared_labels(),
        skipped=[],
        generator={"name": GENERATOR_NAME, "version": GENERATOR_VERSION, "params": params},
    )
    write_manifest(out / "dataset.json", manifest)
    return manifest
