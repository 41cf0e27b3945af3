"""Properties of the register module and the two-modality model (tiny preset, CPU)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from regtok.config import PRESETS, ModelConfig, resolve
from regtok.errors import RegtokError
from regtok.model import RegisterModule, RegTok, allowed_keeps, sample_keep

INPUTS = {"vision": (1, 12), "tactile": (3, 10)}  # pooled and token inputs


def tiny(**kw) -> ModelConfig:
    return resolve(ModelConfig, None, PRESETS["tiny"]["model"], kw)


def batch(b: int = 6, seed: int = 0, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "vision": torch.randn(b, 12, generator=g, dtype=dtype),
        "tactile": torch.randn(b, 3, 10, generator=g, dtype=dtype),
    }


def module(n_tokens: int = 3, d_in: int = 10, **kw) -> RegisterModule:
    torch.manual_seed(0)
    return RegisterModule(tiny(**kw), n_tokens, d_in).double().eval()


@pytest.mark.parametrize("qk_norm", [False, True])
def test_later_registers_do_not_change_earlier_ones(qk_norm):
    m = module(qk_norm=qk_norm)
    x = batch()["tactile"]
    t, r = m.n_tokens, m.cfg.n_registers
    before = m.encode(x)  # (B, T+R, d)
    for i in range(r - 1):
        with torch.no_grad():
            m.register_tokens[i + 1:] += torch.randn_like(m.register_tokens[i + 1:])
        after = m.encode(x)
        torch.testing.assert_close(after[:, : t + i + 1], before[:, : t + i + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(after[:, t + i + 1:], before[:, t + i + 1:])
        before = after


def test_feature_tokens_ignore_registers_and_registers_read_features():
    m = module()
    x = batch()["tactile"]
    h0 = m.encode(x)
    with torch.no_grad():
        m.register_tokens.mul_(-3.0)
    torch.testing.assert_close(m.encode(x)[:, : m.n_tokens], h0[:, : m.n_tokens], rtol=0, atol=1e-12)
    x2 = x.clone()
    x2[:, -1] += 1.0  # the last feature token only
    assert not torch.allclose(m.encode(x2)[:, m.n_tokens], m.encode(x)[:, m.n_tokens])  # register 0 sees it


@pytest.mark.parametrize("register_dim", [0, 8])
def test_k_register_encoding_equals_prefix_of_full_encoding(register_dim):
    m = module(register_dim=register_dim)
    x = batch()["tactile"]
    r = m.cfg.n_registers
    full = m(x)
    for k in range(1, r + 1):
        alone = m.readout(m.encode(x, n_registers=k))  # (B, k, d): only k register tokens exist
        out = m(x, keep=k)
        torch.testing.assert_close(out.registers[:, :k], alone, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.registers[:, :k], full.registers[:, :k], rtol=0, atol=1e-12)
        assert torch.equal(out.registers[:, k:], m.mask_token[k:].expand(x.shape[0], -1, -1))
        assert torch.equal(out.keep, torch.full((x.shape[0],), k))


def test_shared_embedding_is_masked_mean_of_kept_shared_registers():
    m = module()
    with torch.no_grad():
        m.decoder.weight.normal_()  # a decoder that reads every slot (an unfitted one is zero)
    x = batch()["tactile"]
    s = m.cfg.n_shared
    keep = torch.tensor([1, 2, 8, 1, 4, 2])
    out = m(x, keep=keep)
    full = m.readout(m.encode(x))  # (B, R, d)
    for i, k in enumerate(keep.tolist()):
        mean = full[i, : min(k, s)].mean(dim=0)
        expected = torch.nn.functional.normalize(m.shared_proj(mean), dim=-1)
        torch.testing.assert_close(out.shared[i], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.shared.norm(dim=-1), torch.ones(6, dtype=torch.float64))
    # the mask token never enters the shared mean, but it does reach the decoder
    with torch.no_grad():
        m.mask_token.add_(torch.randn_like(m.mask_token))
    out2 = m(x, keep=keep)
    torch.testing.assert_close(out2.shared, out.shared, rtol=0, atol=0)
    assert not torch.allclose(out2.recon[keep < 8], out.recon[keep < 8])
    torch.testing.assert_close(out2.recon[keep == 8], out.recon[keep == 8], rtol=0, atol=0)


def test_output_shapes_pooled_and_tokens():
    torch.manual_seed(0)
    model = RegTok(tiny(), INPUTS).double().eval()
    outs = model(batch())
    cfg = model.cfg
    assert outs["vision"].registers.shape == (6, cfg.n_registers, cfg.hidden_dim)
    assert outs["vision"].recon.shape == (6, 1, 12)
    assert outs["tactile"].recon.shape == (6, 3, 10)
    assert outs["tactile"].shared.shape == (6, cfg.embed_dim)
    assert torch.equal(outs["vision"].keep, torch.full((6,), cfg.n_registers))
    with pytest.raises(RegtokError, match="expected input"):
        model({"vision": torch.randn(6, 11, dtype=torch.float64), "tactile": batch()["tactile"]})
    with pytest.raises(RegtokError, match="keep"):
        model(batch(), keep=cfg.n_registers + 1)


@pytest.mark.parametrize("mode", ["power_of_two", "uniform", "none"])
def test_nested_dropout_distribution_and_determinism(mode):
    r = 8
    allowed = allowed_keeps(r, mode)
    assert allowed == {"power_of_two": [1, 2, 4, 8], "uniform": list(range(1, 9)), "none": [8]}[mode]
    keep = sample_keep(8000, r, mode, torch.Generator().manual_seed(1), torch.device("cpu"))
    counts = Counter(keep.tolist())
    assert set(counts) == set(allowed)
    for k in allowed:  # uniform over the allowed lengths, within 5 standard deviations
        p = 1 / len(allowed)
        assert abs(counts[k] / 8000 - p) < 5 * (p * (1 - p) / 8000) ** 0.5 + 1e-9
    again = sample_keep(8000, r, mode, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert torch.equal(keep, again)
    assert allowed_keeps(24, "power_of_two") == [1, 2, 4, 8, 16, 24]


def test_training_mode_keeps_a_per_sample_prefix_shared_by_both_modalities():
    torch.manual_seed(0)
    model = RegTok(tiny(), INPUTS).double().train()
    outs = model(batch(b=64), generator=torch.Generator().manual_seed(3))
    keep = outs["vision"].keep
    assert torch.equal(keep, outs["tactile"].keep)
    assert len(set(keep.tolist())) > 1 and set(keep.tolist()) <= {1, 2, 4, 8}
    for m, o in outs.items():
        for i, k in enumerate(keep.tolist()):
            assert torch.equal(o.registers[i, k:], model.encoders[m].mask_token[k:])
    same = model(batch(b=64), generator=torch.Generator().manual_seed(3))
    assert torch.equal(same["vision"].keep, keep)
    model.eval()
    e1, e2 = model(batch(b=64)), model(batch(b=64))
    assert torch.equal(e1["vision"].shared, e2["vision"].shared)
    assert torch.equal(e1["vision"].keep, torch.full((64,), 8))


@pytest.mark.parametrize("loss_type,mrl", [("contrastive", False), ("contrastive", True),
                                           ("flow_matching", False), ("combined", False)])
def test_every_parameter_gets_a_finite_gradient(loss_type, mrl):
    torch.manual_seed(0)
    model = RegTok(tiny(loss_type=loss_type, mrl=mrl), INPUTS).double().train()
    terms = model.losses(batch(b=16), generator=torch.Generator().manual_seed(0))
    for name, value in terms.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    terms["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    expected = {"loss", "preservation", "preservation/vision", "preservation/tactile"}
    if loss_type != "flow_matching":
        expected |= {"contrastive", "logit_scale"}
    if loss_type != "contrastive":
        expected |= {"flow", "flow/a_to_b", "flow/b_to_a", "variance", "covariance"}
    assert expected <= set(terms)
    assert model.has_flow == (loss_type != "contrastive")


@pytest.mark.parametrize("kw", [
    {"preservation_weight": 0.0, "nested_dropout_mode": "none"},
    {"read_dim": 0, "register_dim": 4, "n_shared": 8},
    {"loss_type": "flow_matching", "flow_encoder_grad": False, "flow_uniformity_weight": 0.0,
     "preservation_weight": 0.0},
    {"loss_type": "combined", "mrl": True, "flow_encoder_grad": False, "preservation_through_shared": True},
])
def test_every_parameter_is_in_the_graph_of_the_loss(kw):
    """What DDP without ``find_unused_parameters`` needs: a zero weight, a detached path or no nested dropout
    still leaves every parameter a gradient (zero, possibly)."""
    torch.manual_seed(0)
    model = RegTok(tiny(**kw), INPUTS).double().train()
    model.losses(batch(b=16), generator=torch.Generator().manual_seed(0))["loss"].backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


def test_private_registers_get_no_gradient_from_contrastive_alone():
    torch.manual_seed(0)
    model = RegTok(tiny(preservation_weight=0.0), INPUTS).double().train()
    model.losses(batch(b=16), generator=torch.Generator().manual_seed(0))["loss"].backward()
    s = model.cfg.n_shared
    for enc in model.encoders.values():
        assert enc.register_tokens.grad[:s].abs().sum() > 0
        assert torch.equal(enc.register_tokens.grad[s:], torch.zeros_like(enc.register_tokens.grad[s:]))
        assert list(enc.decoder.parameters()) == []  # fitted in closed form (fit_decoder), not by the optimizer


def test_logit_scale_is_clamped():
    model = RegTok(tiny(max_logit_scale=50.0), INPUTS)
    assert model.logit_scale().item() == pytest.approx(1 / model.cfg.init_temperature, rel=1e-6)
    with torch.no_grad():
        model.log_logit_scale.fill_(10.0)
    assert model.logit_scale().item() == pytest.approx(50.0, rel=1e-6)


def test_spec_round_trip_rebuilds_the_same_model():
    torch.manual_seed(0)
    model = RegTok(tiny(loss_type="combined"), INPUTS).eval()
    spec = json.loads(json.dumps(model.spec()))
    clone = RegTok.from_spec(spec).eval()
    assert clone.modalities == ("vision", "tactile") and clone.has_flow
    clone.load_state_dict(model.state_dict())
    b = batch(dtype=torch.float32)
    assert torch.equal(clone(b)["tactile"].shared, model(b)["tactile"].shared)
    x = model(b)["vision"].shared
    torch.testing.assert_close(clone.transport(x, "a_to_b", 3), model.transport(x, "a_to_b", 3))
    with pytest.raises(RegtokError, match="model spec"):
        RegTok.from_spec({"config": {}})
    with pytest.raises(RegtokError, match="unknown config key"):
        RegTok.from_spec({"config": {"n_regs": 3}, "inputs": {"a": [1, 2], "b": [1, 2]}})


def test_transport_is_normalised_and_needs_a_flow_head():
    torch.manual_seed(0)
    model = RegTok(tiny(loss_type="flow_matching"), INPUTS).double().eval()
    shared = model(batch())["vision"].shared
    for direction in ("a_to_b", "b_to_a"):
        out = model.transport(shared, direction, steps=4)
        assert out.shape == shared.shape and not out.requires_grad
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(6, dtype=torch.float64))
    with pytest.raises(RegtokError, match="no flow head"):
        RegTok(tiny(), INPUTS).transport(shared.float(), "a_to_b", 2)


def test_model_losses_are_invariant_to_permuting_the_batch():
    torch.manual_seed(0)
    model = RegTok(tiny(mrl=True), INPUTS).double().eval()  # eval: no nested-dropout draw to permute with
    b = batch(b=12)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    base = model.losses(b)
    permuted = model.losses({m: v[perm] for m, v in b.items()})
    for name, value in base.items():
        torch.testing.assert_close(permuted[name], value, rtol=0, atol=1e-12, msg=name)


def test_feature_standardisation_is_set_from_data_and_saved_with_the_weights():
    from regtok.data import feature_stats

    g = torch.Generator().manual_seed(3)
    # Features with a large common offset, as frozen encoders produce: raw cosines are all near 1.
    data = {"vision": 5.0 + 0.1 * torch.randn(40, 12, generator=g),
            "tactile": 2.0 + torch.randn(40, 3, 10, generator=g)}
    stats = feature_stats({m: x[i:i + 16] for m, x in data.items()} for i in range(0, 40, 16))
    torch.testing.assert_close(stats["vision"][0], data["vision"].mean(0))
    torch.testing.assert_close(stats["tactile"][1], data["tactile"].reshape(-1, 10).std(0, unbiased=False))
    torch.manual_seed(0)
    model = RegTok(tiny(), INPUTS)
    model.set_feature_stats(stats)
    z = model.encoders["vision"].as_tokens(data["vision"])  # (40, 1, 12)
    torch.testing.assert_close(z.mean((0, 1)), torch.zeros(12), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std((0, 1), unbiased=False), torch.ones(12), atol=1e-4, rtol=0)
    state = model.state_dict()
    assert "encoders.vision.feature_mean" in state and "encoders.tactile.feature_std" in state
    rebuilt = RegTok.from_spec(model.spec())
    rebuilt.load_state_dict(state)
    torch.testing.assert_close(rebuilt.encoders["tactile"].as_tokens(data["tactile"]),
                               model.encoders["tactile"].as_tokens(data["tactile"]))
