"""Configuration: frozen dataclasses with defaults in code, named presets, and their resolution from diffs.

Resolution order (later wins): dataclass defaults → preset → YAML file (only what differs) → CLI flags →
``key=value`` overrides; :mod:`pipeline.runtime.config_io` reads the file and the overrides. Unknown keys anywhere are
a :class:`RegtokError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from regtok.errors import RegtokError

T = TypeVar("T")

NESTED_DROPOUT_MODES = ("power_of_two", "uniform", "none")
READ_INITS = ("cca", "random")
LOSS_TYPES = ("contrastive", "flow_matching", "combined")


@dataclass(frozen=True)
class ModelConfig:
    """The register-token model (one module per modality, a shared embedding, optional flow head).

    Defaults are the hyper-parameters of the method regtok implements: FlexTok-style register tokens (Bachmann
    et al., "FlexTok: Resampling Images into 1D Token Sequences of Flexible Length", arXiv 2502.13967), aligned
    across two modalities.
    """

    n_registers: int = 32
    n_shared: int = 8
    n_layers: int = 4
    hidden_dim: int = 512
    n_heads: int = 8
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    embed_dim: int = 512  # width of the L2-normalised shared embedding
    # 0: registers stay hidden_dim wide. >0: each register is read out through a bottleneck of this width and
    # lifted back by a per-position map (FlexTok-style low-capacity tokens), so k registers carry k×register_dim
    # numbers and the prefix length matters; without it one register can hold as much as all of them.
    register_dim: int = 0
    # Each register's initial state is its learned token plus its own linear read of the whole flattened input
    # (standardised, reduced by a PCA of the training split to read_dim): a position-specific map, which
    # attention pooling alone cannot express (docs/learning.md). 0 turns the read off (registers start as
    # learned tokens and see the features through attention only).
    read_dim: int = 512
    # "cca": the trainer initialises the shared registers' reads with the canonical directions of a ridge CCA
    # between the two modalities and the private ones with the leading principal components (the module then
    # starts where the linear baseline ends); "random": Gaussian reads.
    read_init: str = "cca"
    # Each shared register is read out through a bottleneck (the narrower shared stream) that starts on its own
    # block of canonical directions, so what the registers take in through attention beyond those directions does
    # not reach the shared part (docs/learning.md, the split). shared_dim is that width per register: 0 chooses it
    # at the start, as the number of directions that retrieve best on a validation part of the training rows (at
    # most min(hidden_dim, embed_dim) // n_shared); > 0 fixes it.
    shared_dim: int = 0
    # False: the shared registers attend to no feature token, so they hold a function of their reads (the canonical
    # directions) alone; attention over the features hands every register the whole input, what is specific to a
    # modality included (docs/learning.md, the split). True: every register attends to the features.
    shared_sees_features: bool = True
    # Weight of the agreement term: the mean squared difference between the two modalities' kept shared
    # registers, relative to their energy. Anything one modality's shared part holds that the other's does not
    # (what is specific to it) costs here; the alignment terms keep the registers apart across samples.
    agreement_weight: float = 0.0
    # Training-time Gaussian noise on the cached features, in units of each dimension's std (0: off); the
    # preservation target stays the clean feature.
    feature_noise: float = 0.0
    nested_dropout_mode: str = "power_of_two"
    loss_type: str = "contrastive"
    preservation_weight: float = 0.5
    # True: the preservation loss also moves the shared registers (it then pulls them towards what is specific
    # to each modality); False: the decoder reads them detached, so only the alignment terms shape them.
    preservation_through_shared: bool = False
    flow_weight: float = 0.5
    flow_hidden_dim: int = 512
    flow_layers: int = 3
    flow_stop_grad: bool = True  # detach the flow's endpoint: each encoder is trained only as a transport source
    # False: the flow loss trains the velocity head only; the encoders learn from the other terms
    flow_encoder_grad: bool = True
    # Anti-collapse terms on the shared embeddings (flow losses). VICReg's per-dimension variance hinge asks every
    # direction to be as spread as the strongest and so amplifies the weak canonical directions the reads start
    # with; the uniformity term (Wang & Isola) keeps the embeddings apart without that (docs/learning.md).
    flow_var_weight: float = 0.0
    flow_cov_weight: float = 0.0
    flow_uniformity_weight: float = 0.5
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    mrl: bool = False  # sum the contrastive loss over every power-of-two prefix

    def __post_init__(self) -> None:
        check_values(self, MODEL_RULES)
        if self.nested_dropout_mode not in NESTED_DROPOUT_MODES:
            raise RegtokError(
                f"nested_dropout_mode must be one of {NESTED_DROPOUT_MODES}, got {self.nested_dropout_mode!r}"
            )
        if self.loss_type not in LOSS_TYPES:
            raise RegtokError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not 0 < self.n_shared <= self.n_registers:
            raise RegtokError(f"need 0 < n_shared <= n_registers, got {self.n_shared} and {self.n_registers}")
        if self.read_init not in READ_INITS:
            raise RegtokError(f"read_init must be one of {READ_INITS}, got {self.read_init!r}")
        if self.read_dim < 0:
            raise RegtokError(f"read_dim must be >= 0 (0 = no linear read), got {self.read_dim}")
        if self.shared_dim * self.n_shared > min(self.hidden_dim, self.embed_dim):
            raise RegtokError(f"n_shared × shared_dim ({self.n_shared} × {self.shared_dim}) must fit in hidden_dim and "
                              f"embed_dim ({min(self.hidden_dim, self.embed_dim)})")
        if min(self.hidden_dim, self.embed_dim) < self.n_shared:
            raise RegtokError(f"hidden_dim and embed_dim must be at least n_shared ({self.n_shared})")
        if self.register_dim < 0:
            raise RegtokError(f"register_dim must be >= 0 (0 = no bottleneck), got {self.register_dim}")
        if self.hidden_dim % self.n_heads:
            raise RegtokError(f"hidden_dim ({self.hidden_dim}) must be divisible by n_heads ({self.n_heads})")

    # Which terms the loss type has: decided here once; the model, the losses and the trainer ask these.
    @property
    def uses_contrastive(self) -> bool:
        """The loss has the InfoNCE term (and the model a learnable logit scale)."""
        return self.loss_type in ("contrastive", "combined")

    @property
    def uses_flow(self) -> bool:
        """The loss has the flow-matching and anti-collapse terms (and the model a velocity head)."""
        return self.loss_type in ("flow_matching", "combined")

    @property
    def flow_scale(self) -> float:
        """The flow terms' factor in the total: ``flow_weight`` beside the contrastive term, 1 on their own."""
        return self.flow_weight if self.uses_contrastive else 1.0

    @property
    def scored_by_transport(self) -> bool:
        """A run without a contrastive term is scored by retrieval after the flow's transport."""
        return self.uses_flow and not self.uses_contrastive


