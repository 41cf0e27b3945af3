"""The Python API (exported from ``regtok``): a trained run, a feature store, and images → register embeddings.

    import regtok

    run = regtok.load_run("runs/contrastive")              # the weights eval uses; weights="last" for the last
    store = regtok.open_store("features/ssvtp-test")       # store.read(kind, modality), .keys(), .labels(names=True)
    z = run.embed(store.read(run.feature_kind, "vision"), "vision", k=4)   # (N, E) shared embeddings, prefix 4
    regs = run.registers(store.read(run.feature_kind, "tactile"), "tactile")  # (N, R, d) register states

    emb = regtok.Embedder.from_run("runs/contrastive")     # the run's frozen encoders, from its lineage
    z = emb.embed([Image.open("a.png")], "vision")         # PIL images or (H, W[, C]) uint8 arrays

``embed`` gives what ``regtok eval --save-embeddings`` writes, and an Embedder on images gives what
``regtok extract`` followed by ``Run.embed`` gives (the encoders' features are rounded to float16 as in a store).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regtok.errors import RegtokError


@dataclass(repr=False)
class Run:
    """A trained run: the register model with its config, on ``device``, in eval mode."""

    path: Path
    """The run directory."""
    model: Any
    """The register modules (a ``regtok.model.RegTok``), in eval mode."""
    config: Any
    """The resolved ``regtok.config.TrainConfig`` the run was trained with."""
    feature_kind: str
    """``"pooled"`` or ``"tokens"``: the feature rows the model reads."""
    manifest: dict
    """The run manifest (inputs, metrics, lineage); empty when the run has none."""
    step: int
    """The optimizer step of the loaded weights."""
    device: torch.device
    """Where the model runs."""
    weights: str = "best.safetensors"
    """The file the weights came from: ``best.safetensors`` (the kept epoch), ``checkpoint.safetensors`` or
    ``start.safetensors`` (the model before its first step)."""
    epoch: int | None = None
    """The epoch (counted from 1) the weights were saved after, when the run's metrics say."""

    def __repr__(self) -> str:
        """``Run('runs/x', vision (257, 192) ↔ tactile (257, 192) tokens, contrastive, 8 registers (2 shared), k 1,
        2; best.safetensors after epoch 3, step 60, cpu)``: what a notebook needs, never the module tree."""
        shapes = " ↔ ".join(f"{m} {shape}" for m, shape in self.input_shapes.items())
        ks = ", ".join(map(str, self.prefixes))
        return (f"Run({str(self.path)!r}, {shapes} {self.feature_kind}, {self.config.model.loss_type}, "
                f"{self.n_registers} registers ({self.n_shared} shared), k {ks}; {self.weights} after epoch "
                f"{self.epoch if self.epoch is not None else '?'}, step {self.step}, {self.device})")

    @property
    def modalities(self) -> tuple[str, str]:
        """The two modalities, in pair order (a → b)."""
        return self.model.modalities

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """One row of each modality's input: ``(D,)`` for pooled features, ``(T, D)`` for tokens."""
        from regtok.data import row_shape

        return {m: row_shape(self.feature_kind, *shape) for m, shape in self.model.inputs.items()}

    @property
    def n_registers(self) -> int:
        """Register tokens per modality (the longest prefix ``k``)."""
        return self.model.cfg.n_registers

    @property
    def n_shared(self) -> int:
        """The first ``n_shared`` registers are aligned across modalities; ``embed`` takes k up to this."""
        return self.model.cfg.n_shared

    @property
    def prefixes(self) -> list[int]:
        """The shared prefixes ``k`` eval reports retrieval at (powers of two up to n_shared)."""
        from regtok.model import allowed_keeps

        return allowed_keeps(self.n_shared, "power_of_two")

    def embed(self, features: Any, modality: str, k: int | None = None, batch_size: int = 512) -> np.ndarray:
        """Shared embeddings ``(N, E)`` float32 (L2-normalised) of ``features`` ``(N, *input_shape)`` at prefix
        ``k`` (1 … n_shared; default: every shared register)."""
        keep = self.n_shared if k is None else prefix(k, self.n_shared, "n_shared: the shared embedding reads "
                                                                        "only the first n_shared registers")
        return self._run(features, modality, keep, batch_size, lambda out: out.shared)

    def registers(self, features: Any, modality: str, k: int | None = None, batch_size: int = 512) -> np.ndarray:
        """Register states ``(N, R, d)`` float32; slot i >= ``k`` holds position i's mask token (default: all kept)."""
        keep = self.n_registers if k is None else prefix(k, self.n_registers, "n_registers")
        return self._run(features, modality, keep, batch_size, lambda out: out.registers)

    def transport(self, embeddings: Any, direction: str = "a_to_b", steps: int = 4) -> np.ndarray:
        """A flow run's shared embeddings moved into the other modality's space (``a_to_b`` or ``b_to_a``)."""
        if getattr(self.model, "flow", None) is None:
            raise RegtokError(f"{self.path} was trained with loss {self.model.cfg.loss_type}: it has no flow head")
        x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32, device=self.device)
        with torch.no_grad():
            return self.model.transport(x, direction, steps).float().cpu().numpy()

    def _run(self, features: Any, modality: str, keep: int, batch_size: int, pick) -> np.ndarray:
        if modality not in self.modalities:
            raise RegtokError(f"{self.path} has modalities {', '.join(self.modalities)}, not {modality!r}")
        x = self._rows(features, modality)
        module = self.model.encoders[modality]
        out = []
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size])).to(self.device,
                                                                                             torch.float32)
                out.append(pick(module(batch, keep=keep)).float().cpu())
        result = torch.cat(out).numpy()
        bad = ~np.isfinite(result.reshape(len(result), -1)).all(axis=1)
        if bad.any():
            raise RegtokError(f"{modality} feature {_rows_text(np.flatnonzero(bad))}: the model's output is not "
                              "finite")
        return result

    def _rows(self, features: Any, modality: str) -> np.ndarray:
        """``features`` as ``(N, *input_shape)`` real numbers that a feature store could hold, or a RegtokError."""
        x = np.asarray(features)
        if x.dtype.kind == "c":
            raise RegtokError(f"{modality} features are complex ({x.dtype}); regtok reads real numbers (pass "
                              "features.real if the imaginary part is to be dropped)")
        if x.dtype.kind not in "fiu":
            raise RegtokError(f"{modality} features must be real numbers, got dtype {x.dtype}")
        shape = self.input_shapes[modality]
        if x.shape[1:] != shape:
            if x.shape != shape:
                raise RegtokError(f"{modality} features of shape {x.shape} do not fit the run: it reads rows of "
                                  f"{self.feature_kind} features {shape}")
            x = x[None]  # one row
        if not len(x):
            raise RegtokError("no feature rows given")
        flat = x.reshape(len(x), -1)
        bad = ~(np.isfinite(flat) & (np.abs(flat) <= FLOAT16_MAX)).all(axis=1)
        if bad.any():
            raise RegtokError(f"{modality} feature {_rows_text(np.flatnonzero(bad))} hold NaN, inf or values beyond "
                              f"±{FLOAT16_MAX:g}, which no feature store holds (stores are float16)")
        return x


