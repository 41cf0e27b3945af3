"""Frozen image encoders named by specs, each with its own preprocessing.

Specs::

    open_clip:MODEL@TAG          an open_clip pretrained tag, loaded the way open_clip loads it
    open_clip:hf-hub:ORG/NAME    an open_clip model on the Hugging Face Hub (open_clip_config.json + weights)
    open_clip:MODEL@/path/file   a local open_clip checkpoint (full CLIP or visual-tower state dict)
    timm:MODEL.TAG               a timm pretrained tag (timm's ``arch.tag`` names), weights from the Hugging Face Hub
    timm:MODEL@/path/file        a timm state dict (.pth/.pt/.bin or .safetensors)
    tvl:MODEL@/path/ckpt.pth     a TVL Stage-1 checkpoint; MODEL is its timm tactile model
    tiny  or  tiny:SEED          a seeded random-init 1-block ViT for tests and the demo

Every encoder maps uint8 images ``(B, 3, H, W)`` to pooled features ``(B, D)`` and, on request, token
features ``(B, T, D_tok)``. Weights load without running pickled code (see :mod:`pipeline.checkpoints`);
Hub weights come from the local Hugging Face cache (see :mod:`pipeline.hub`, which honours ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import re
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from regtok.errors import RegtokError
from regtok.pipeline.checkpoints import (
    file_sha256_cached,
    has_only_persistent_buffers,
    load_strict,
    read_checkpoint,
    state_dict_of,
    state_dict_sha256,
)
from regtok.pipeline.images import ImagePrep, prep_from_transform, simple_prep
from regtok.pipeline.startup import gc_paused

KINDS = ("open_clip", "timm", "tvl", "tiny")
SPEC_HELP = ("open_clip:MODEL@TAG | open_clip:hf-hub:ORG/NAME | open_clip:MODEL@/path/weights | timm:MODEL.TAG | "
             "timm:MODEL@/path/weights.{pth,safetensors} | tvl:MODEL@/path/ckpt.pth | tiny[:SEED]")


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed encoder spec."""

    kind: str
    model: str
    source: str | None  # tag or path; None for tiny and for names that carry their weights (timm arch.tag, hf-hub:)
    seed: int = 0

    @property
    def is_file(self) -> bool:
        return self.source is not None and _looks_like_path(self.source)

    def __str__(self) -> str:
        if self.kind == "tiny":
            return f"tiny:{self.seed}"
        return f"{self.kind}:{self.model}" if self.source is None else f"{self.kind}:{self.model}@{self.source}"


def parse_spec(text: str) -> EncoderSpec:
    """Parse an encoder spec string (see the module docstring); RegtokError when malformed."""
    text = text.strip()
    m = re.fullmatch(r"tiny(?::(\d+))?", text)
    if m:
        return EncoderSpec("tiny", "tiny-vit", None, int(m.group(1) or 0))
    m = re.fullmatch(r"open_clip:(hf-hub:[\w.-]+/[\w.-]+)", text)
    if m:
        return EncoderSpec("open_clip", m.group(1), None)
    m = re.fullmatch(r"(open_clip|timm):([\w.-]+)", text)  # no '@': a timm arch.tag, else a missing tag
    if m:
        if m.group(1) == "timm" and "." in m.group(2):
            return EncoderSpec("timm", m.group(2), None)
        raise RegtokError(_missing_tag(text, *m.groups()))
    m = re.fullmatch(r"([a-z_]+):([^@]+)@(.+)", text)
    if m is None or m.group(1) not in KINDS[:3]:
        raise RegtokError(f"bad encoder spec {text!r}; expected {SPEC_HELP}")
    kind, model, source = m.groups()
    if kind != "open_clip" and not _looks_like_path(source):
        raise RegtokError(f"encoder spec {text!r}: {kind} weights must be a local file path")
    return EncoderSpec(kind, model.strip(), source.strip())


def _missing_tag(text: str, kind: str, model: str) -> str:
    """The error for a spec without weights: the tags the library knows for that model."""
    if kind == "open_clip":
        import open_clip

        if model not in open_clip.list_models():
            return f"encoder spec {text!r}: unknown open_clip model {model!r} (see open_clip.list_models())"
    return f"encoder spec {text!r} names no weights; {_known_tags(kind, model)}"


