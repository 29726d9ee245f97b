"""apply_stackfast_kernels / patch_llama on tiny Hugging Face models (the kernels under the
interpreter on CPU): logits, loss and every parameter's gradient within docs/design.md's rule
of the unpatched model, against the unpatched model in float64; state dict unchanged."""
import copy

import pytest
import torch
import transformers
from conftest import assert_within_torch_error

from stackfast.ops import apply_stackfast_kernels, patch_llama
from stackfast.ops.hf import is_patched

pytestmark = pytest.mark.usefixtures("on_kernel_device")  # the GPU when there is one (conftest.py)

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=144, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")  # GQA, head dim 16


def tiny(cls=transformers.LlamaForCausalLM, config_cls=transformers.LlamaConfig, **overrides):
    torch.manual_seed(0)
    return cls(config_cls(**{**TINY, **overrides})).float()


def _run(model, x, labels):
    """(logits without labels, loss with labels, gradients by parameter name)."""
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(input_ids=x).logits
    loss = model(input_ids=x, labels=labels).loss
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _batch(vocab=97):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (2, 19), generator=g).to(torch.get_default_device())
    labels = x.clone()
    labels[0, :5] = -100  # a prompt not trained on
    return x, labels


def _assert_matches(patched, plain, x, labels):
    ref = _run(copy.deepcopy(plain).double(), x, labels)
    low = _run(plain, x, labels)
    ours = _run(patched, x, labels)
    assert_within_torch_error(ours[0], ref[0], low[0], torch.float32, "logits")
    assert_within_torch_error(ours[1], ref[1], low[1], torch.float32, "loss")
    assert ours[2].keys() == ref[2].keys()
    for name in ref[2]:
        assert_within_torch_error(ours[2][name], ref[2][name], low[2][name], torch.float32, name)


def test_patched_llama_matches_the_unpatched_model():
    plain = tiny()
    patched = apply_stackfast_kernels(copy.deepcopy(plain))
    assert is_patched(patched) and not is_patched(plain)
    assert list(patched.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(patched.state_dict().values(), plain.state_dict().values()))
    _assert_matches(patched, plain, *_batch())
    out = patched(input_ids=_batch()[0], labels=_batch()[1])
    assert out.logits is None  # the fused loss never computes them


def test_patched_llama_uses_every_kernel(monkeypatch):
    import stackfast.ops as ops
    calls = []
    for name in ("rms_norm", "rope", "attention", "swiglu", "linear_cross_entropy"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, real=real, name=name, **kw: calls.append(name) or real(*a, **kw))
    model = apply_stackfast_kernels(tiny(num_hidden_layers=1))
    x, labels = _batch()
    model(input_ids=x, labels=labels)
    assert calls == ["rms_norm", "rope", "attention", "rms_norm", "swiglu", "rms_norm", "linear_cross_entropy"]


def test_padding_mask_falls_back_to_the_modules_own_attention():
    plain = tiny(num_hidden_layers=1)
    patched = apply_stackfast_kernels(copy.deepcopy(plain))
    x, labels = _batch()
    mask = torch.ones_like(x)
    mask[1, -4:] = 0
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=x, attention_mask=mask).logits,
                                   plain(input_ids=x, attention_mask=mask).logits, rtol=1e-4, atol=1e-5)


def test_head_dim_the_attention_kernel_lacks_falls_back():
    plain = tiny(num_hidden_layers=1, hidden_size=96)  # head dim 24
    patched = apply_stackfast_kernels(copy.deepcopy(plain))
    x, labels = _batch()
    torch.testing.assert_close(patched(input_ids=x, labels=labels).loss, plain(input_ids=x, labels=labels).loss,
                               rtol=1e-5, atol=1e-6)


def test_num_items_in_batch_and_mistral_sibling():
    plain = tiny(transformers.MistralForCausalLM, transformers.MistralConfig, num_hidden_layers=1, sliding_window=8)
    patched = apply_stackfast_kernels(copy.deepcopy(plain))
    x, labels = _batch()
    for kwargs in ({}, {"num_items_in_batch": torch.tensor(50)}):
        # seq 19 > window 8: attention falls back to the module; RMSNorm, SwiGLU, loss still fused
        want = plain(input_ids=x, labels=labels, **kwargs).loss
        torch.testing.assert_close(patched(input_ids=x, labels=labels, **kwargs).loss, want, rtol=1e-5, atol=1e-6)


def test_class_patch_and_undo():
    x, labels = _batch()
    plain = tiny(num_hidden_layers=1)
    try:
        patch_llama()
        patched = tiny(num_hidden_layers=1)
        assert is_patched(patched) and is_patched(plain)  # classes: existing instances too
        with torch.no_grad():
            torch.testing.assert_close(patched(input_ids=x).logits, patched(input_ids=x, labels=None).logits)
    finally:
        patch_llama(undo=True)
    assert not is_patched(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, patched(input_ids=x).logits, rtol=1e-4, atol=1e-5)


def test_other_architectures_are_refused():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported"):
        apply_stackfast_kernels(model)
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not SwiGLU"):
        apply_stackfast_kernels(tiny(hidden_act="gelu"))


def test_generation_fills_the_cache_then_falls_back():
    """The prompt goes through the kernels and fills the KV cache; the next tokens (a cache
    holding earlier tokens) take the module's own attention: the same greedy tokens."""
    plain = tiny(num_hidden_layers=1)
    patched = apply_stackfast_kernels(copy.deepcopy(plain))
    x = _batch()[0][:1, :7]
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(x, **kwargs), plain.generate(x, **kwargs))
