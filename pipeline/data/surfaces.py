"""Procedural surface patches and the two ways of seeing them: a colour photo and a GelSight-style touch.

A surface is a height field in [0, 1] on an ``(S, S)`` pixel grid, made by one of eight material families
from three shared factors: spatial frequency (cycles per patch), orientation (radians) and random phases.
:func:`render_photo` shades it as a camera would (Lambertian, one light, albedo, cavity darkening, noise);
:func:`render_gelsight` presses it into an elastomer gel and shades the gel with three coloured lights
120° apart over a smooth background, as the TACTO and Taxim simulators do. numpy only, vectorised.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

FAMILIES = ("grating", "knurl", "dots", "weave", "gravel", "fractal", "scratched", "perforated")

Field = np.ndarray  # (S, S) float32


def _grid(size: int, orientation: float) -> tuple[Field, Field]:
    """Patch coordinates in [-0.5, 0.5), rotated by ``orientation``: (along, across), each (S, S)."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    v, u = np.meshgrid(t, t, indexing="ij")  # v = row (down), u = column (right)
    c, s = np.float32(np.cos(orientation)), np.float32(np.sin(orientation))
    return u * c + v * s, -u * s + v * c


def _normalise(h: Field) -> Field:
    lo, hi = float(h.min()), float(h.max())
    return ((h - lo) / (hi - lo + 1e-8)).astype(np.float32)


def _smoothstep(x: Field) -> Field:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _grating(a: Field, b: Field, f: float, rng: np.random.Generator) -> Field:
    """Parallel ridges with flat-topped (squarish) profiles."""
    phase = rng.uniform(0, 2 * np.pi)
    return np.tanh(2.5 * np.sin(2 * np.pi * f * a + phase)) / np.tanh(2.5) * 0.5 + 0.5


def _knurl(a: Field, b: Field, f: float, rng: np.random.Generator) -> Field:
    """Diamond knurl: two crossed V-groove sets at ±35° around the orientation, leaving pyramids."""
    out = np.ones_like(a)
    for angle in (np.deg2rad(35.0), -np.deg2rad(35.0)):
        d = a * np.cos(angle) + b * np.sin(angle)
        x = f * 1.2 * d + rng.uniform(0, 1)
        out = np.minimum(out, 1.0 - 2.0 * np.abs(x - np.floor(x) - 0.5))  # triangle wave
    return out


def _lattice_distance(a: Field, b: Field, f: float, rng: np.random.Generator, hexagonal: bool) -> Field:
    """Distance (in lattice periods) to the nearest point of a square or hexagonal lattice."""
    x = f * a + rng.uniform(0, 1)
    y = f * b + rng.uniform(0, 1)
    if not hexagonal:
        return np.hypot(x - np.round(x), y - np.round(y))
    r3 = np.float32(np.sqrt(3.0))
    best = None
    for ox, oy in ((0.0, 0.0), (0.5, r3 / 2)):  # two offset rectangular sub-lattices make the hex lattice
        px, py = x - ox, (y - oy) / r3
        d = np.hypot(px - np.round(px), (py - np.round(py)) * r3)
        best = d if best is None else np.minimum(best, d)
    return best


def _dots(a: Field, b: Field, f: float, rng: np.random.Generator) -> Field:
    """Hemispherical bumps on a hexagonal lattice."""
    d = _lattice_distance(a, b, f, rng, hexagonal=True) / 0.32
    return np.sqrt(np.clip(1.0 - d * d, 0.0, 1.0))


def _perforated(a: Field, b: Field, f: float, rng: np.random.Generator) -> Field:
    """A flat plate with round holes on a square lattice."""
    d = _lattice_distance(a, b, f * 0.9, rng, hexagonal=False)
    return _smoothstep((d - 0.26) / 0.08)


def _weave(a: Field, b: Field, f: float, rng: np.random.Generator) -> Field:
    """Plain weave: warp and weft threads passing alternately over and under each other."""
    x = f * a + rng.uniform(0, 2)
    y = f * b + rng.uniform(0, 2)
    i, j = np.floor(x), np.floor(y)
    across_warp = np.sqrt(np.clip(1.0 - ((y - j - 0.5) / 0.45) ** 2, 0.0, 1.0))
    across_weft = np.sqrt(np.clip(1.0 - ((x - i - 0.5) / 0.45) ** 2, 0.0, 1.0))
    lift_warp = 0.5 + 0.5 * np.cos(np.pi * (x - 0.5 - j))  # highest where i - j is even
    lift_weft = 0.5 - 0.5 * np.cos(np.pi * (y - 0.5 - i))  # highest where i - j is odd
    return np.maximum(across_warp * (0.45 + 0.55 * lift_warp), across_weft * (0.45 + 0.55 * lift_weft))