@dataclass(frozen=True)
class TrainConfig:
    """One training run on a cached feature store."""

    model: ModelConfig = field(default_factory=ModelConfig)
    feature_kind: str = "auto"  # "pooled", "tokens", or "auto" (tokens when the store has them, else pooled)
    epochs: int = 20
    batch_size: int = 256
    lr: float = 5e-4
    min_lr_ratio: float = 0.01  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0
    seed: int = 0  # initialisation, batch order, nested dropout
    # The train/validation split's own seed: sweeping ``seed`` keeps the same validation rows, so trials differ
    # only in what they learned. Runs recorded before this key split with ``seed`` (see :func:`from_saved`).
    split_seed: int = 0
    val_fraction: float = 0.1
    log_every: int = 10  # steps between metrics.jsonl lines
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: only at the end of each epoch)
    device: str = "auto"
    compile: bool = False
    max_memory_fraction: float = 0.5  # of free device memory the in-memory store may take before streaming
    # Keep the weights of the epoch with the best validation score as best.safetensors; eval and the API load
    # them. The last state stays in checkpoint.safetensors for --resume.
    keep_best: bool = True
    init_max_rows: int = 20_000  # training rows (a seeded subset) the read basis and CCA start are fitted on

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise RegtokError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise RegtokError(f"batch_size must be at least 1, got {self.batch_size}")
        check_values(self, TRAIN_RULES)
        if self.feature_kind not in FEATURE_KINDS:
            raise RegtokError(f"feature_kind must be one of {FEATURE_KINDS}, got {self.feature_kind!r}")


