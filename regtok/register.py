"""One modality's register module: register tokens over cached encoder features, its reads and its heads.

A module projects the cached feature tokens to ``hidden_dim``, appends ``n_registers`` learned register tokens,
each plus its own linear read of the whole flattened input (a position-specific map that attention pooling
cannot express; the trainer starts it on the training split's CCA directions, see ``RegTok.init_reads``),
and runs pre-norm transformer blocks under a prefix-causal mask (features see features; register i sees the
features and registers 0..i). Registers [0:n_shared] are shared (aligned across modalities, read out through the
narrower shared stream when ``shared_dim`` is set), the rest private (with the shared ones, the preservation
decoder reconstructs the module's input from them). Nested dropout keeps a per-sample prefix of k registers and
replaces the rest by their positions' mask tokens; because registers are causal, masking after the transformer
equals encoding with k registers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regtok.blocks import Block, prefix_causal_mask
from regtok.config import ModelConfig
from regtok.decoder import PreservationDecoder, fit_coarse_to_fine
from regtok.errors import RegtokError
from regtok.reduce import TOKEN_DIM, Mapped, Reducer, chunks


@dataclass
class RegisterOutput:
    """What one modality's module returns."""

    registers: Tensor  # (B, R, d) register outputs, slots >= keep replaced by the mask token
    keep: Tensor  # (B,) long, number of kept registers per sample
    shared: Tensor  # (B, E) L2-normalised shared embedding (masked mean over min(keep, n_shared) shared regs)
    recon: Tensor  # (B, T, D_in) reconstruction of the module's input tokens (T = 1 for pooled)


def allowed_keeps(n_registers: int, mode: str) -> list[int]:
    """Prefix lengths nested dropout can draw: powers of two up to R (and R itself), 1..R, or just R."""
    if mode == "power_of_two":
        keeps = [2**i for i in range(n_registers.bit_length()) if 2**i <= n_registers]
        return keeps if keeps[-1] == n_registers else [*keeps, n_registers]
    if mode == "uniform":
        return list(range(1, n_registers + 1))
    if mode == "none":
        return [n_registers]
    raise RegtokError(f"unknown nested_dropout_mode {mode!r}")