def _gravel(a: Field, b: Field, f: float, rng: np.random.Generator) -> Field:
    """Cells (cobbles/gravel): jittered-grid Voronoi cells, domed, separated by grooves (F2 - F1)."""
    n = max(2, int(round(f)))
    x, y = (a + 0.75) * n + 1, (b + 0.75) * n + 1  # rotated coordinates lie in (0, 1.5) * n, plus one cell
    cells = int(np.ceil(1.5 * n)) + 3  # so every pixel's 3x3 neighbour cells exist (no clipping, no duplicates)
    jitter = rng.uniform(0.1, 0.9, size=(cells, cells, 2)).astype(np.float32)
    ci, cj = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    d1 = np.full(x.shape, np.inf, dtype=np.float32)
    d2 = np.full(x.shape, np.inf, dtype=np.float32)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            gi, gj = ci + di, cj + dj
            px, py = gi + jitter[gi, gj, 0], gj + jitter[gi, gj, 1]
            d = np.hypot(x - px, y - py)
            d2 = np.minimum(d2, np.maximum(d1, d))
            d1 = np.minimum(d1, d)
    edge = _smoothstep((d2 - d1) / 0.35)  # 0 on the cell border, 1 inside
    return edge * (1.0 - 0.35 * d1 * d1)


def _fractal_spectrum(size: int, f: float, orientation: float, rng: np.random.Generator) -> Field:
    """Anisotropic 1/k^beta noise with a corner at ``f`` cycles per patch, elongated along the orientation."""
    k = np.fft.fftfreq(size).astype(np.float32) * size
    ky, kx = np.meshgrid(k, k, indexing="ij")
    c, s = np.float32(np.cos(orientation)), np.float32(np.sin(orientation))
    ka, kb = kx * c + ky * s, -kx * s + ky * c
    keff = np.hypot(ka * 2.5, kb) / (1.5 * f)  # short correlation across the grain, long along it
    amp = 1.0 / (1.0 + keff * keff) ** 0.9
    amp[0, 0] = 0.0
    noise = rng.standard_normal((2, size, size)).astype(np.float32)
    return np.fft.ifft2(amp * (noise[0] + 1j * noise[1])).real.astype(np.float32)