@dataclass(frozen=True)
class EvalConfig:
    """What `regtok eval` measures. Prefixes above n_registers are dropped; retrieval uses those <= n_shared."""

    prefixes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    flow_steps: tuple[int, ...] = (1, 4, 16)
    probe_test_fraction: float = 0.3  # held-out part of the evaluated split that probes are scored on
    probe_val_fraction: float = 0.25  # of the train part, to choose the ridge penalty
    probe_max_samples: int = 10_000  # probes use a seeded subset of this many rows (0: all)
    seed: int = 0
    chunk_size: int = 4096  # retrieval queries per GEMM
    batch_size: int = 512  # samples per model forward
    device: str = "auto"
    baselines: bool = True  # fit the baselines (CCA, weighted CCA, start, linear and MLP heads) on the training rows
    baseline_max_rows: int = 20_000  # training rows (a seeded subset) the baselines are fitted on

    def __post_init__(self) -> None:
        if not self.prefixes or min(self.prefixes) < 1:
            raise RegtokError(f"prefixes must be positive integers, got {self.prefixes}")
        if any(s < 1 for s in self.flow_steps):
            raise RegtokError(f"flow steps must be positive integers, got {self.flow_steps}")
        check_values(self, EVAL_RULES)


# What each numeric field must be (the optimizer, the schedule and the model refuse or misbehave otherwise):
# checked when a config is built, so a bad value is one line before any work, in train, eval and every sweep trial.
RULES = {
    ">0": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ">=0": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ">=1": (lambda v: v >= 1, "at least 1"),
    ">=2": (lambda v: v >= 2, "at least 2"),
    "[0,1)": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "(0,1)": (lambda v: 0 < v < 1, "in (0, 1)"),
    "[0,1]": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}
MODEL_RULES = {"n_registers": ">=1", "n_layers": ">=0", "hidden_dim": ">0", "n_heads": ">0", "mlp_ratio": ">0",
               "embed_dim": ">0", "feature_noise": ">=0", "preservation_weight": ">=0",
               "flow_weight": ">=0", "flow_hidden_dim": ">0", "flow_layers": ">=0", "flow_var_weight": ">=0",
               "flow_cov_weight": ">=0", "flow_uniformity_weight": ">=0", "init_temperature": ">0",
               "max_logit_scale": ">0", "agreement_weight": ">=0", "shared_dim": ">=0"}
TRAIN_RULES = {"lr": ">0", "min_lr_ratio": ">=0", "warmup_steps": ">=0", "weight_decay": ">=0", "beta1": "[0,1)",
               "beta2": "[0,1)", "grad_clip": ">=0", "val_fraction": "[0,1)", "log_every": ">=1",
               "checkpoint_every": ">=0", "max_memory_fraction": "[0,1]", "init_max_rows": ">=2"}
EVAL_RULES = {"probe_test_fraction": "(0,1)", "probe_val_fraction": "(0,1)", "probe_max_samples": ">=0",
              "chunk_size": ">=1", "batch_size": ">=1", "baseline_max_rows": ">=2"}
FEATURE_KINDS = ("auto", "pooled", "tokens")


def check_values(cfg: Any, rules: dict[str, str]) -> None:
    """RegtokError naming the first field of ``cfg`` whose value breaks its rule in ``rules``."""
    for name, rule in rules.items():
        value = getattr(cfg, name)
        ok, text = RULES[rule]
        if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
            raise RegtokError(f"{name} must be {text}, got {value!r}")


PRESETS: dict[str, dict[str, Any]] = {
    # The method's hyper-parameters (FlexTok-style register tokens, arXiv 2502.13967): the dataclass defaults.
    "default": {},
    # Small enough for unit tests and the CPU demo; same code paths.
    "tiny": {
        # Measured in docs/learning.md: no register bottleneck (register_dim 0) and a 256-wide stream, so the two
        # shared registers hold 256 canonical directions; one block refines them.
        "model": {
            "n_registers": 8,
            "n_shared": 2,
            "n_layers": 1,
            "hidden_dim": 256,
            "n_heads": 4,
            "mlp_ratio": 2.0,
            "embed_dim": 256,
            "flow_hidden_dim": 128,
            "flow_layers": 2,
            "init_temperature": 0.2,  # a softer start overfits the 1,800 training pairs less than 0.07
        },
        "batch_size": 64,
        "epochs": 5,
        "warmup_steps": 10,
        "lr": 3e-4,
    },
}


