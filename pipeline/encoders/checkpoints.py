"""Safe checkpoint reading for the encoders: no pickled code runs, and key sets are checked strictly.

``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``
(memory-mapped when the file allows it). A TVL Stage-1 checkpoint pickles an ``argparse.Namespace`` next to
its weights; :func:`read_checkpoint` admits exactly that class, for that one call, when asked to.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regtok.errors import RegtokError

_SHOW = 6  # how many key names an error message lists


def read_checkpoint(path: str | os.PathLike, *, allow_namespace: bool = False) -> Any:
    """Load a checkpoint file without executing pickled code.

    ``allow_namespace`` admits ``argparse.Namespace`` objects (TVL's pickled ``args``) and nothing else.
    """
    p = Path(path)
    if not p.is_file():
        raise RegtokError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise RegtokError(f"{p}: not a readable safetensors file ({e})") from None
    safe = [argparse.Namespace] if allow_namespace else []
    with torch.serialization.safe_globals(safe):
        try:
            return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise RegtokError(f"{p}: cannot read checkpoint ({_first_line(e)})") from None
        except pickle.UnpicklingError as e:
            raise RegtokError(f"{p}: refusing to unpickle objects beyond tensors ({_first_line(e)})") from None
        try:  # legacy (non-zip) torch.save files cannot be memory-mapped
            return torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise RegtokError(f"{p}: refusing to unpickle objects beyond tensors ({_first_line(e)})") from None
        except (RuntimeError, OSError, EOFError) as e:
            raise RegtokError(f"{p}: cannot read checkpoint ({_first_line(e)})") from None


def state_dict_of(obj: Any, path: str | os.PathLike, nested: tuple[str, ...] = ("state_dict", "model")) -> dict:
    """The tensor dict inside a loaded checkpoint (unwrapping ``state_dict``/``model``; dropping ``module.``)."""
    if isinstance(obj, Mapping):
        for key in nested:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RegtokError(f"{path}: expected a state dict of tensors")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], where: str, *, assign: bool = False) -> None:
    """Load ``sd`` into ``module``; a missing/unexpected key or a shape mismatch is a RegtokError naming them."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_names(unexpected)}")
        raise RegtokError(f"{where}: checkpoint does not fit the model; " + "; ".join(parts))
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
    if wrong:
        raise RegtokError(f"{where}: checkpoint shapes do not fit the model: {_names(wrong)}")
    module.load_state_dict(sd, strict=True, assign=assign)


def has_only_persistent_buffers(module: nn.Module) -> bool:
    """True when every buffer is in the state dict, so a meta-built module is fully defined by loading it."""
    keys = set(module.state_dict())
    return all(name in keys for name, _ in module.named_buffers())


def build_and_load(build: Callable[[], nn.Module], sd: Mapping[str, torch.Tensor], where: str) -> nn.Module:
    """``build()`` assigned the weights ``sd`` (strictly, see :func:`load_strict`).

    The module is built on the meta device, so no memory is allocated for random weights that ``sd`` replaces;
    a module with non-persistent buffers (which ``sd`` does not hold) is built on the CPU instead.
    """
    with torch.device("meta"):
        module = build()
    if not has_only_persistent_buffers(module):
        module = build()
    load_strict(module, sd, where, assign=True)
    return module


def state_dict_sha256(module: nn.Module) -> str:
    """Hex sha256 over a module's state dict (names, dtypes, shapes and bytes, in key order)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256_cached(path: str | os.PathLike) -> str:
    """sha256 of a weights file, remembered per (path, size, mtime, inode) in ``$REGTOK_CACHE_DIR`` (default
    ``~/.cache/regtok``) so that repeated runs over a large checkpoint do not hash it again (make/rsync's rule)."""
    import json

    from regtok.pipeline.manifests.manifest import sha256_file, write_json_atomic

    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    cache = Path(os.environ.get("REGTOK_CACHE_DIR", Path.home() / ".cache" / "regtok")) / "sha256.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), str):
        return known[key]
    digest = sha256_file(p)
    if st.st_size >= 1 << 24:  # only large files are worth remembering
        known = {k: v for k, v in (known.items() if isinstance(known, dict) else []) if not k.startswith(f"{p}|")}
        known[key] = digest
        try:
            write_json_atomic(cache, dict(list(known.items())[-256:]))
        except OSError:
            pass  # a read-only home is no reason to fail
    return digest


def _names(keys: list[str]) -> str:
    more = f", … (+{len(keys) - _SHOW})" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