def _known_tags(kind: str, model: str) -> str:
    """The pretrained tags ``kind`` knows for ``model``, and how to name one or a local file instead."""
    if kind == "open_clip":
        import open_clip

        tags, use = open_clip.list_pretrained_tags_by_model(model), f"open_clip:{model}@TAG"
    else:
        import timm

        tags, use = [name.split(".", 1)[1] for name in timm.list_pretrained(f"{model}.*")], f"timm:{model}.TAG"
    known = f"{kind} knows these tags for {model}: {', '.join(tags)}" if tags else f"{kind} has no tags for {model}"
    return f"{known} (use {use}, or {kind}:{model}@/path/weights for a local file)"


class Encoder(nn.Module):
    """A frozen backbone plus its preprocessing, pooled dim, token shape and weights hash."""

    def __init__(self, spec: EncoderSpec, backbone: nn.Module, prep: ImagePrep, weights_sha256: str,
                 info: dict | None = None) -> None:
        super().__init__()
        self.spec, self.backbone, self.prep, self.weights_sha256 = spec, backbone.eval(), prep, weights_sha256
        self.info = dict(info or {})
        self.requires_grad_(False)
        self._dims: tuple[int, tuple[int, int] | None] | None = None  # learnt from the first forward
        self._dims_final = False  # whether the token shape is known too (a forward asked for tokens)

    @property
    def pooled_dim(self) -> int:
        """Width ``D`` of the pooled features."""
        return self._output_dims(tokens=False)[0]

    @property
    def token_shape(self) -> tuple[int, int] | None:
        """``(T, D_tok)`` of the token features, or None when the backbone exposes none."""
        return self._output_dims(tokens=True)[1]

    @property
    def provides_tokens(self) -> bool:
        """Whether token features are available (known without running the model)."""
        return bool(getattr(self.backbone, "has_tokens", True))

    def _output_dims(self, tokens: bool) -> tuple[int, tuple[int, int] | None]:
        """The output dims, from the first :meth:`encode` (with tokens when ``tokens``), else a one-image dry run."""
        if self._dims is None or (tokens and not self._dims_final and self.provides_tokens):
            with torch.inference_mode():
                device = next(self.backbone.parameters()).device
                pooled, tokens = self.backbone(torch.zeros(1, 3, *self.prep.size, device=device), True)  # (1, 3, H, W)
            self._remember_dims(pooled, tokens, True)
        return self._dims

    def _remember_dims(self, pooled: torch.Tensor, tokens: torch.Tensor | None, asked_tokens: bool) -> None:
        if not self._dims_final:
            self._dims = (pooled.shape[-1], tuple(tokens.shape[1:]) if tokens is not None else None)
            self._dims_final = asked_tokens

    def forward(self, x: torch.Tensor, tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised float images ``(B, 3, H, W)`` -> pooled ``(B, D)`` and tokens ``(B, T, Dt)`` or None."""
        return self.backbone(x, tokens)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 images ``(B, 3, H, W)`` -> float32 features on the encoder's device.

        Normalisation runs on the device; on CUDA the forward runs in bf16 autocast, on CPU in float32.
        """
        device = next(self.backbone.parameters()).device
        x = self.prep.normalize(images.to(device, non_blocking=True))  # (B, 3, H, W) float32
        probe = tokens or (not self._dims_final and self.provides_tokens)  # the first call also learns the token shape
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pooled, toks = self.backbone(x, probe)  # the tokens come with the same forward, at no extra cost
        self._remember_dims(pooled, toks, probe)
        return pooled.float(), (toks.float() if tokens and toks is not None else None)

    def describe(self) -> dict:
        """What a manifest records about this encoder."""
        return {"spec": str(self.spec), "pooled_dim": self.pooled_dim,
                "token_shape": list(self.token_shape) if self.token_shape else None,
                "weights_sha256": self.weights_sha256, "preprocess": self.prep.describe(), **self.info}


class OpenClipVisual(nn.Module):
    """An open_clip visual tower: pooled = its projected embedding; tokens = its patch tokens (width-d)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        self.has_tokens = hasattr(visual, "output_tokens")

    def forward(self, x: torch.Tensor, tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not (tokens and self.has_tokens):
            out = self.visual(x)
            return (out[0] if isinstance(out, tuple) else out), None  # (B, D)
        self.visual.output_tokens = True
        try:
            pooled, toks = self.visual(x)  # (B, D), (B, T, W)
        finally:
            self.visual.output_tokens = False
        return pooled, toks


class TimmBackbone(nn.Module):
    """A timm model: pooled = pre-logits features (or the head's output when ``use_head``); tokens = the
    final feature map without prefix (class/register) tokens."""

    def __init__(self, model: nn.Module, use_head: bool = False) -> None:
        super().__init__()
        self.model, self.use_head = model, use_head

    def forward(self, x: torch.Tensor, tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats = self.model.forward_features(x)  # (B, N, D) or (B, C, H, W)
        pooled = self.model.forward_head(feats, pre_logits=not self.use_head)  # (B, D)
        return pooled, (self.tokens(feats) if tokens else None)

    def tokens(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.ndim == 4:
            return feats.flatten(2).transpose(1, 2)  # (B, H*W, C)
        return feats[:, getattr(self.model, "num_prefix_tokens", 0):]  # (B, T, D)


class TinyBackbone(TimmBackbone):
    """A 1-block timm ViT whose pooled output is the mean over tokens of a wide random nonlinear feature map.

    Random-init deep ViTs pool to nearly constant vectors (DESIGN.md, "Measured"); a single block keeps the
    patch content in the tokens, and averaging ``gelu(W t + b)`` keeps far more of the token distribution than
    averaging ``t`` itself, which a linear map commutes with.
    """

    def __init__(self, model: nn.Module, width: int) -> None:
        super().__init__(model)
        dim = model.embed_dim
        self.features = nn.Linear(dim, width)

    def forward(self, x: torch.Tensor, tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        toks = self.tokens(self.model.forward_features(x))  # (B, T, D)
        pooled = nn.functional.gelu(self.features(toks)).mean(dim=1)  # (B, W)
        return pooled, (toks if tokens else None)


def tiny_encoder(seed: int = 0, image_size: int = 64) -> Encoder:
    """The ``tiny`` encoder: deterministic for a seed, independent of the global RNG state."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = VisionTransformer(img_size=image_size, patch_size=8, embed_dim=64, depth=1, num_heads=4,
                                class_token=False, global_pool="avg", num_classes=0)
        backbone = TinyBackbone(vit, width=512)
        nn.init.normal_(backbone.features.weight, std=2.0 / vit.embed_dim**0.5)
        nn.init.uniform_(backbone.features.bias, -1.0, 1.0)
    spec = EncoderSpec("tiny", "tiny-vit", None, seed)
    prep = simple_prep(image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return Encoder(spec, backbone, prep, state_dict_sha256(backbone))


def load_encoder(spec: str | EncoderSpec, device: str | torch.device = "cpu") -> Encoder:
    """Build the encoder a spec names, frozen, in eval mode, on ``device``."""
    from concurrent.futures import ThreadPoolExecutor

    spec = parse_spec(spec) if isinstance(spec, str) else spec
    with gc_paused():
        if spec.kind == "tiny":
            return tiny_encoder(spec.seed).to(device)
        if spec.kind == "open_clip" and spec.source is not None and not spec.is_file:
            return _open_clip_tag(spec).to(device)
        path, info = (spec.source, {"source": "local file"}) if spec.source is not None else _hub_weights(spec)
        if not Path(path).is_file():
            raise RegtokError(f"encoder {spec}: weights file not found: {path}")
        with ThreadPoolExecutor(1) as pool:  # hashing (GIL released) overlaps the imports and the model build
            digest = pool.submit(file_sha256_cached, path)
            build = _open_clip_file if spec.kind == "open_clip" else _timm_file
            enc = build(spec, digest, str(path), info)
        return enc.to(device)


def _hub_weights(spec: EncoderSpec) -> tuple[Path, dict]:
    """The cached weights file of a name that carries its weights (``hf-hub:ORG/NAME``, timm ``arch.tag``)."""
    from regtok.pipeline.hub import advice, cache_record, hub_file, safe_first

    where = f"encoder {spec}"
    if spec.kind == "open_clip":  # open_clip's own file names for a Hub model
        repo, revision, local = spec.model.removeprefix("hf-hub:"), None, "open_clip:MODEL"
        hub_file(repo, ["open_clip_config.json"], where, advice(local, repo))
        names = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    else:
        import timm.models

        try:
            cfg = timm.models.get_pretrained_cfg(spec.model)
        except RuntimeError:  # an unknown tag of a known architecture
            cfg = None
        if cfg is None:
            arch = spec.model.split(".")[0]
            raise RegtokError(f"{where}: timm has no pretrained {spec.model!r}; {_known_tags('timm', arch)}")
        if not cfg.hf_hub_id:
            raise RegtokError(f"{where}: timm has no Hugging Face weights for {spec.model!r}; pass a local weights "
                              f"file (timm:{spec.model}@/path/weights)")
        repo, _, rev = cfg.hf_hub_id.partition("@")
        revision, local = rev or None, f"timm:{cfg.architecture}"
        names = safe_first(cfg.hf_hub_filename) if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    path = hub_file(repo, names, where, advice(local, repo), revision)
    return path, {"source": "Hugging Face cache", **cache_record(path)}


def _open_clip_tag(spec: EncoderSpec) -> Encoder:
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


def _check_open_clip_tag(spec: EncoderSpec, pretrained: dict) -> None:
    """Fail fast, in one line, on a tag open_clip does not know or whose weights are not to be had."""
    import os

    from regtok.pipeline.hub import advice, hub_file, offline, safe_first

    if not pretrained:
        if Path(spec.source).is_file():  # open_clip takes a file path as its pretrained argument too
            return
        known = _missing_tag(f"open_clip:{spec.model}", "open_clip", spec.model).split("; ", 1)[-1]
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


def _open_clip_file(spec: EncoderSpec, digest: Future, path: str, info: dict) -> Encoder:
    """A checkpoint file: only the visual tower is built (on the meta device, then assigned the weights)."""
    from dataclasses import asdict

    import open_clip
    from open_clip.model import _build_vision_tower
    from open_clip.transform import PreprocessCfg

    cfg, preprocess = _open_clip_config(spec)
    sd = state_dict_of(read_checkpoint(path), path)
    if any(k.startswith("visual.") for k in sd):
        sd = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}

    def build() -> nn.Module:
        return _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg.get("quick_gelu", False))

    with torch.device("meta"):
        visual = build()
    if not has_only_persistent_buffers(visual):
        visual = build()
    load_strict(visual, sd, f"encoder {spec}", assign=True)
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
        from regtok.pipeline.hub import hub_file

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