# Keys that older runs recorded and this version ignores when reading them (testing aids that left the config).
RETIRED_KEYS: dict[str, tuple[str, ...]] = {"TrainConfig": ("nan_at_step",),
                                            "ModelConfig": ("decoder_layers",)}  # the decoder is now fitted


def from_saved(data: dict[str, Any]) -> dict[str, Any]:
    """A ``TrainConfig`` dict as a run recorded it (``config.json``, a manifest), in this version's keys.

    Runs recorded before ``split_seed`` existed drew their train/validation split with ``seed``; they keep
    exactly those rows (for eval's baselines, ``--resume`` and ``regtok rerun``).
    """
    if "split_seed" in data:
        return data
    return {**data, "split_seed": data.get("seed", TrainConfig.seed)}


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, JSON-serialisable dict of a (nested) config dataclass."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build ``cls`` from a (partial) nested dict; unknown keys are an error that names them."""
    data = {k: v for k, v in (data or {}).items() if k not in RETIRED_KEYS.get(cls.__name__, ())}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RegtokError(f"unknown config key '{where}{unknown[0]}'{_did_you_mean(cls, unknown[0], where)}; "
                          f"allowed: {', '.join(sorted(names))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise RegtokError(f"config key {where}{name!r} must be a mapping, got {value!r}")
            kwargs[name] = from_dict(tp, value, where=f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{where}{name}")
    return cls(**kwargs)


def _did_you_mean(cls: type, key: str, where: str) -> str:
    """"; did you mean model.n_shared?" for a key that belongs one level down (or is a near miss), else ""."""
    import difflib

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and key in {g.name for g in dataclasses.fields(tp)}:
            return f" (did you mean {where}{f.name}.{key}?)"
    close = difflib.get_close_matches(key, [f.name for f in dataclasses.fields(cls)], n=1)
    return f" (did you mean {where}{close[0]}?)" if close else ""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"n_shared": 4}, "lr": 1e-3} → {"model.n_shared": 4, "lr": 1e-3}: a nested config's dotted keys."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """{"model.n_shared": 4, "lr": 1e-3} → {"model": {"n_shared": 4}, "lr": 1e-3}: the inverse of :func:`flatten`."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def merge(cfg: T, diff: dict[str, Any] | None) -> T:
    """Apply a nested dict of changes to a config (unknown keys are an error)."""
    base = to_dict(cfg)
    _deep_update(base, diff or {})
    return from_dict(type(cfg), base)


def resolve(cls: type[T], preset: str | None = None, *diffs: dict[str, Any] | None) -> T:
    """Defaults → preset → each diff in order. Returns the frozen config."""
    cfg = cls()
    if preset is not None:
        if preset not in PRESETS:
            raise RegtokError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        cfg = merge(cfg, PRESETS[preset])
    for diff in diffs:
        cfg = merge(cfg, diff)
    return cfg


def closest_preset(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The named preset a resolved (nested) config dict differs least from, and those differences (dotted keys)."""
    flat, best = flatten(cfg), None
    for name in PRESETS:
        base = flatten(to_dict(resolve(TrainConfig, name)))
        diff = {k: v for k, v in flat.items() if base.get(k) != v}
        if best is None or len(diff) < len(best[1]):
            best = (name, diff)
    return best if best is not None else ("?", {})


def _deep_update(base: dict[str, Any], diff: dict[str, Any]) -> None:
    for key, value in diff.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")  # 1e-3, 5E-4, 1E3, .5 (YAML 1.1 reads them as text)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check/convert a scalar to the annotated type (int→float and a number written as text→float are allowed,
    bool↔int is not)."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, bool) != (tp is bool) or not isinstance(value, tp):
            raise RegtokError(f"config key {name!r} must be {tp.__name__}, got {value!r}")
    return value