def _scratched(a: Field, b: Field, f: float, rng: np.random.Generator) -> Field:
    """A smooth plate with fine grooves: scratches mostly along the orientation, a few strays."""
    count = int(round(2.5 * f))
    angle = rng.normal(0.0, np.deg2rad(6.0), size=count)
    angle[: max(1, count // 6)] += rng.uniform(0, np.pi, size=max(1, count // 6))  # strays
    offset = rng.uniform(-0.55, 0.55, size=count)
    centre = rng.uniform(-0.4, 0.4, size=count)
    half_len = rng.uniform(0.15, 0.7, size=count)
    width = rng.uniform(0.006, 0.018, size=count) * (1.0 + 3.0 / f)
    depth = rng.uniform(0.5, 1.0, size=count)
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    along = a[None] * c + b[None] * s - centre[:, None, None]  # (N, S, S)
    across = -a[None] * s + b[None] * c - offset[:, None, None]
    fade = _smoothstep((half_len[:, None, None] - np.abs(along)) / 0.05)
    grooves = depth[:, None, None] * fade * np.exp(-((across / width[:, None, None]) ** 2))
    return 1.0 - np.clip(grooves.max(axis=0), 0.0, 1.0)


def height_field(family: int, size: int, frequency: float, orientation: float,
                 rng: np.random.Generator) -> Field:
    """The height field of one patch, ``(size, size)`` float32 in [0, 1].

    ``family`` indexes :data:`FAMILIES`; ``frequency`` is in cycles per patch; ``orientation`` in radians.
    A faint micro-roughness is added to every family, as real surfaces have.
    """
    a, b = _grid(size, orientation)
    if FAMILIES[family] == "fractal":
        h = _fractal_spectrum(size, frequency, orientation, rng)
        h = np.clip(h / (2.0 * float(h.std()) + 1e-8), -1.0, 1.0)  # rare extremes would flatten the rest
    else:
        makers: dict[str, Callable[..., Field]] = {
            "grating": _grating, "knurl": _knurl, "dots": _dots, "weave": _weave, "gravel": _gravel,
            "scratched": _scratched, "perforated": _perforated,
        }
        h = makers[FAMILIES[family]](a, b, np.float32(frequency), rng)
    micro = _fractal_spectrum(size, 24.0, 0.0, rng)
    micro *= 0.02 / (float(micro.std()) + 1e-8)
    return _normalise(_normalise(h) + micro)


def gaussian_blur(img: Field, sigma: float) -> Field:
    """Separable Gaussian blur of the last two axes with a truncated, renormalised kernel (edges not wrapped)."""
    if sigma <= 0:
        return img
    size = img.shape[-1]
    idx = np.arange(size, dtype=np.float32)
    g = np.exp(-0.5 * ((idx[:, None] - idx[None, :]) / np.float32(sigma)) ** 2)  # (S, S)
    g[np.abs(idx[:, None] - idx[None, :]) > 3 * sigma + 1] = 0.0
    g /= g.sum(axis=1, keepdims=True)
    return (g @ img @ g.T).astype(np.float32)


def _normals(height_px: Field) -> tuple[Field, Field, Field]:
    """Unit surface normals (nx, ny, nz) of a height field given in pixel units."""
    gy, gx = np.gradient(height_px)
    inv = 1.0 / np.sqrt(gx * gx + gy * gy + 1.0)
    return -gx * inv, -gy * inv, inv


def _direction(azimuth: float, elevation: float) -> np.ndarray:
    ce = np.cos(elevation)
    return np.array([ce * np.cos(azimuth), ce * np.sin(azimuth), np.sin(elevation)], dtype=np.float32)


def _to_uint8(img: Field) -> np.ndarray:
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def render_photo(h: Field, relief_px: float, albedo: np.ndarray, light_azimuth: float, light_elevation: float,
                 noise: float, rng: np.random.Generator, occlusion: float = 0.6) -> np.ndarray:
    """A camera photo of the surface: ``(S, S, 3)`` uint8.

    Lambertian shading of ``h * relief_px`` under one distant light, times an RGB ``albedo`` darkened in
    cavities by up to ``occlusion`` (a cheap ambient-occlusion term; deeper relief, darker cavities), plus
    ambient light and Gaussian camera noise.
    """
    nx, ny, nz = _normals(h * np.float32(relief_px))
    light = _direction(light_azimuth, light_elevation)
    lambert = np.clip(nx * light[0] + ny * light[1] + nz * light[2], 0.0, None) / light[2]  # flat = 1
    shade = (0.3 + 0.7 * lambert) * (1.0 - occlusion * (1.0 - h))  # (S, S); cavities dark whatever the light
    img = shade[..., None] * albedo[None, None, :].astype(np.float32)  # (S, S, 3)
    img += rng.normal(0.0, noise, size=img.shape).astype(np.float32)
    return _to_uint8(img)


_GEL_BACKGROUND = np.array([0.52, 0.50, 0.58], dtype=np.float32)  # flat gel colour, as in a DIGIT/GelSight
_GEL_LIGHT_ELEVATION = np.deg2rad(28.0)  # LEDs sit low at the gel's rim, so slopes light up strongly
_GEL_GAIN = 0.9


def press_into_gel(h: Field, relief_px: float, press_depth: float, contact_centre: tuple[float, float]) -> Field:
    """Gel indentation in pixels, ``(S, S)`` float32 >= 0.

    The textured patch sits on a gently domed object (so a light touch makes a small contact spot that grows
    with force); it is pushed ``press_depth`` (a fraction of the relief, up to ~1.2x) into the gel from the
    highest point down. Points below the gel stay out of contact.
    """
    size = h.shape[0]
    t = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    y, x = np.meshgrid(t, t, indexing="ij")
    rho2 = ((x - contact_centre[0]) ** 2 + (y - contact_centre[1]) ** 2) / 0.25
    surface = relief_px * (h - 0.4 * rho2)
    depth = np.float32(1.2 * press_depth * relief_px)
    return np.clip(surface - (surface.max() - depth), 0.0, None).astype(np.float32)


def render_gelsight(indent_px: Field, gel_blur: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    """A GelSight-style tactile image of a gel indentation: ``(S, S, 3)`` uint8.

    The gel smooths the indentation (Gaussian, ``gel_blur`` pixels); red, green and blue LEDs 120° apart at
    a low elevation shade its slopes (each channel = background + gain * (n·l_c - n_flat·l_c)); the flat gel
    shows a smooth background brightening towards each LED; Gaussian sensor noise is added.
    """
    size = indent_px.shape[0]
    gel = gaussian_blur(indent_px, gel_blur)
    nx, ny, nz = _normals(-gel)  # the gel is pushed away from the camera
    t = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    y, x = np.meshgrid(t, t, indexing="ij")
    img = np.empty((size, size, 3), dtype=np.float32)
    for c in range(3):
        azimuth = np.pi / 2 + c * 2 * np.pi / 3
        light = _direction(azimuth, _GEL_LIGHT_ELEVATION)
        background = _GEL_BACKGROUND[c] + 0.16 * (x * light[0] + y * light[1]) / np.cos(_GEL_LIGHT_ELEVATION)
        response = nx * light[0] + ny * light[1] + (nz - 1.0) * light[2]
        img[..., c] = background + _GEL_GAIN * response
    img += rng.normal(0.0, noise, size=img.shape).astype(np.float32)
    return _to_uint8(img)