FLOAT16_MAX = 65504.0  # the largest float16: the features a store holds, and so what a run was trained on


def prefix(k: Any, limit: int, what: str) -> int:
    """``k`` as a prefix length from 1 to ``limit`` (the run's ``what``); never coerced from a float, text or bool."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise RegtokError(f"k must be a whole number from 1 to {limit}, got {k!r} ({type(k).__name__})")
    if not 1 <= k <= limit:
        raise RegtokError(f"k must be from 1 to {limit} (the run's {what}), got {k}")
    return int(k)


def _rows_text(rows: np.ndarray, show: int = 10) -> str:
    """"row 3" / "rows 3, 5, 7" (and how many more)."""
    listed = ", ".join(map(str, rows[:show].tolist())) + (f" (and {len(rows) - show} more)" if len(rows) > show else "")
    return f"row{'s' if len(rows) > 1 else ''} {listed}"


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu", weights: str = "best") -> Run:
    """A trained run on ``device`` ("auto" allowed). ``weights``: "best", the weights eval uses (the kept best
    epoch, ``best.safetensors``, when the run kept one), "last" (``checkpoint.safetensors``) or "start"
    (``start.safetensors``, the model before its first step: the "start" baseline of eval)."""
    from regtok.distributed import resolve_device
    from regtok.pipeline.train import load_run as load

    loaded = load(run_dir, weights)
    dev = resolve_device(str(device))
    path = Path(run_dir)
    return Run(path.parent if path.is_file() else path, loaded.model.to(dev).eval(), loaded.train_config,
               loaded.feature_kind, loaded.manifest, loaded.step, dev, loaded.weights, loaded.epoch)


def open_store(store_dir: str | os.PathLike):
    """A feature store: ``.read(kind, modality[, rows])`` float16 arrays, ``.keys()``, ``.labels()``,
    ``.modalities``, ``.n``, ``.shape(kind, modality)``."""
    from regtok.pipeline.extract import open_store as open_

    return open_(store_dir)


class Embedder:
    """A run with the frozen Stage-1 encoders its features came from: images → register embeddings."""

    run: Run
    """The trained run whose register modules embed the encoders' features."""
    encoders: dict[str, Any]
    """``{modality: encoder}``: the frozen Stage-1 encoders the run's training store was extracted with."""

    def __init__(self, run: Run, encoders: dict[str, Any]) -> None:
        self.run, self.encoders = run, encoders

    def __repr__(self) -> str:
        specs = ", ".join(f"{m} {getattr(e, 'spec', type(e).__name__)}" for m, e in self.encoders.items())
        return f"Embedder({specs}; {self.run!r})"

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Embedder:
        """Rebuild the encoders the run's training store names (spec and weights hash from the lineage)."""
        from regtok.pipeline.encoders import load_encoder

        run = load_run(run_dir, device)
        encoders = {}
        for m, rec in training_encoders(run).items():
            encoders[m] = load_encoder(rec["spec"], run.device)
            check_weights(m, rec, encoders[m].weights_sha256)
        return cls(run, encoders)

    def features(self, images: Iterable[Any], modality: str, batch_size: int = 64) -> np.ndarray:
        """The frozen encoder's features of ``images`` as a store holds them (float16), ``(N, *input_shape)``."""
        enc = self._encoder(modality)
        tokens = self.run.feature_kind == "tokens"
        batch: list[torch.Tensor] = []
        out: list[np.ndarray] = []

        def flush() -> None:
            pooled, toks = enc.encode(torch.stack(batch), tokens)  # (b, D), (b, T, Dt)
            out.append((toks if tokens else pooled).to(torch.float16).cpu().numpy())
            batch.clear()

        for image in images:
            batch.append(to_uint8(image, enc.prep))
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        if not out:
            raise RegtokError("no images given")
        return np.concatenate(out)

    def embed(self, images: Any, modality: str, k: int | None = None) -> np.ndarray:
        """Shared embeddings ``(N, E)`` of PIL images or ``(H, W)``/``(H, W, C)`` uint8 arrays (one image, a
        sequence, or an ``(N, H, W, C)`` batch)."""
        return self.run.embed(self.features(_as_list(images), modality), modality, k)

    def registers(self, images: Any, modality: str, k: int | None = None) -> np.ndarray:
        """Register states ``(N, R, d)`` of images (as :meth:`Run.registers`; slots from ``k`` on masked)."""
        return self.run.registers(self.features(_as_list(images), modality), modality, k)

    def _encoder(self, modality: str) -> Any:
        if modality not in self.encoders:
            raise RegtokError(f"the run has modalities {', '.join(self.encoders)}, not {modality!r}")
        return self.encoders[modality]