@torch.compiler.disable  # generator draws do not trace; one eager call instead of a break in the middle
def sample_keep(
    batch: int, n_registers: int, mode: str, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Per-sample prefix lengths (B,) long, uniform over :func:`allowed_keeps`, drawn from ``generator``."""
    choices = torch.tensor(allowed_keeps(n_registers, mode), dtype=torch.long)  # (C,)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    idx = torch.randint(len(choices), (batch,), generator=generator, device=gen_device).cpu()  # (B,)
    return choices[idx].to(device)


@torch.compiler.disable  # generator draws do not trace
def gaussian_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise of ``x``'s shape, dtype and device, drawn from ``generator``."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)


def mrl_prefixes(n_shared: int) -> list[int]:
    """The shared-prefix lengths the MRL contrastive mode sums over: powers of two up to n_shared, and n_shared."""
    return allowed_keeps(n_shared, "power_of_two")


class RegisterModule(nn.Module):
    """Register tokens over one modality's cached features (pooled (B, D_in) or tokens (B, T, D_in))."""

    def __init__(self, cfg: ModelConfig, n_tokens: int, d_in: int) -> None:
        super().__init__()
        self.cfg, self.n_tokens, self.d_in = cfg, n_tokens, d_in
        d, r = cfg.hidden_dim, cfg.n_registers
        self.in_proj = nn.Linear(d_in, d)
        self.pos_embed = nn.Parameter(torch.empty(n_tokens, d))
        self.register_tokens = nn.Parameter(torch.empty(r, d))
        for p in (self.pos_embed, self.register_tokens):
            nn.init.trunc_normal_(p, std=0.02)
        # What a masked slot holds, one per position: that register's mean state (set by fit_decoder), so a masked
        # register adds its mean contribution to the decoder's sum and nothing to the shared embedding.
        self.register_buffer("mask_token", torch.zeros(r, d))
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.n_layers))
        for block in self.blocks:  # residual branches start small: the blocks refine the reads, not replace them
            for lin in (block.attn.proj, block.mlp.fc2):
                nn.init.normal_(lin.weight, std=1e-3)
                nn.init.zeros_(lin.bias)
        # No final norm on the registers: a per-register LayerNorm would equalise registers whose reads carry
        # canonical directions of different strength before the shared mean (docs/learning.md).
        # Tokens wider than TOKEN_DIM are reduced each (one PCA for every position) before the read flattens them:
        # at ViT-L-14's 257 × 1024 the read is (257·64 × K), not (263,168 × K) (regtok/reduce.py).
        self.token_width = TOKEN_DIM if n_tokens > 1 and d_in > TOKEN_DIM and cfg.read_dim else d_in
        self.read_width = min(cfg.read_dim, n_tokens * self.token_width)
        if self.token_width < d_in:
            self.register_buffer("token_basis", torch.eye(d_in, self.token_width))  # (D_in, r), set by the fit
        if self.read_width:
            # (T·r, K) projection of the flattened (token-reduced) standardised input: a PCA of the training split
            # scaled to unit mean variance (set by fit_read_basis; identity columns until then), saved with it.
            self.register_buffer("read_basis", torch.eye(n_tokens * self.token_width, self.read_width))
            self.register_buffer("read_center", torch.zeros(self.read_width))  # (K,) mean code of the training rows
            self.read_weight = nn.Parameter(torch.randn(r, self.read_width, d) * self.read_width**-0.5)  # (R, K, d)
        if cfg.register_dim:
            self.down = nn.Parameter(torch.empty(r, d, cfg.register_dim))  # one read-out per register position
            nn.init.normal_(self.down, std=d**-0.5)
            self.up = nn.Parameter(torch.empty(r, cfg.register_dim, d))  # one lift per register position
            nn.init.normal_(self.up, std=cfg.register_dim**-0.5)
            self.up_bias = nn.Parameter(torch.zeros(r, d))
        # The narrower shared stream: one read-out and lift per shared register, at most c_max wide; the mask keeps
        # the width the start chose (cfg.shared_dim, or the validated number of canonical directions).
        s, c_max = cfg.n_shared, min(d, cfg.embed_dim) // cfg.n_shared
        self.shared_down = nn.Parameter(torch.randn(s, d, c_max) * d**-0.5)  # (S, d, c_max)
        self.shared_up = nn.Parameter(torch.randn(s, c_max, d) * c_max**-0.5)  # (S, c_max, d)
        self.shared_up_bias = nn.Parameter(torch.zeros(s, d))
        self.register_buffer("shared_mask", (torch.arange(c_max) < (cfg.shared_dim or c_max)).float().expand(s, -1)
                             .clone())  # (S, c_max)
        self.shared_proj = nn.Linear(d, cfg.embed_dim)
        self.decoder = PreservationDecoder(cfg, n_tokens, self.token_width, self.read_width)
        # Per-dimension standardisation of the cached features, set from the training split by the trainer
        # (RegTok.set_feature_stats) and saved with the weights. Frozen encoders' features share a large common
        # direction (mean cosine 0.8-0.99 between random samples of random-init encoders): without this the
        # input projection sees nearly one vector and the cosine preservation target is trivially met.
        self.register_buffer("feature_mean", torch.zeros(d_in))
        self.register_buffer("feature_std", torch.ones(d_in))
        # Built once for this (n_tokens, n_registers); moves with .to(device); not part of the checkpoint.
        blind = 0 if cfg.shared_sees_features else cfg.n_shared
        self.register_buffer("attn_mask", prefix_causal_mask(n_tokens, r, blind=blind), persistent=False)

    def as_tokens(self, x: Tensor) -> Tensor:
        """(B, D_in) or (B, T, D_in) → standardised (B, T, D_in) in the module's dtype; shape-checked.

        This is both what the transformer reads and the preservation decoder's target.
        """
        x = x.unsqueeze(1) if x.dim() == 2 else x
        if tuple(x.shape[1:]) != (self.n_tokens, self.d_in):
            raise RegtokError(f"expected input of shape (B, {self.n_tokens}, {self.d_in}), got {tuple(x.shape)}")
        x = x.to(self.in_proj.weight.dtype)
        return (x - self.feature_mean.to(x.dtype)) / self.feature_std.to(x.dtype)  # (B, T, D_in)

    def encode(self, x: Tensor, n_registers: int | None = None) -> Tensor:
        """The transformer over [tokens; first n registers] (default all): (B, T + n, d), the residual stream."""
        x = self.as_tokens(x)  # (B, T, D_in)
        n = self.cfg.n_registers if n_registers is None else n_registers
        b, t = x.shape[0], self.n_tokens
        tokens = self.in_proj(x) + self.pos_embed  # (B, T, d)
        regs = self.register_tokens[:n].unsqueeze(0).expand(b, -1, -1)  # (B, n, d)
        if self.read_width:
            z = self.reduce(x) @ self.read_basis.to(x.dtype) - self.read_center.to(x.dtype)  # (B, K), centred
            regs = regs + torch.einsum("bk,nkd->bnd", z, self.read_weight[:n])  # (B, n, d): register i's own read
        h = torch.cat([tokens, regs], dim=1)  # (B, T+n, d)
        mask = self.attn_mask[: t + n, : t + n]  # (T+n, T+n)
        for block in self.blocks:
            h = block(h, mask)  # (B, T+n, d)
        return h

    def reduce(self, x: Tensor) -> Tensor:
        """Standardised tokens (B, T, D_in) → the flattened input the read sees (B, T·r): each token through the
        token PCA first when the tokens are wider than TOKEN_DIM."""
        if self.token_width < self.d_in:
            x = x @ self.token_basis.to(x.dtype)  # (B, T, r)
        return x.reshape(len(x), -1)

    @torch.no_grad()
    def fit_read_basis(self, x: Any) -> Tensor:
        """Set the read to a PCA of the rows ``x`` (anything that slices into (b, …) rows), each flattened dimension
        standardised; returns their codes (N, K).

        This is the baselines' own preprocessing (:class:`regtok.reduce.Reducer`, fitted on at most FIT_ROWS rows,
        chunk by chunk), folded into ``z = reduce(x) @ read_basis - read_center`` and scaled so that the codes have
        unit mean variance. The rows are the caller's choice (a seeded subset of the training split).
        """
        device = self.read_basis.device
        tokens = Mapped(x, lambda c: self.as_tokens(c.to(device)).cpu())  # chunks are float32 (reduce.as_tensor)
        red, reduced = Reducer.fit_transform(tokens, self.read_width, token_dim=self.token_width)
        if red.token_basis is not None:
            self.token_basis.copy_(red.token_basis.to(self.token_basis))
        f = len(red.mean)
        comps = red.components if red.components is not None else torch.eye(f, dtype=torch.float64)
        basis = torch.zeros(f, self.read_width, dtype=torch.float64)
        basis[:, : comps.shape[1]] = comps / red.std[:, None]  # (F, K); k <= K columns when N is small
        codes = torch.zeros(len(x), self.read_width, dtype=torch.float64)
        codes[:, : comps.shape[1]] = reduced.double() if red.components is not None else \
            torch.cat([(red.flatten(c) - red.mean) / red.std for c in chunks(tokens)])  # (N, K), centred
        center = red.mean @ basis  # (K,)
        scale = codes.pow(2).mean().sqrt().clamp_min(1e-12)
        self.read_basis.copy_((basis / scale).to(self.read_basis))
        self.read_center.copy_((center / scale).to(self.read_center))
        # The decoder's way back: flat = mean + (code @ read_basisᵀ) · std² · scale² inverts the read on its span.
        self.decoder.decode_mean.copy_(red.mean.to(self.decoder.decode_mean))
        self.decoder.decode_scale.copy_((red.std.pow(2) * scale.pow(2)).to(self.decoder.decode_scale))
        return (codes / scale).float()

    @torch.no_grad()
    def init_reads(self, shared_dirs: Tensor | None) -> None:
        """Shared registers read ``shared_dirs`` (K, C) in disjoint channel blocks, strongest first; private
        registers read consecutive blocks of d principal components (those past the K-th keep their random read).

        Register i < n_shared gets directions [i·c, (i+1)·c) into channels [i·c, (i+1)·c), c = C // n_shared, and
        its bottleneck passes exactly those c channels (the rest of its width is masked off), so the mean over a
        k-prefix holds the k·c strongest directions and a longer prefix only adds weaker ones.
        """
        r, k, d = self.read_weight.shape
        s = self.cfg.n_shared
        w = self.read_weight
        if shared_dirs is not None:
            self.register_tokens[:s].zero_()  # no constant offset: the shared embedding starts as the CCA one
            e = self.shared_proj.weight.shape[0]  # the projection starts as the identity on the first e channels
            self.shared_proj.weight.copy_(torch.eye(e, d, dtype=w.dtype))
            self.shared_proj.bias.zero_()
            c = max(1, shared_dirs.shape[1] // s)
            self.shared_mask.copy_((torch.arange(self.shared_mask.shape[1]) < c).float().expand(s, -1))
            for i in range(s):
                block = shared_dirs[:, i * c:(i + 1) * c]  # (K, ≤c)
                w[i].zero_()
                w[i, :, i * c: i * c + block.shape[1]] = block.to(w)
                self.shared_down[i].zero_()  # the bottleneck passes the register's own channel block, nothing else
                self.shared_down[i, i * c:(i + 1) * c, :c] = torch.eye(c, dtype=w.dtype)
                self.shared_up[i].zero_()
                self.shared_up[i, :c, i * c:(i + 1) * c] = torch.eye(c, dtype=w.dtype)
                self.shared_up_bias[i].zero_()
        for j, i in enumerate(range(s, r)):
            lo = j * d
            if lo >= k:
                break
            w[i].zero_()
            w[i, lo: min(k, lo + d), : min(k, lo + d) - lo] = torch.eye(min(k, lo + d) - lo, dtype=w.dtype)
            self.register_tokens[i].zero_()  # no constant offset: the register is exactly its components

    @torch.no_grad()
    def fit_decoder(self, registers: Tensor, codes: Tensor) -> list[float]:
        """Fit the decoder in closed form, coarse to fine, on register states (N, R, d) and the read codes (N, K)
        of the same rows (:func:`regtok.decoder.fit_coarse_to_fine`); each position's mask token becomes that
        register's mean state. Returns the held-out residual share after each register (1 − R² per prefix)."""
        weight, bias, mean, left = fit_coarse_to_fine(registers, codes)
        self.decoder.weight.copy_(weight.to(self.decoder.weight))
        self.decoder.bias.copy_(bias.to(self.decoder.bias))
        self.mask_token.copy_(mean.to(self.mask_token))
        return left

    def readout(self, h: Tensor) -> Tensor:
        """Register states from :meth:`encode`'s output (B, T + n, d) → (B, n, d): every register through its
        ``register_dim`` bottleneck if any, then the shared ones through the narrower shared stream."""
        regs = h[:, self.n_tokens:]  # (B, n, d)
        n = regs.shape[1]
        if self.cfg.register_dim:
            codes = torch.einsum("bnd,ndc->bnc", regs, self.down[:n])  # (B, n, c)
            regs = torch.einsum("bnc,ncd->bnd", codes, self.up[:n]) + self.up_bias[:n]  # (B, n, d)
        s = min(n, self.cfg.n_shared)
        codes = torch.einsum("bsd,sdc->bsc", regs[:, :s], self.shared_down[:s]) * self.shared_mask[:s]  # (B, s, c)
        shared = torch.einsum("bsc,scd->bsd", codes, self.shared_up[:s]) + self.shared_up_bias[:s]  # (B, s, d)
        return torch.cat([shared, regs[:, s:]], dim=1)  # (B, n, d)

    def resolve_keep(self, keep: int | Tensor | None, generator: torch.Generator | None, batch: int,
                     device: torch.device) -> Tensor:
        """keep → (B,) long: int k for all, a tensor as given, None → nested dropout (training) or all (eval)."""
        r = self.cfg.n_registers
        if isinstance(keep, Tensor):
            return keep.to(device=device, dtype=torch.long)
        if keep is None and self.training:
            return sample_keep(batch, r, self.cfg.nested_dropout_mode, generator, device)
        k = r if keep is None else int(keep)
        if not 1 <= k <= r:
            raise RegtokError(f"keep must be in 1..{r}, got {k}")
        return torch.full((batch,), k, dtype=torch.long, device=device)

    def embed_shared(self, registers: Tensor, keep: Tensor) -> Tensor:
        """Masked mean over the first min(keep, n_shared) shared registers → projection → L2 norm. (B, E)."""
        s = self.cfg.n_shared
        w = (torch.arange(s, device=registers.device) < keep[:, None]).to(registers.dtype)  # (B, S)
        mean = (registers[:, :s] * w[..., None]).sum(dim=1) / w.sum(dim=1, keepdim=True)  # (B, d); keep >= 1
        return F.normalize(self.shared_proj(mean), dim=-1)  # (B, E)

    def forward(self, x: Tensor, keep: int | Tensor | None = None,
                generator: torch.Generator | None = None) -> RegisterOutput:
        """x: (B, D_in) or (B, T, D_in). See the module docstring for ``keep``."""
        regs = self.registers_of(x)  # (B, R, d)
        return self.outputs(regs, self.resolve_keep(keep, generator, regs.shape[0], regs.device))

    def registers_of(self, x: Tensor) -> Tensor:
        """Every register's state (B, R, d) for input x (B, D_in) or (B, T, D_in); a k-prefix is its first k."""
        return self.readout(self.encode(x))

    def outputs(self, regs: Tensor, keep: Tensor) -> RegisterOutput:
        """The heads on a register set (B, R, d) of which the first ``keep`` (B,) are kept: masking, the shared
        embedding and the reconstruction. One encoding serves every prefix length (the registers are causal)."""
        kept = torch.arange(self.cfg.n_registers, device=regs.device) < keep[:, None]  # (B, R)
        regs = torch.where(kept[..., None], regs, self.mask_token.to(regs.dtype))  # (B, R, d): slot i → its token
        to_decoder = regs
        if not self.cfg.preservation_through_shared:  # the decoder reads the shared registers but cannot move them
            s = self.cfg.n_shared
            to_decoder = torch.cat([regs[:, :s].detach(), regs[:, s:]], dim=1)  # (B, R, d)
        return RegisterOutput(registers=regs, keep=keep, shared=self.embed_shared(regs, keep),
                              recon=self.decode_code(self.decoder.code(to_decoder)))

    def read_code(self, x: Tensor) -> Tensor:
        """The read's code of x: the standardised, flattened (token-reduced) input in the read basis (B, K);
        without a read (read_dim 0) the standardised, flattened input itself (B, T·D_in). The decoder's space."""
        flat = self.reduce(self.as_tokens(x))  # (B, F)
        if not self.read_width:
            return flat
        return flat @ self.read_basis.to(flat.dtype) - self.read_center.to(flat.dtype)  # (B, K)

    def decode_code(self, code: Tensor) -> Tensor:
        """A code (B, K) of :meth:`read_code`'s space → the standardised input it stands for (B, T, D_in)."""
        flat = self.decoder.unread(code, self.read_basis if self.read_width else None)  # (B, T, r)
        return flat @ self.token_basis.to(flat.dtype).T if self.token_width < self.d_in else flat  # (B, T, D_in)
