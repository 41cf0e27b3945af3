"""Linear baselines (regtok.baselines) and the register module's canonical start (RegTok.init_reads).

The planted problem: a shared latent z seen by both modalities through different random linear maps, plus
private dimensions and noise. A linear method can recover the partner from z; chance is 1/N.
"""

from __future__ import annotations

import torch

from regtok.baselines import BaselineConfig, Reducer, fit_and_score, mean_r1, select_cca, weighted_cca
from regtok.config import PRESETS, ModelConfig, resolve
from regtok.model import RegTok

N_TRAIN, N_TEST, D_SHARED, D_IN = 1200, 300, 12, 40
MODS = ("vision", "tactile")


def planted(n: int, seed: int, tokens: bool = False, mix_seed: int = 0) -> dict[str, torch.Tensor]:
    g_mix, g = torch.Generator().manual_seed(mix_seed), torch.Generator().manual_seed(seed)
    mixes = [torch.randn(D_SHARED + 6, D_IN, generator=g_mix) for _ in MODS]
    z = torch.randn(n, D_SHARED, generator=g)
    out = {}
    for m, w in zip(MODS, mixes, strict=True):
        view = torch.cat([z + 0.1 * torch.randn(n, D_SHARED, generator=g), torch.randn(n, 6, generator=g)], 1)
        x = view @ w + 5.0  # an offset the standardisation must remove
        out[m] = x.reshape(n, 4, D_IN // 4) if tokens else x  # tokens: the same numbers as (T, D)
    return out


def r1(result: dict) -> float:
    return (result["a_to_b"]["R@1"] + result["b_to_a"]["R@1"]) / 2


def test_each_baseline_recovers_the_plant_and_cca_picks_its_dimension():
    train, test = planted(N_TRAIN, 1), planted(N_TEST, 2)
    res = fit_and_score(train, test, MODS, BaselineConfig(embed_dim=16, batch_size=128))
    assert r1(res["cca"]) > 0.9 and r1(res["linear_infonce"]) > 0.6, {k: r1(v) for k, v in res.items()}
    assert res["cca"]["fit"]["components"] in (8, 16)  # the plant has 12 shared dimensions
    # the control: the same baselines on unpaired test rows are at chance
    shuffled = {"vision": test["vision"], "tactile": test["tactile"].flip(0)}
    res = fit_and_score(train, shuffled, MODS, BaselineConfig(embed_dim=16, batch_size=128, max_epochs=2))
    assert max(r1(v) for k, v in res.items() if k != "store") < 10 / N_TEST


def test_token_features_are_flattened_and_reduced_like_the_same_numbers_pooled():
    train, test = planted(N_TRAIN, 1, tokens=True), planted(N_TEST, 2, tokens=True)
    res = fit_and_score(train, test, MODS, BaselineConfig(max_dim=24, embed_dim=16, batch_size=128, max_epochs=3))
    assert res["cca"]["fit"]["input_dims"] == {"vision": 24, "tactile": 24}  # PCA to max_dim
    assert r1(res["cca"]) > 0.9


def test_results_do_not_depend_on_the_order_of_rows():
    train, test = planted(N_TRAIN, 1), planted(N_TEST, 2)
    perm = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(5))
    cfg = BaselineConfig(embed_dim=16, batch_size=N_TRAIN, max_epochs=3)  # one full batch: order-free gradients
    a = fit_and_score(train, test, MODS, cfg)
    b = fit_and_score({m: x[perm] for m, x in train.items()}, test, MODS, cfg)
    assert abs(r1(a["cca"]) - r1(b["cca"])) < 0.02  # the validation part differs; the fit does not much
    red_a, red_b = Reducer.fit(train["vision"], 8), Reducer.fit(train["vision"][perm], 8)
    torch.testing.assert_close(red_a(test["vision"]).abs(), red_b(test["vision"]).abs(), atol=1e-4, rtol=1e-4)
    # permuting the *test* rows permutes nothing in the metrics
    tperm = torch.randperm(N_TEST, generator=torch.Generator().manual_seed(6))
    c = fit_and_score(train, {m: x[tperm] for m, x in test.items()}, MODS, cfg)
    assert r1(c["cca"]) == r1(a["cca"]) and r1(c["linear_infonce"]) == r1(a["linear_infonce"])


def test_weighted_cca_is_at_least_plain_cca_on_validation_and_orders_by_strength():
    train = planted(N_TRAIN, 1)
    za, zb = (Reducer.fit(train[m], 64)(train[m]) for m in MODS)
    pa, pb, info = weighted_cca(za, zb, 32, 0.2, seed=0)
    _, plain = select_cca(za, zb, 0.2, seed=0)
    assert pa.shape == (za.shape[1], 32) and info["val_r1"] >= plain["val_r1"] - 1e-9
    strength = (za @ pa).std(0)  # weights ρ^power: non-increasing up to noise
    assert strength[0] >= strength[-1]


def test_the_register_module_starts_at_the_linear_baseline():
    """After init_reads the untrained module retrieves as well as linear CCA on the same rows."""
    train, test = planted(N_TRAIN, 1), planted(N_TEST, 2)
    cfg = resolve(ModelConfig, None, PRESETS["tiny"]["model"], {"hidden_dim": 64, "embed_dim": 64})
    torch.manual_seed(0)
    model = RegTok(cfg, {m: (1, D_IN) for m in MODS})
    model.set_feature_stats({m: (x.mean(0), x.std(0)) for m, x in train.items()})
    with torch.no_grad():
        before = model(test, keep=cfg.n_shared)
    chosen = model.init_reads(train, seed=0)
    assert chosen["read_init"] == "cca"
    with torch.no_grad():
        outs = model.eval()(test, keep=cfg.n_shared)
    start = mean_r1(outs["vision"].shared, outs["tactile"].shared)
    base = fit_and_score(train, test, MODS, BaselineConfig(embed_dim=16, batch_size=128, max_epochs=1))
    assert start >= r1(base["cca"]) - 0.02, (start, r1(base["cca"]))
    assert mean_r1(before["vision"].shared, before["tactile"].shared) < 10 / N_TEST  # the control: random reads
    # prefixes stay nested: the 1-register encoding is the prefix of the full one
    with torch.no_grad():
        full, one = model.encoders["vision"].encode(test["vision"]), model.encoders["vision"].encode(test["vision"], 1)
    torch.testing.assert_close(one, full[:, : one.shape[1]])
