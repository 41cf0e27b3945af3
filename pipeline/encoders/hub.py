"""Pretrained weights from the local Hugging Face cache, as timm and open_clip find them.

A file already in the cache is used without any network call. When ``HF_HUB_OFFLINE`` is set, a file that
is not there is an immediate one-line error saying what to do; otherwise it is downloaded into the cache.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from regtok.errors import RegtokError


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, read now rather than at import."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


_SAFE_TWINS = {"pytorch_model.bin": "model.safetensors",
               "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}  # as timm and open_clip name them


def safe_first(filename: str) -> list[str]:
    """``filename`` preceded by its safetensors twin when it is a pickle (``.bin``/``.pth``), as both libraries try."""
    stem, ext = os.path.splitext(filename)
    if ext not in (".bin", ".pth"):
        return [filename]
    return [_SAFE_TWINS.get(filename, f"{stem}.safetensors"), filename]


def hub_file(repo_id: str, filenames: Sequence[str], where: str, advice: str,
             revision: str | None = None) -> Path:
    """The first of ``filenames`` that ``repo_id`` has in the local cache, else (online) the first that downloads.

    RegtokError, in one line ending with ``advice``, when none can be had.
    """
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    for name in filenames:
        hit = try_to_load_from_cache(repo_id, name, revision=revision)
        if isinstance(hit, str):
            return Path(hit)
    names = " or ".join(filenames)
    if offline():
        raise RegtokError(f"{where}: {repo_id} ({names}) is not in the Hugging Face cache {constants.HF_HUB_CACHE} "
                          f"and HF_HUB_OFFLINE is set; {advice}")
    for name in filenames:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision))
        except EntryNotFoundError:
            continue
        except Exception as e:  # no network, no such repo, no access: all end the same way for the user
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RegtokError(f"{where}: cannot download {repo_id}/{name} ({reason}); {advice}") from None
    raise RegtokError(f"{where}: {repo_id} has no {names}; {advice}")


def cache_record(path: Path) -> dict:
    """Where a cached file came from: ``{"repo", "revision", "file"}`` read from its cache path."""
    parts = Path(path).parts
    i = len(parts) - 1 - parts[::-1].index("snapshots")
    repo = parts[i - 1].removeprefix("models--").replace("--", "/")
    return {"repo": repo, "revision": parts[i + 1], "file": "/".join(parts[i + 2:])}


def advice(spec_prefix: str, repo_id: str) -> str:
    """What to do about weights that cannot be had: a local file, or a warm cache."""
    return (f"pass a local weights file ({spec_prefix}@/path/weights) or warm the cache where there is network "
            f"(hf download {repo_id})")
