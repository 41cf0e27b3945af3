"""The extract stage's config: light to import (no torch), so the command line builds its options from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from regtok.errors import RegtokError


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that determines an extraction's output (paths resolved, encoders in pair order)."""

    shards: str
    out: str
    encoders: tuple[tuple[str, str], ...]  # ((modality, spec), ...) in pair order A, B, ...
    tokens: bool = False
    batch_size: int = 64
    workers: int | str = "auto"  # DataLoader workers decoding shards, or "auto" (see decode_workers)
    device: str = "auto"
    max_skip_fraction: float = 0.01
    # ((label, group), ...): which part of the representation should hold a label, "shared" or a modality's name
    # (recorded in the manifest's label schema; see pipeline/manifests/labels.py)
    label_groups: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        mods = [m for m, _ in self.encoders]
        if not mods or len(set(mods)) != len(mods):  # one is enough: touch-only query images (`regtok embed`)
            raise RegtokError(f"need one --encoder per modality, each modality once, got {mods or 'none'}")
        from regtok.pipeline.encoders import absolute_spec  # torch, imported only when a config is built

        # A weights file named relative to the working directory is recorded resolved, so that the manifest
        # (Embedder.from_run, rerun) finds it from anywhere.
        object.__setattr__(self, "encoders", tuple((m, absolute_spec(spec)) for m, spec in self.encoders))
        workers_ok = self.workers == "auto" or (isinstance(self.workers, int) and self.workers >= 0)
        if self.batch_size < 1 or not workers_ok or not 0 <= self.max_skip_fraction <= 1:
            raise RegtokError("batch size must be >= 1, workers auto or >= 0, max skip fraction in [0, 1]")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise RegtokError(f"device must be auto, cpu or cuda, got {self.device!r}")
        bad = [g for _, g in self.label_groups if g not in ("shared", *mods)]
        if bad:
            raise RegtokError(f"--label-group: the group must be shared or one of {', '.join(mods)}, got {bad[0]!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["encoders"] = {m: s for m, s in self.encoders}
        d["label_groups"] = dict(self.label_groups)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ExtractConfig:
        d = dict(d)
        enc = d.pop("encoders")
        groups = d.pop("label_groups", {})  # older manifests have none
        return cls(encoders=tuple(enc.items() if isinstance(enc, dict) else map(tuple, enc)),
                   label_groups=tuple(groups.items() if isinstance(groups, dict) else map(tuple, groups)), **d)
