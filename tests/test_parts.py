"""What each part holds: the preservation decoder, the shared/private split and the probes that read it.

Planted problems: a shared latent z seen by both modalities, a factor each modality alone sees, through random
linear maps. What must hold: the decoder keeps its output positions apart and reconstructs as well as a linear
readout; a modality-only factor stays out of a narrow shared part and in the private one; probes are fitted on
the rows they are given (the run's training rows), not on the evaluated split.
"""

from __future__ import annotations

import numpy as np
import torch

from regtok.config import PRESETS, EvalConfig, ModelConfig, resolve
from regtok.evaluate import FitRows, evaluate
from regtok.model import RegTok

MODS = ("vision", "tactile")
SCHEMA = {"shared_z": {"type": "continuous", "group": "shared"},
          "albedo": {"type": "continuous", "group": "vision"}, "press": {"type": "continuous", "group": "tactile"}}


def planted(n: int, seed: int, tokens: int = 1, mix_seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """Features (n, tokens, 24) per modality from [z (6-d), own factor (1-d, strong), noise]; labels per row."""
    g, gm = np.random.default_rng(seed), np.random.default_rng(mix_seed)
    z = g.normal(size=(n, 6))
    own = {m: g.normal(size=(n, 1)) for m in MODS}
    feats = {}
    for m in MODS:
        parts = np.concatenate([z + 0.2 * g.normal(size=(n, 6)), 3 * own[m], g.normal(size=(n, 3))], 1)  # (n, 10)
        mix = gm.normal(size=(tokens, 10, 24))  # each position its own map
        feats[m] = np.einsum("nf,tfd->ntd", parts, mix).astype(np.float32)
        feats[m] = feats[m][:, 0] if tokens == 1 else feats[m]
    labels = {"shared_z": z[:, 0], "albedo": own["vision"][:, 0], "press": own["tactile"][:, 0]}
    return feats, labels


def started(feats: dict[str, np.ndarray], **model: object) -> RegTok:
    """A tiny RegTok at its start (statistics, CCA reads, decoders fitted), as the trainer builds it."""
    cfg = resolve(ModelConfig, None, PRESETS["tiny"]["model"], {"hidden_dim": 64, "embed_dim": 64, **model})
    x = {m: torch.from_numpy(v) for m, v in feats.items()}
    torch.manual_seed(0)
    net = RegTok(cfg, {m: (1, v.shape[-1]) if v.dim() == 2 else tuple(v.shape[1:]) for m, v in x.items()})
    net.set_feature_stats({m: (v.reshape(-1, v.shape[-1]).mean(0), v.reshape(-1, v.shape[-1]).std(0))
                           for m, v in x.items()})
    net.init_reads(x, seed=0)
    net.fit_decoders(x)
    return net.eval()


@torch.no_grad()
def test_decoder_keeps_positions_apart_and_reconstructs_like_a_linear_readout():
    train, _ = planted(600, 1, tokens=8)
    test, _ = planted(200, 2, tokens=8)
    net = started(train)
    enc = net.encoders["tactile"]
    x = torch.from_numpy(test["tactile"])
    target = enc.as_tokens(x)  # (N, 8, 24)
    cos = {}
    for k in (1, 2, 4, 8):
        recon = enc(x, keep=k).recon  # (N, 8, 24)
        cos[k] = torch.nn.functional.cosine_similarity(recon, target, dim=-1).mean().item()
    mean = target.mean(0, keepdim=True).expand_as(target)  # the per-position mean: the floor at every k
    floor = torch.nn.functional.cosine_similarity(mean, target, dim=-1).mean().item()
    assert cos[8] > 0.9 and all(cos[k] > floor for k in cos), (cos, floor)
    # non-decreasing in k up to held-out noise (the maps are fitted on other rows): within 0.001
    assert all(cos[a] <= cos[b] + 1e-3 for a, b in zip((1, 2, 4), (2, 4, 8), strict=True)), cos
    # positions stay apart: the cosine between two output positions follows the targets', not 1
    recon = enc(x).recon
    pos = lambda t: torch.nn.functional.cosine_similarity(t[:, 0], t[:, 5], dim=-1).mean().item()  # noqa: E731
    assert abs(pos(recon) - pos(target)) < 0.1 and pos(recon) < 0.9, (pos(recon), pos(target))


@torch.no_grad()
def test_fit_decoder_explains_more_with_every_register():
    train, _ = planted(400, 1, tokens=4)
    net = started(train)
    enc = net.encoders["vision"]
    x = torch.from_numpy(train["vision"])
    left = enc.fit_decoder(enc.registers_of(x), enc.read_code(x))
    assert len(left) == net.cfg.n_registers and left[-1] < 0.1
    assert all(a >= b - 1e-9 for a, b in zip(left, left[1:], strict=False)), left  # coarse to fine, never worse


def _leakage(net: RegTok, train: tuple, test: tuple) -> dict:
    cfg = EvalConfig(prefixes=(1, 2, 4, 8), device="cpu", baselines=False)
    fit = FitRows(train[0], train[1])
    return evaluate(net, test[0], test[1], SCHEMA, cfg, fit=fit)


def test_a_modality_only_factor_stays_out_of_a_narrow_shared_part():
    train, test = planted(800, 1), planted(300, 2)
    narrow = _leakage(started(train[0], shared_dim=3), train, test)  # 6 directions: the plant's shared latent
    wide = _leakage(started(train[0], shared_dim=32), train, test)  # the control: every direction (all 24 dims)
    auto = started(train[0]).encoders["vision"].shared_mask[0].sum()  # the width the start chooses on validation
    assert 3 <= auto <= 8, auto  # about the latent's, far from every direction
    for m in MODS:
        assert narrow["parts"]["leakage"][m] < 0.25, narrow["parts"]  # the target: at most 0.25 × raw
        assert wide["parts"]["leakage"][m] > 0.5, wide["parts"]  # the modality's own direction is in there
        assert narrow["parts"]["complementarity"][m] > 0.9, narrow["parts"]
        assert narrow["parts"]["shared_kept"][m] > 0.8, narrow["parts"]  # the shared latent stays


def test_probes_are_fitted_on_the_rows_they_are_given():
    train, test = planted(600, 1), planted(300, 2)
    net = started(train[0])
    cfg = EvalConfig(prefixes=(1, 2, 4, 8), device="cpu", baselines=False)
    scrambled = {k: np.random.default_rng(0).permutation(v) for k, v in train[1].items()}  # labels off their rows
    good = evaluate(net, test[0], test[1], SCHEMA, cfg, fit=FitRows(train[0], train[1]))
    bad = evaluate(net, test[0], test[1], SCHEMA, cfg, fit=FitRows(train[0], scrambled))
    raw = lambda rep: {p["label"]: p["value"] for p in rep["probes"] if p["group"] == "raw"  # noqa: E731
                       and p["modality"] == "vision"}
    assert raw(good)["albedo"] > 0.8 and raw(bad)["albedo"] < 0.1  # what the fit rows say, scored on this split
    assert good["probe_split"]["train"] == 600 and good["probe_split"]["test"] == 300
    assert good["probe_split"]["source"] == "the run's training rows"


@torch.no_grad()
def test_baselines_are_fitted_on_the_read_codes_the_probes_pass_reads():
    """One pass over the training rows gives the probes' registers and the baselines' inputs: the run's read codes
    of a seeded subset of baseline_max_rows rows, the same as reading them again."""
    from regtok.baselines import BaselineConfig, fit_and_score
    from regtok.evaluate import subset

    train, test = planted(600, 1), planted(300, 2)
    net = started(train[0])
    cfg = EvalConfig(prefixes=(1, 2, 4, 8), device="cpu", probe_max_samples=200, baseline_max_rows=500)
    rep = evaluate(net, test[0], test[1], SCHEMA, cfg, fit=FitRows(train[0], train[1]))
    rows = subset(600, 500, cfg.seed).numpy()
    code = lambda feats, m, idx: net.encoders[m].read_code(torch.from_numpy(feats[m][idx]))  # noqa: E731
    want = fit_and_score({m: code(train[0], m, rows) for m in MODS}, {m: code(test[0], m, slice(None)) for m in MODS},
                         MODS, BaselineConfig(embed_dim=net.cfg.embed_dim), reduced=True)
    linear = rep["baselines"]["linear"]
    assert linear["cca"]["fit"]["train_rows"] == 500 and rep["probe_split"]["train"] == 200
    for name in ("cca", "weighted_cca", "linear_infonce", "mlp_infonce"):
        assert linear[name]["a_to_b"] == want[name]["a_to_b"] and linear[name]["b_to_a"] == want[name]["b_to_a"]
    assert linear["cca"]["a_to_b"]["R@1"] > 0.3  # the plant's shared latent is there to find (chance: 1/300)
    # no read (read_dim 0): nothing to fit them on here; the eval stage reduces the features itself
    bare = evaluate(started(train[0], read_dim=0), test[0], test[1], SCHEMA, cfg, fit=FitRows(train[0], train[1]))
    assert "linear" not in bare["baselines"]
