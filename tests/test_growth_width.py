"""Width growth (stackfast/growth/width.py): width_direct, width_zero, width_random.

Function preservation is checked on logits with atol 1e-5 (fp32 rounding; the logits
are of order 1). width_zero and width_random at growth time equal the small model run
with norm_eps * D/d: the D - d new channels are zero, so each RMSNorm sees d/D of the
small model's mean square, which the sqrt(d/D) norm-weight rescale undoes except in eps.
"""
import dataclasses

import pytest
import torch

from stackfast.config import ModelConfig
from stackfast.growth import GrowthError, apply_growth, rebuild_ramp
from stackfast.growth.width import copy_maps
from stackfast.model import Transformer

WIDTH = ["width_direct", "width_zero", "width_random"]
ATOL = 1e-5


def tiny(**overrides):
    return ModelConfig.from_preset("tiny", kernels="torch", **overrides)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return Transformer(tiny())


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(1))


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


def small_with_eps_times(small, ratio):
    """The small model's weights with norm_eps multiplied by `ratio`."""
    model = Transformer(dataclasses.replace(small.config, norm_eps=small.config.norm_eps * ratio))
    model.load_state_dict(small.state_dict())
    return model


@pytest.mark.parametrize("operator", WIDTH)
def test_default_target_shape_and_spec(small, tokens, operator):
    growth = apply_growth(small, operator, 4, seed=3)
    cfg = growth.model.config
    # sqrt(4) = 2 times hidden and FFN; head_dim 16 kept, so heads and kv heads double.
    assert (cfg.hidden_size, cfg.ffn_size, cfg.n_heads, cfg.n_kv_heads) == (128, 352, 8, 4)
    assert (cfg.head_dim, cfg.n_layers) == (16, 2)
    assert growth.model.num_params() == cfg.num_params()
    assert growth.model(tokens).shape == (2, 16, 4096)
    spec = growth.spec
    assert spec["operator"] == operator and spec["factor"] == 4 and spec["seed"] == 3
    assert (spec["hidden_size"], spec["ffn_size"], spec["old_hidden_size"], spec["old_ffn_size"]) == (128, 352, 64, 176)
    assert (spec["old_n_heads"], spec["old_n_kv_heads"]) == (4, 2)


@pytest.mark.parametrize("operator", WIDTH)
def test_explicit_targets_allow_any_factor(small, operator):
    cfg = apply_growth(small, operator, 2, hidden_size=96, ffn_size=200).model.config
    assert (cfg.hidden_size, cfg.ffn_size, cfg.n_heads, cfg.n_kv_heads) == (96, 200, 6, 3)