def training_encoders(run: Run) -> dict[str, dict]:
    """``{modality: encoder record}`` of the store the run trained on (its spec and weights hash), in pair order."""
    from regtok.pipeline.train import training_store_manifest

    features = training_store_manifest(run.path / "manifest.json")
    if features is None:
        raise RegtokError(f"{run.path}: the run manifest does not lead to its training store's manifest, which "
                          "names the encoders")
    records = {m: (features.get("encoders") or {}).get(m) or {} for m in run.modalities}
    missing = [m for m, rec in records.items() if not rec.get("spec")]
    if missing:
        raise RegtokError(f"the training store of {run.path} records no encoder for {missing[0]!r}")
    return records


def check_weights(modality: str, record: dict, weights_sha256: str | None) -> None:
    """The encoder loaded now must have the weights the run's store was extracted with."""
    recorded = record.get("weights_sha256")
    if recorded and weights_sha256 and recorded != weights_sha256:
        raise RegtokError(f"the {modality} encoder {record['spec']} has weights {weights_sha256[:12]}…, the run's "
                          f"store was extracted with {recorded[:12]}…")


IMAGE_SHAPES = "(H, W) or (H, W, C) with C = 1, 3 or 4"


def _as_list(images: Any) -> Sequence[Any]:
    """One image (a PIL image, bytes, an ``(H, W)`` or ``(H, W, C)`` array) or a sequence of them, as a list."""
    if isinstance(images, np.ndarray):
        if images.ndim == 2 or images.ndim == 3 and images.shape[-1] in (1, 3, 4):
            return [images]
        if images.ndim == 4:
            return list(images)
        raise RegtokError(f"an image array must be {IMAGE_SHAPES}, or a batch (N, H, W, C); got shape "
                          f"{images.shape} (pass a list to embed several grayscale images)")
    return list(images) if isinstance(images, list | tuple) else [images]


