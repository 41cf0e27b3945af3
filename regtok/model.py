"""The register-token model: one :class:`regtok.register.RegisterModule` per modality, joined by :class:`RegTok`,
with the losses of the loss type, the model's CCA start and the flow transport.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regtok.config import ModelConfig, from_dict, to_dict
from regtok.errors import RegtokError
from regtok.flow import VelocityNet, direction_index, euler_sample, logit_normal
from regtok.losses import (
    agreement_loss,
    flow_matching_loss,
    info_nce,
    mrl_info_nce,
    preservation_loss,
    total_loss,
    uniformity,
    variance_covariance,
)
from regtok.register import (  # noqa: F401 - importable from here as before
    RegisterModule,
    RegisterOutput,
    allowed_keeps,
    gaussian_like,
    mrl_prefixes,
    sample_keep,
)


class RegTok(nn.Module):
    """The two-modality model: a register module per modality, a logit scale, an optional flow head."""

    def __init__(self, cfg: ModelConfig, inputs: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        if len(inputs) != 2:
            raise RegtokError(f"RegTok aligns exactly two modalities, got {list(inputs)}")
        self.cfg = cfg
        self.inputs = {m: (int(t), int(d)) for m, (t, d) in inputs.items()}
        self.modalities: tuple[str, str] = tuple(inputs)  # type: ignore[assignment]
        self.encoders = nn.ModuleDict({m: RegisterModule(cfg, t, d) for m, (t, d) in self.inputs.items()})
        # Only the parameters the loss type uses exist, so every parameter gets a gradient (DDP requires it).
        if cfg.uses_contrastive:
            self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))  # 0-d: no decay
        self.flow = VelocityNet(cfg.embed_dim, cfg.flow_hidden_dim, cfg.flow_layers) if cfg.uses_flow else None

    @property
    def has_flow(self) -> bool:
        return self.cfg.uses_flow

    @torch.no_grad()
    def set_feature_stats(self, stats: dict[str, tuple[Tensor, Tensor]]) -> None:
        """Set each module's input standardisation from ``{modality: (mean (D_in,), std (D_in,))}``."""
        for m, (mean, std) in stats.items():
            enc = self.encoders[m]
            enc.feature_mean.copy_(mean.to(enc.feature_mean))
            enc.feature_std.copy_(std.to(enc.feature_std).clamp_min(1e-6))

    @torch.no_grad()
    def init_reads(self, features: dict[str, Tensor], seed: int, val_fraction: float = 0.2) -> dict[str, Any]:
        """Fit each module's read basis on training rows ``{modality: (N, D) or (N, T, D)}``; with read_init
        "cca", start the shared reads on the ρ^p-weighted canonical directions between the modalities (ridge, p
        and, unless ``shared_dim`` fixes it, how many directions the shared part holds, chosen on a validation part
        of the rows) and the private reads on principal components.

        Returns what was chosen, for the run's log. Call after :meth:`set_feature_stats`.
        """
        if not self.cfg.read_dim:
            return {}
        codes = {m: self.encoders[m].fit_read_basis(features[m]) for m in self.modalities}
        if self.cfg.read_init != "cca":
            return {"read_init": "random"}
        a, b = self.modalities
        from regtok.baselines import weighted_cca

        s, c_max = self.cfg.n_shared, self.encoders[a].shared_mask.shape[1]
        c_max = min(c_max, codes[a].shape[1] // s, codes[b].shape[1] // s)  # no more directions than the codes have
        widths = [self.cfg.shared_dim] if self.cfg.shared_dim else sorted({2**i for i in range(c_max.bit_length())
                                                                           if 2**i <= c_max} | {c_max})
        pa, pb, info = weighted_cca(codes[a], codes[b], s * max(widths), val_fraction, seed,
                                    counts=[s * c for c in widths])
        info["shared_dim"] = pa.shape[1] // s
        for m, p in ((a, pa), (b, pb)):
            scale = (codes[m] @ p).pow(2).mean().sqrt().clamp_min(1e-12)  # unit mean variance per channel
            self.encoders[m].init_reads(p / scale)
        return {"read_init": "cca", **info}

    @torch.no_grad()
    def fit_decoders(self, features: dict[str, Tensor], batch_size: int = 256) -> dict[str, list[float]]:
        """Fit each module's preservation decoder in closed form (:meth:`RegisterModule.fit_decoder`) on the rows
        ``{modality: (N, D) or (N, T, D)}``, as the model now encodes them; returns each residual share per prefix.

        The trainer calls it at the start (the decoder then starts where a linear readout of the start's
        registers ends) and on the weights it keeps, so their reconstruction is converged whichever epoch won.
        """
        was_training = self.training
        self.eval()
        out = {}
        for m in self.modalities:
            enc = self.encoders[m]
            x = features[m]
            device = enc.read_center.device if enc.read_width else enc.in_proj.weight.device
            batches = (x[i:i + batch_size].to(device) for i in range(0, len(x), batch_size))  # one at a time
            parts = [(enc.registers_of(b).float(), enc.read_code(b).float()) for b in batches]
            out[m] = enc.fit_decoder(torch.cat([r for r, _ in parts]), torch.cat([c for _, c in parts]))
        self.train(was_training)
        return out

    def logit_scale(self) -> Tensor:
        """exp of the learnable log-scale, clamped at cfg.max_logit_scale. ()."""
        return torch.clamp(self.log_logit_scale, max=math.log(self.cfg.max_logit_scale)).exp()

    def forward(self, batch: dict[str, Tensor], keep: int | Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, RegisterOutput]:
        """Encode both modalities. In training with keep None, one prefix length per sample serves both."""
        a = batch[self.modalities[0]]
        if keep is None and self.training:
            keep = sample_keep(a.shape[0], self.cfg.n_registers, self.cfg.nested_dropout_mode, generator, a.device)
        return {m: self.encoders[m](batch[m], keep=keep) for m in self.modalities}

    def losses(self, batch: dict[str, Tensor], generator: torch.Generator | None = None, rank: int = 0,
               world_size: int = 1) -> dict[str, Tensor]:
        """Every loss term (detached diagnostics included) and "loss", the total to backpropagate.

        ``batch`` is this rank's part of a global batch split over ``world_size`` ranks: the terms that compare
        samples gather the other ranks' embeddings, so the gradient DDP averages is the full batch's.
        """
        cfg = self.cfg
        a = batch[self.modalities[0]]
        # All randomness first (one eager call each under torch.compile), then one traceable computation.
        keep = None
        if self.training:
            keep = sample_keep(a.shape[0], cfg.n_registers, cfg.nested_dropout_mode, generator, a.device)
        dtype = self.encoders[self.modalities[0]].in_proj.weight.dtype
        t = logit_normal(2 * a.shape[0], generator, a.device, dtype) if cfg.uses_flow else None  # (2B,)
        inputs = batch
        if self.training and cfg.feature_noise > 0:  # augmentation in feature space; the targets stay clean
            inputs = {m: x + cfg.feature_noise * self.encoders[m].feature_std.to(x.dtype) * gaussian_like(x, generator)
                      for m, x in batch.items()}
        outs = self(inputs, keep=keep)
        oa, ob = (outs[m] for m in self.modalities)
        terms: dict[str, Tensor] = {}
        for m in self.modalities:
            terms[f"preservation/{m}"] = preservation_loss(outs[m].recon, self.encoders[m].as_tokens(batch[m]))
        terms["preservation"] = torch.stack([terms[f"preservation/{m}"] for m in self.modalities]).mean()
        if cfg.agreement_weight > 0:
            terms["agreement"] = agreement_loss(oa.registers[:, :cfg.n_shared], ob.registers[:, :cfg.n_shared], oa.keep)
        if cfg.uses_contrastive:
            terms.update(self._contrastive_terms(oa, ob, rank, world_size))
        if cfg.uses_flow:
            sa, sb = (oa.shared, ob.shared) if cfg.flow_encoder_grad else (oa.shared.detach(), ob.shared.detach())
            terms.update(flow_matching_loss(self.flow, sa, sb, generator, cfg.flow_stop_grad, t=t))
            vc = [variance_covariance(o.shared, world_size=world_size) for o in (oa, ob)]
            terms["variance"] = (vc[0]["variance"] + vc[1]["variance"]) / 2
            terms["covariance"] = (vc[0]["covariance"] + vc[1]["covariance"]) / 2
            terms["uniformity"] = (uniformity(oa.shared, world_size=world_size)
                                   + uniformity(ob.shared, world_size=world_size)) / 2
        terms["loss"] = total_loss(terms, cfg)
        return terms

    def _contrastive_terms(self, oa: RegisterOutput, ob: RegisterOutput, rank: int,
                           world_size: int) -> dict[str, Tensor]:
        """InfoNCE on the shared embeddings, or (mrl) its mean over every power-of-two shared prefix."""
        scale = self.logit_scale()
        if self.cfg.mrl:
            ea, eb = (self.encoders[m] for m in self.modalities)
            prefixes = {  # causal registers: prefix k of this one forward is the k-register encoding
                k: (ea.embed_shared(oa.registers, oa.keep.clamp(max=k)),
                    eb.embed_shared(ob.registers, ob.keep.clamp(max=k)))
                for k in mrl_prefixes(self.cfg.n_shared)
            }
            terms = mrl_info_nce(prefixes, scale, rank, world_size)
        else:
            terms = info_nce(oa.shared, ob.shared, scale, rank, world_size)
        return {**terms, "logit_scale": scale.detach()}

    @torch.no_grad()
    def transport(self, shared: Tensor, direction: str, steps: int) -> Tensor:
        """Carry shared embeddings (B, E) across modalities ("a_to_b" | "b_to_a") with ``steps`` Euler steps.

        Returns L2-normalised (B, E).
        """
        if self.flow is None:
            raise RegtokError(f"this model has no flow head (loss_type {self.cfg.loss_type!r})")
        x = euler_sample(self.flow, shared, direction_index(direction), steps)  # (B, E)
        return F.normalize(x, dim=-1)

    def spec(self) -> dict:
        """JSON-able description, enough to rebuild the model with :meth:`from_spec`."""
        return {"config": to_dict(self.cfg), "inputs": {m: list(s) for m, s in self.inputs.items()}}

    @classmethod
    def from_spec(cls, spec: dict) -> RegTok:
        """Rebuild a (randomly initialised) model from :meth:`spec`'s output; load weights separately."""
        try:
            cfg = from_dict(ModelConfig, spec["config"], where="model.")
            inputs = {m: (int(s[0]), int(s[1])) for m, s in spec["inputs"].items()}
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise RegtokError(f"invalid model spec: {e!r}") from None
        return cls(cfg, inputs)