@pytest.mark.parametrize("operator", WIDTH)
@pytest.mark.parametrize("factor, options, message", [
    (2, {}, "sqrt(2), which is not an integer"),
    (2, {"hidden_size": 128}, "sqrt(2), which is not an integer"),
    (4, {"hidden_size": 32}, "target hidden_size 32 is smaller than the model's 64"),
    (4, {"ffn_size": 100}, "target ffn_size 100 is smaller than the model's 176"),
    (4, {"hidden_size": 72, "ffn_size": 200}, "keeps head_dim 16: target hidden_size 72 is not a multiple"),
    (4, {"hidden_size": 80, "ffn_size": 200}, "gives 5 heads of dim 16, not a multiple of the model's 2 query"),
])
def test_bad_targets_raise(small, operator, factor, options, message):
    with pytest.raises(GrowthError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply_growth(small, operator, factor, **options)


@pytest.mark.parametrize("operator", WIDTH)
def test_deterministic_by_seed(small, operator):
    a, b, c = (apply_growth(small, operator, 4, seed=s).model.state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("operator", WIDTH)
def test_grown_model_trains(small, tokens, operator):
    model = apply_growth(small, operator, 4).model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(tokens, tokens)
    loss.backward()
    if operator == "width_zero":
        # The zeroed rows still learn: the new residual channels get gradient through the
        # small nonzero new norm weights, new FFN neurons through their random gate rows.
        block = model.layers[0]
        for rows in (model.embed_tokens.weight.grad.T[64:], block.mlp.up_proj.weight.grad[176:],
                     block.self_attn.v_proj.weight.grad[32:], block.mlp.down_proj.weight.grad[64:]):
            assert rows.abs().sum() > 0
    optimizer.step()
    assert torch.isfinite(model(tokens, tokens))


def test_direct_is_function_preserving_when_sizes_multiply(small, tokens):
    # D = 2d: every hidden channel has exactly one copy, so RMSNorm's mean square is unchanged.
    assert torch.allclose(logits(apply_growth(small, "width_direct", 4).model, tokens), logits(small, tokens),
                          atol=ATOL)
    # FFN neurons and heads are preserved for any count of copies (here 200 = 176 + 24).
    grown = apply_growth(small, "width_direct", 2, hidden_size=64, ffn_size=200).model
    assert torch.allclose(logits(grown, tokens), logits(small, tokens), atol=ATOL)


def test_direct_copies_and_splits(small, tokens):
    growth = apply_growth(small, "width_direct", 2, hidden_size=96, ffn_size=200, seed=5)
    grown = growth.model
    src = copy_maps(small.config, grown.config, seed=5)["hidden"]
    counts = torch.bincount(src)
    assert counts.max() - counts.min() <= 1  # copies drawn as evenly as possible
    # Fan-out copies (embedding columns), fan-in splits summing to the original (LM head).
    assert torch.equal(grown.embed_tokens.weight, small.embed_tokens.weight[:, src])
    summed = torch.zeros_like(small.lm_head.weight).index_add_(1, src, grown.lm_head.weight.detach())
    assert torch.allclose(summed, small.lm_head.weight, atol=1e-7)
    # Every copy channel of the residual stream equals its source, up to the last layer...
    seen = {}
    grown.norm.register_forward_hook(lambda module, inputs, output: seen.update(h=inputs[0]))
    out = logits(grown, tokens)
    assert torch.allclose(seen["h"], seen["h"][..., src], atol=1e-6)
    # ... but with uneven copy counts RMSNorm's mean square changes: not function preserving.
    assert (out - logits(small, tokens)).abs().max() > 1e-3


def test_zero_is_function_preserving_up_to_norm_eps(small, tokens):
    growth = apply_growth(small, "width_zero", 4)
    grown, d, D = growth.model, 64, 128
    out = logits(grown, tokens)
    assert torch.allclose(out, logits(small_with_eps_times(small, D / d), tokens), atol=ATOL)
    # With the small model's own eps the difference is the eps term alone: small, not zero.
    ref = logits(small, tokens)
    assert 0 < (out - ref).abs().max() < 0.05 * ref.abs().max()
    # Structure: old blocks copied, new output rows zero, norms rescaled by sqrt(d/D).
    assert torch.equal(grown.layers[1].self_attn.q_proj.weight[:64, :64], small.layers[1].self_attn.q_proj.weight)
    assert not grown.layers[1].mlp.up_proj.weight[176:].any()
    assert not grown.layers[1].self_attn.o_proj.weight[64:].any()
    assert torch.allclose(grown.norm.weight[:64], small.norm.weight * (d / D) ** 0.5)


def test_random_fades_new_units_in(small, tokens):
    growth = apply_growth(small, "width_random", 4, ramp_steps=10)
    grown, ramp = growth.model, growth.ramp
    assert ramp.active and ramp.value == 0.0
    # At c = 0 the new residual channels are exactly zero after every block (embedding,
    # o_proj, down_proj outputs masked; new heads and neurons silenced through v_proj and
    # up_proj), and the old channels of the residual stream (the pre-norm values) after
    # every block equal the small model's run with norm_eps * D/d; so do the logits.
    reference = small_with_eps_times(small, 2.0)
    residuals = {grown: [], reference: []}
    for model in residuals:
        for block in model.layers:
            block.register_forward_hook(lambda module, inputs, output, seen=residuals[model]: seen.append(output))
    start = logits(grown, tokens)
    assert torch.allclose(start, logits(reference, tokens), atol=ATOL)
    for h, h_ref in zip(residuals[grown], residuals[reference], strict=True):
        assert not h[..., 64:].any()
        assert torch.allclose(h[..., :64], h_ref, atol=1e-6)
    ramp.set_step(5)
    assert ramp.value == 0.5 and ramp.active
    assert not torch.allclose(logits(grown, tokens), start, atol=ATOL)
    ramp.set_step(10)
    assert not ramp.active and not grown.embed_tokens._forward_hooks
    # Resuming mid-ramp: the registered rebuild makes the same masks from the spec alone.
    rebuilt = rebuild_ramp(grown, growth.spec)
    assert torch.allclose(logits(grown, tokens), start, atol=ATOL)
    rebuilt.set_step(10)
    assert not rebuilt.active


def test_direct_noise_breaks_the_symmetry_of_copies(small, tokens):
    """Without noise a copied FFN neuron keeps its source's fan-in row exactly (and so its
    gradient: they never diverge); with a small alpha they differ, and the function barely moves."""
    plain = apply_growth(small, "width_direct", 2, hidden_size=64, ffn_size=200, seed=5).model
    noisy_growth = apply_growth(small, "width_direct", 2, hidden_size=64, ffn_size=200, seed=5, noise=0.01)
    noisy = noisy_growth.model
    src = copy_maps(small.config, plain.config, seed=5)["ffn"]
    copy = 176 + 3  # a new neuron: row 179 copies old neuron src[179]
    up_plain, up_noisy = plain.layers[0].mlp.up_proj.weight, noisy.layers[0].mlp.up_proj.weight
    assert torch.equal(up_plain[copy], up_plain[src[copy]])
    assert not torch.equal(up_noisy[copy], up_noisy[src[copy]])
    assert noisy_growth.spec["noise"] == 0.01
    assert (logits(noisy, tokens) - logits(plain, tokens)).abs().max() < 0.1
    with pytest.raises(GrowthError, match=r"noise: alpha must be in \[0, 1\)"):
        apply_growth(small, "width_direct", 2, noise=1.5)
