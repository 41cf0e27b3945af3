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
features ``(B, T, D_tok)``. Each kind registers one builder per form of spec (:mod:`pipeline.encoders.kinds`).
Weights load without running pickled code (see :mod:`pipeline.encoders.checkpoints`); Hub weights come from the local
Hugging Face cache (see :mod:`pipeline.encoders.hub`, which honours ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from regtok.errors import RegtokError
from regtok.pipeline.encoders.checkpoints import state_dict_sha256
from regtok.pipeline.encoders.images import ImagePrep, simple_prep
from regtok.pipeline.runtime.startup import gc_paused

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

    @property
    def form(self) -> str:
        """How the spec names its weights: ``seed`` (tiny), ``file``, ``hf-hub`` (open_clip) or ``tag``; a kind
        registers one builder per form (:mod:`pipeline.encoders.kinds`)."""
        if self.kind == "tiny":
            return "seed"
        if self.is_file:
            return "file"
        return "hf-hub" if self.model.startswith("hf-hub:") else "tag"

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
        raise RegtokError(missing_tag(text, *m.groups()))
    m = re.fullmatch(r"([a-z_]+):([^@]+)@(.+)", text)
    if m is None or m.group(1) not in KINDS[:3]:
        raise RegtokError(f"bad encoder spec {text!r}; expected {SPEC_HELP}")
    kind, model, source = m.groups()
    if kind != "open_clip" and not _looks_like_path(source):
        raise RegtokError(f"encoder spec {text!r}: {kind} weights must be a local file path")
    return EncoderSpec(kind, model.strip(), source.strip())


def absolute_spec(text: str) -> str:
    """``text`` (checked by :func:`parse_spec`) with a relative weights path made absolute; else as written."""
    spec = parse_spec(text)
    if not spec.is_file or Path(spec.source).is_absolute():
        return text
    return str(EncoderSpec(spec.kind, spec.model, str(Path(spec.source).absolute()), spec.seed))


def missing_tag(text: str, kind: str, model: str) -> str:
    """The error for a spec without weights: the tags the library knows for that model."""
    if kind == "open_clip":
        import open_clip

        if model not in open_clip.list_models():
            return f"encoder spec {text!r}: unknown open_clip model {model!r} (see open_clip.list_models())"
    return f"encoder spec {text!r} names no weights; {known_tags(kind, model)}"


def known_tags(kind: str, model: str) -> str:
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
    """Build the encoder a spec names, frozen, in eval mode, on ``device`` (by the builder its kind registers)."""
    from regtok.pipeline.encoders.kinds import builder_for

    spec = parse_spec(spec) if isinstance(spec, str) else spec
    with gc_paused():
        return builder_for(spec)(spec).to(device)


def _looks_like_path(source: str) -> bool:
    return "/" in source or "\\" in source or Path(source).suffix in (".pt", ".pth", ".bin", ".safetensors")
