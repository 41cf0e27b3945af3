"""The builders of the encoder kinds, one per way a spec names its weights (see :mod:`pipeline.encoders.encoder`).

Each builder is registered for a ``(kind, form)`` pair, as timm's ``register_model`` registers a model's
entrypoint: :func:`builder_for` looks a parsed spec up. Builders that read a weights file hash it in a thread
while the model is built (:func:`hashing`) and build on the meta device before assigning the weights
(:func:`regtok.pipeline.encoders.checkpoints.build_and_load`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from regtok.errors import RegtokError
from regtok.pipeline.encoders.checkpoints import (
    build_and_load,
    file_sha256_cached,
    read_checkpoint,
    state_dict_of,
    state_dict_sha256,
)
from regtok.pipeline.encoders.encoder import (
    Encoder,
    EncoderSpec,
    OpenClipVisual,
    TimmBackbone,
    known_tags,
    missing_tag,
    tiny_encoder,
)
from regtok.pipeline.encoders.images import ImagePrep, prep_from_transform

Builder = Callable[[EncoderSpec], Encoder]
BUILDERS: dict[tuple[str, str], Builder] = {}  # (kind, form) -> builder, filled by @register_kind below


def register_kind(kind: str, form: str) -> Callable[[Builder], Builder]:
    """Register a builder for specs of ``kind`` that name their weights in ``form`` (see ``EncoderSpec.form``)."""
    def add(fn: Builder) -> Builder:
        BUILDERS[(kind, form)] = fn
        return fn
    return add


def builder_for(spec: EncoderSpec) -> Builder:
    """The builder registered for ``spec``; RegtokError when no kind takes it."""
    try:
        return BUILDERS[(spec.kind, spec.form)]
    except KeyError:
        known = ", ".join(f"{k}:{f}" for k, f in BUILDERS)
        raise RegtokError(f"encoder {spec}: no encoder kind builds {spec.kind} from a {spec.form} (known: {known})") \
            from None


@contextmanager
def hashing(spec: EncoderSpec, path: str | Path) -> Iterator[Future[str]]:
    """The sha256 of a weights file, computed in a thread (hashing releases the GIL) while the model is built."""
    from concurrent.futures import ThreadPoolExecutor

    if not Path(path).is_file():
        raise RegtokError(f"encoder {spec}: weights file not found: {path}")
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(file_sha256_cached, path)


@register_kind("tiny", "seed")
def tiny(spec: EncoderSpec) -> Encoder:
    """``tiny:SEED``: a seeded random-init 1-block ViT."""
    return tiny_encoder(spec.seed)


@register_kind("open_clip", "tag")
def open_clip_tag(spec: EncoderSpec) -> Encoder:
    """``open_clip:MODEL@TAG``: loaded the way open_clip loads a pretrained tag."""
    import open_clip

    _check_open_clip_tag(spec, open_clip.get_pretrained_cfg(spec.model, spec.source))
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(spec.model, pretrained=spec.source)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        raise RegtokError(f"encoder {spec}: open_clip could not load it ({e})") from None
    visual = model.visual
    del model  # the text tower is not needed
    backbone = OpenClipVisual(visual)
    return Encoder(spec, backbone, prep_from_transform(preprocess), state_dict_sha256(backbone),
                   {"source": "open_clip pretrained tag"})


@register_kind("open_clip", "file")
def open_clip_file(spec: EncoderSpec) -> Encoder:
    """``open_clip:MODEL@/path/file``: a full CLIP or visual-tower state dict."""
    return _open_clip_weights(spec, spec.source, {"source": "local file"})


@register_kind("open_clip", "hf-hub")
def open_clip_hub(spec: EncoderSpec) -> Encoder:
    """``open_clip:hf-hub:ORG/NAME``: open_clip_config.json and weights from the Hugging Face cache."""
    from regtok.pipeline.encoders.hub import advice, hub_file

    repo = spec.model.removeprefix("hf-hub:")
    hub_file(repo, ["open_clip_config.json"], f"encoder {spec}", advice("open_clip:MODEL", repo))
    names = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]  # open_clip's own file names
    return _open_clip_weights(spec, *_cached(spec, repo, names, "open_clip:MODEL"))


@register_kind("timm", "file")
def timm_file(spec: EncoderSpec) -> Encoder:
    """``timm:MODEL@/path/file``: a plain timm state dict."""
    return _timm_weights(spec, spec.source, {"source": "local file"})


@register_kind("timm", "tag")
def timm_tag(spec: EncoderSpec) -> Encoder:
    """``timm:MODEL.TAG``: a timm pretrained tag, its weights from the Hugging Face cache."""
    import timm.models

    where = f"encoder {spec}"
    try:
        cfg = timm.models.get_pretrained_cfg(spec.model)
    except RuntimeError:  # an unknown tag of a known architecture
        cfg = None
    if cfg is None:
        arch = spec.model.split(".")[0]
        raise RegtokError(f"{where}: timm has no pretrained {spec.model!r}; {known_tags('timm', arch)}")
    if not cfg.hf_hub_id:
        raise RegtokError(f"{where}: timm has no Hugging Face weights for {spec.model!r}; pass a local weights "
                          f"file (timm:{spec.model}@/path/weights)")
    from regtok.pipeline.encoders.hub import safe_first

    repo, _, rev = cfg.hf_hub_id.partition("@")
    names = safe_first(cfg.hf_hub_filename) if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    return _timm_weights(spec, *_cached(spec, repo, names, f"timm:{cfg.architecture}", rev or None))


@register_kind("tvl", "file")
def tvl_file(spec: EncoderSpec) -> Encoder:
    """``tvl:MODEL@/path/ckpt.pth``: the ``tactile_encoder.*`` part of a TVL Stage-1 checkpoint."""
    with hashing(spec, spec.source) as digest:
        sd, info = _tvl_state_dict(spec)
        backbone, prep = _timm_backbone(spec, sd, tvl=True)
        return Encoder(spec, backbone, prep, digest.result(), info)


def _cached(spec: EncoderSpec, repo: str, names: list[str], local: str,
            revision: str | None = None) -> tuple[Path, dict]:
    """The first of ``names`` in the local Hugging Face cache of ``repo``, and what the manifest records of it."""
    from regtok.pipeline.encoders.hub import advice, cache_record, hub_file

    path = hub_file(repo, names, f"encoder {spec}", advice(local, repo), revision)
    return path, {"source": "Hugging Face cache", **cache_record(path)}


def _check_open_clip_tag(spec: EncoderSpec, pretrained: dict) -> None:
    """Fail fast, in one line, on a tag open_clip does not know or whose weights are not to be had."""
    import os

    from regtok.pipeline.encoders.hub import advice, hub_file, offline, safe_first

    if not pretrained:
        if Path(spec.source).is_file():  # open_clip takes a file path as its pretrained argument too
            return
        known = missing_tag(f"open_clip:{spec.model}", "open_clip", spec.model).split("; ", 1)[-1]
        raise RegtokError(f"encoder {spec}: no such tag or file {spec.source!r}; {known}")
    if pretrained.get("hf_hub"):
        repo, filename = os.path.split(pretrained["hf_hub"])  # 'org/name/' or 'org/name/file', as open_clip reads it
        names = safe_first(filename or "open_clip_pytorch_model.bin")
        hub_file(repo, names, f"encoder {spec}", advice(f"open_clip:{spec.model}", repo))
    elif pretrained.get("url") and offline():
        cached = Path("~/.cache/clip").expanduser() / os.path.basename(pretrained["url"])
        if not cached.is_file():
            raise RegtokError(f"encoder {spec}: {cached} is not there and HF_HUB_OFFLINE is set; pass a local weights "
                              f"file (open_clip:{spec.model}@/path/weights) or download {pretrained['url']}")


def _open_clip_weights(spec: EncoderSpec, path: str | Path, info: dict) -> Encoder:
    """A checkpoint file: only the visual tower is built (on the meta device, then assigned the weights)."""
    with hashing(spec, path) as digest:  # the imports overlap the hashing too
        from dataclasses import asdict

        import open_clip
        from open_clip.model import _build_vision_tower
        from open_clip.transform import PreprocessCfg

        cfg, preprocess = _open_clip_config(spec)
        sd = state_dict_of(read_checkpoint(str(path)), str(path))
        if any(k.startswith("visual.") for k in sd):
            sd = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
        visual = build_and_load(lambda: _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"],
                                                            cfg.get("quick_gelu", False)), sd, f"encoder {spec}")
        pp = {**asdict(PreprocessCfg()), **cfg.get("preprocess_cfg", {}), **preprocess, "size": visual.image_size}
        transform = open_clip.image_transform(pp["size"], is_train=False, mean=pp["mean"], std=pp["std"],
                                              resize_mode=pp["resize_mode"], interpolation=pp["interpolation"],
                                              fill_color=pp["fill_color"])
        return Encoder(spec, OpenClipVisual(visual), prep_from_transform(transform), digest.result(), info)


def _open_clip_config(spec: EncoderSpec) -> tuple[dict, dict]:
    """The model config and the preprocessing it overrides: built in, or a Hub model's open_clip_config.json."""
    import json

    import open_clip

    if spec.model.startswith("hf-hub:"):
        from regtok.pipeline.encoders.hub import hub_file

        repo = spec.model.removeprefix("hf-hub:")
        path = hub_file(repo, ["open_clip_config.json"], f"encoder {spec}", "")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
            return config["model_cfg"], config.get("preprocess_cfg", {})
        except (ValueError, KeyError, TypeError) as e:
            raise RegtokError(f"encoder {spec}: {path} is not an open_clip config ({e!r})") from None
    cfg = open_clip.get_model_config(spec.model)
    if cfg is None:
        raise RegtokError(f"encoder {spec}: unknown open_clip model {spec.model!r} (see open_clip.list_models())")
    return cfg, {}


