"""apply_stackfast_kernels / patch_llama, the mechanics, on tiny Hugging Face models (the
kernels under the interpreter on CPU): the state dict unchanged, every kernel called, the
fallbacks to Hugging Face's own code, the class patch and its undo, refusals. The numbers
of every call pattern against the unpatched model: tests/test_hf_parity.py."""
import copy

import pytest
import torch
import transformers

from stackfast.ops import apply_stackfast_kernels, patch_llama
from stackfast.ops.hf import is_patched

pytestmark = pytest.mark.usefixtures("on_kernel_device")  # the GPU when there is one (conftest.py)

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=144, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")  # GQA, head dim 16


def tiny(cls=transformers.LlamaForCausalLM, config_cls=transformers.LlamaConfig, **overrides):
    torch.manual_seed(0)
    return cls(config_cls(**{**TINY, **overrides})).float()


def _batch(vocab=97):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (2, 19), generator=g).to(torch.get_default_device())
    labels = x.clone()
    labels[0, :5] = -100  # a prompt not trained on
    return x, labels


def test_patch_keeps_the_state_dict_and_skips_the_logits():
    plain = tiny(num_hidden_layers=1)
    patched = apply_stackfast_kernels(copy.deepcopy(plain))
    assert is_patched(patched) and not is_patched(plain)
    assert list(patched.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(patched.state_dict().values(), plain.state_dict().values()))
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


def test_head_dim_the_attention_kernel_lacks_falls_back():
    plain = tiny(num_hidden_layers=1, hidden_size=96)  # head dim 24
    patched = apply_stackfast_kernels(copy.deepcopy(plain))
    x, labels = _batch()
    torch.testing.assert_close(patched(input_ids=x, labels=labels).loss, plain(input_ids=x, labels=labels).loss,
                               rtol=1e-5, atol=1e-6)


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


def test_class_patch_runs_hugging_faces_mlp_where_swiglu_does_not_apply(monkeypatch):
    """patch_llama() reaches every Llama built, whatever its config: a gelu model's MLPs run
    Hugging Face's own forward (never SwiGLU under a gelu config); the rest stays fused."""
    import stackfast.ops as ops
    x, labels = _batch()
    plain = tiny(num_hidden_layers=1, hidden_act="gelu")
    want = plain(input_ids=x, labels=labels).loss
    calls = []
    for name in ("swiglu", "rms_norm"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, real=real, name=name, **kw: calls.append(name) or real(*a, **kw))
    try:
        patch_llama()
        loss = plain(input_ids=x, labels=labels).loss
    finally:
        patch_llama(undo=True)
    assert "swiglu" not in calls and "rms_norm" in calls
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


class _DoubledMLP(transformers.models.llama.modeling_llama.LlamaMLP):
    def forward(self, x):  # a project's own MLP: not SwiGLU's output
        return 2 * super().forward(x)


class _Subclass(transformers.LlamaForCausalLM):
    pass


def test_a_module_class_with_its_own_forward_keeps_it():
    """apply_stackfast_kernels on a subclass of LlamaForCausalLM whose layer has an MLP
    subclass with a forward of its own: that forward runs, the rest is patched."""
    x, labels = _batch()
    plain = tiny(_Subclass, num_hidden_layers=1)
    plain.model.layers[0].mlp.__class__ = _DoubledMLP
    patched = apply_stackfast_kernels(copy.deepcopy(plain))
    assert is_patched(patched) and "forward" not in vars(patched.model.layers[0].mlp)
    torch.testing.assert_close(patched(input_ids=x, labels=labels).loss, plain(input_ids=x, labels=labels).loss,
                               rtol=1e-5, atol=1e-6)


def test_other_architectures_are_refused():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported"):
        apply_stackfast_kernels(model)
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not SwiGLU"):
        apply_stackfast_kernels(tiny(hidden_act="gelu"))


def test_patched_model_pickles(tmp_path):
    """torch.save(model) of a patched model, then torch.load: still patched, the same logits
    (the patched forwards are partials of module-level functions, not bound methods)."""
    patched = apply_stackfast_kernels(tiny())
    torch.save(patched, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)  # a whole module: this test only
    assert is_patched(loaded)
    x, labels = _batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, patched(input_ids=x).logits, rtol=0, atol=0)
        torch.testing.assert_close(loaded(input_ids=x, labels=labels).loss, patched(input_ids=x, labels=labels).loss)