def to_uint8(image: Any, prep: Any) -> torch.Tensor:
    """A PIL image, ``(H, W[, C])`` uint8 array or encoded bytes → the encoder's ``(3, H, W)`` uint8 input,
    through the same decoding and PIL steps as ``regtok extract``."""
    import io

    from PIL import Image

    if isinstance(image, bytes | bytearray):
        return prep.to_uint8(bytes(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or image.ndim == 3 and image.shape[-1] in (1, 3, 4)):
            raise RegtokError(f"image arrays must be uint8 {IMAGE_SHAPES}, got {image.dtype} {image.shape}")
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    if not isinstance(image, Image.Image):
        raise RegtokError(f"expected a PIL image, a uint8 array or image bytes, got {type(image).__name__}")
    buf = io.BytesIO()
    png_ready(image).save(buf, format="PNG")  # lossless: the same pixels through extract's own decoder
    return prep.to_uint8(buf.getvalue())


def png_ready(image: Any) -> Any:
    """A PIL image in a mode PNG stores, with the pixels extract would decode: 16-bit grey stays 16-bit (extract
    scales it to 8 bits), CMYK and the like become RGB as extract converts them; floating point is refused."""
    from PIL import Image

    if image.mode == "F":
        raise RegtokError("a floating-point (mode F) image has no known range; convert it to 8-bit ('L', 'RGB') or "
                          "16-bit ('I;16') first")
    if image.mode == "I" or image.mode.startswith("I;16"):
        arr = np.asarray(image)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise RegtokError(f"a mode {image.mode} image with values outside 0..65535; scale it to 16 bits first")
        return Image.fromarray(arr.astype(np.uint16))  # mode I;16: a 16-bit PNG
    if image.mode in ("1", "L", "LA", "P", "RGB", "RGBA"):
        return image
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise RegtokError(f"cannot use a PIL image of mode {image.mode}: {e}") from None
