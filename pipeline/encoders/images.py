"""Image decoding and preprocessing, split where it is cheapest to run.

An encoder's eval transform (open_clip's ``image_transform``, timm's ``create_transform``) is a list of PIL
steps (resize, crop …) followed by ``ToTensor`` and ``Normalize``. :class:`ImagePrep` keeps the PIL steps for
DataLoader workers, which hand over ``uint8`` tensors (4x less to move than float32), and applies the
normalisation on the device in :meth:`ImagePrep.normalize`. The result equals the encoder's own transform:
PIL resizes uint8 images to uint8, so ``ToTensor`` would see the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


class ImageDecodeError(ValueError):
    """Bytes that do not decode to an image."""


@dataclass(frozen=True)
class ImagePrep:
    """The preprocessing of one encoder: PIL steps in workers, normalisation on the device."""

    steps: tuple[Callable, ...]  # PIL -> PIL (resize, crop, mode); picklable torchvision transforms
    size: tuple[int, int]  # (H, W) after the steps
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_uint8(self, data: bytes) -> torch.Tensor:
        """Decode image bytes and run the PIL steps: ``(3, H, W)`` uint8."""
        img = decode_image(data)
        for step in self.steps:
            img = step(img)
        arr = np.asarray(img, dtype=np.uint8)
        if arr.shape[:2] != self.size:
            raise ImageDecodeError(f"preprocessed image is {arr.shape[:2]}, expected {self.size}")
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, H, W)

    def normalize(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(B, 3, H, W)`` uint8 on any device -> normalised float ``(B, 3, H, W)`` of ``dtype``."""
        mean = torch.tensor(self.mean, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float64).view(1, 3, 1, 1)
        scale = (1.0 / (255.0 * std)).to(x.device, torch.float32)  # (1, 3, 1, 1)
        shift = (-mean / std).to(x.device, torch.float32)  # (1, 3, 1, 1)
        return x.to(torch.float32, copy=True).mul_(scale).add_(shift).to(dtype)  # (B, 3, H, W): (x/255 - mean)/std

    def describe(self) -> dict:
        """JSON-able summary for manifests."""
        return {"size": list(self.size), "mean": list(self.mean), "std": list(self.std),
                "steps": [repr(s) for s in self.steps]}


def decode_image(data: bytes) -> Image.Image:
    """Decode bytes to an RGB PIL image; :class:`ImageDecodeError` if they are not an image."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError …) for bad bytes
        raise ImageDecodeError(f"undecodable image ({type(e).__name__}: {e})") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit grey: convert("RGB") would clip at 255
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode != "I" or _png_bit_depth(data) == 16 or arr.max() > 255 else 255.0  # "I": 16-bit
        # PNGs in older Pillow; the file's own bit depth decides, so a dark 16-bit image is not read as 8-bit
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8))  # "L"
    return img.convert("RGB") if img.mode != "RGB" else img


def _png_bit_depth(data: bytes) -> int | None:
    """The bit depth in a PNG's IHDR chunk (byte 24), or None for other formats."""
    return data[24] if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24 else None


def prep_from_transform(transform: Callable) -> ImagePrep:
    """Split an eval ``Compose([... PIL steps ..., ToTensor, Normalize])`` into an :class:`ImagePrep`."""
    steps = list(getattr(transform, "transforms", [transform]))
    names = [type(s).__name__ for s in steps]
    to_tensor = [i for i, n in enumerate(names) if n in ("ToTensor", "MaybeToTensor", "PILToTensor")]
    if not to_tensor or to_tensor[0] != len(steps) - 2 or names[-1] != "Normalize":
        raise ValueError(f"unsupported eval transform (expected PIL steps, ToTensor, Normalize): {names}")
    norm = steps[-1]
    pil_steps = tuple(steps[: to_tensor[0]])
    size = _output_size(pil_steps)
    return ImagePrep(pil_steps, size, _triple(norm.mean), _triple(norm.std))


def simple_prep(size: int, mean: Sequence[float], std: Sequence[float]) -> ImagePrep:
    """Resize the shorter side to ``size`` (bicubic) and centre-crop a square."""
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    steps = (Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size))
    return ImagePrep(steps, (size, size), _triple(mean), _triple(std))


def _output_size(steps: Sequence[Callable]) -> tuple[int, int]:
    probe = Image.new("RGB", (97, 61))  # odd, non-square: any fixed-size pipeline ends at its size anyway
    for step in steps:
        probe = step(probe)
    return (probe.height, probe.width)


def _triple(v) -> tuple[float, float, float]:
    vals = [float(x) for x in (v.tolist() if hasattr(v, "tolist") else v)]
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise ValueError(f"expected 3 channel values, got {vals}")
    return (vals[0], vals[1], vals[2])