def _timm_file(spec: EncoderSpec, digest: Future, path: str, info: dict) -> Encoder:
    """``timm:`` (a plain state dict) or ``tvl:`` (the ``tactile_encoder.*`` part of a TVL checkpoint)."""
    import timm
    from timm.data import create_transform, resolve_data_config


    where = f"encoder {spec}"
    if spec.kind == "tvl":
        sd, info = _tvl_state_dict(spec)
    else:
        sd = state_dict_of(read_checkpoint(path), path)
    try:
        with torch.device("meta"):
            probe = timm.create_model(spec.model, pretrained=False)
    except RuntimeError as e:
        raise RegtokError(f"{where}: {e}") from None
    head = probe.pretrained_cfg.get("classifier", "head")
    head = head[0] if isinstance(head, (list, tuple)) else head
    num_classes = sd[f"{head}.weight"].shape[0] if f"{head}.weight" in sd else 0
    kwargs = {"global_pool": "avg"} if spec.kind == "tvl" else {}  # TVL builds its tactile ViT this way

    def build() -> nn.Module:
        return timm.create_model(spec.model, pretrained=False, num_classes=num_classes, **kwargs)

    with torch.device("meta"):
        model = build()
    if not has_only_persistent_buffers(model):
        model = build()
    load_strict(model, sd, where, assign=True)
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    backbone = TimmBackbone(model, use_head=spec.kind == "tvl" and num_classes > 0)
    return Encoder(spec, backbone, prep_from_transform(transform), digest.result(), info)


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


def _looks_like_path(source: str) -> bool:
    return "/" in source or "\\" in source or Path(source).suffix in (".pt", ".pth", ".bin", ".safetensors")