def _timm_weights(spec: EncoderSpec, path: str | Path, info: dict) -> Encoder:
    """A timm model assigned a plain state dict read from ``path``."""
    with hashing(spec, path) as digest:
        backbone, prep = _timm_backbone(spec, state_dict_of(read_checkpoint(str(path)), str(path)))
        return Encoder(spec, backbone, prep, digest.result(), info)


def _timm_backbone(spec: EncoderSpec, sd: dict, tvl: bool = False) -> tuple[nn.Module, ImagePrep]:
    """The timm model ``spec`` names, built to fit ``sd`` (its classifier width) and assigned it."""
    import timm
    from timm.data import create_transform, resolve_data_config

    where = f"encoder {spec}"
    try:
        with torch.device("meta"):
            probe = timm.create_model(spec.model, pretrained=False)
    except RuntimeError as e:
        raise RegtokError(f"{where}: {e}") from None
    head = probe.pretrained_cfg.get("classifier", "head")
    head = head[0] if isinstance(head, (list, tuple)) else head
    num_classes = sd[f"{head}.weight"].shape[0] if f"{head}.weight" in sd else 0
    kwargs = {"global_pool": "avg"} if tvl else {}  # TVL builds its tactile ViT this way
    model = build_and_load(lambda: timm.create_model(spec.model, pretrained=False, num_classes=num_classes, **kwargs),
                           sd, where)
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    return TimmBackbone(model, use_head=tvl and num_classes > 0), prep_from_transform(transform)


def _tvl_state_dict(spec: EncoderSpec) -> tuple[dict, dict]:
    ckpt = read_checkpoint(spec.source, allow_namespace=True)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise RegtokError(f"encoder {spec}: not a TVL checkpoint (expected a dict with a 'model' state dict)")
    prefix = "tactile_encoder."
    sd = {k.removeprefix(prefix): v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not sd:
        tops = sorted({k.split(".")[0] for k in ckpt["model"]})[:8]
        raise RegtokError(f"encoder {spec}: no '{prefix}*' keys in the checkpoint's model (found: {', '.join(tops)})")
    args = ckpt.get("args")
    trained = getattr(args, "tactile_model", None)
    if trained is not None and trained != spec.model:
        raise RegtokError(f"encoder {spec}: the checkpoint was trained with tactile_model={trained!r}")
    epoch = ckpt.get("epoch")
    return sd, {"source": "TVL checkpoint", "epoch": int(epoch) if isinstance(epoch, int) else None}
