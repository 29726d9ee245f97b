"""The Llama decoder: shapes, parameter count, causality, GQA, init, Hugging Face equivalence."""
import math

import pytest
import torch

from stackfast.checkpoint import hf_llama_config, to_hf_state_dict
from stackfast.config import ModelConfig
from stackfast.model import Transformer, apply_rope, rope_tables


def tiny(**overrides):
    return ModelConfig.from_preset("tiny", kernels="torch", **overrides)


def test_shapes_and_parameter_count():
    cfg = tiny()
    model = Transformer(cfg)
    x = torch.randint(0, cfg.vocab_size, (3, 11))
    assert model(x).shape == (3, 11, cfg.vocab_size)
    assert model.num_params() == cfg.num_params()
    loss = model(x, x)
    assert loss.ndim == 0 and loss.dtype == torch.float32
    # A fresh model predicts close to uniform: loss near ln(vocab).
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1


def test_future_tokens_never_change_earlier_logits():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    x = torch.randint(0, 4096, (2, 24))
    y = x.clone()
    y[:, 13:] = torch.randint(0, 4096, (2, 11))  # change the future only
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :13], b[:, :13])
    assert not torch.allclose(a[:, 13:], b[:, 13:])


def test_gqa_equals_full_attention_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = Transformer(tiny(n_heads=4, n_kv_heads=2)).eval()
    mha = Transformer(tiny(n_heads=4, n_kv_heads=4)).eval()
    state = gqa.state_dict()
    hd = gqa.config.head_dim
    for name, tensor in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            # (kv_heads*hd, d) -> each kv head's rows repeated for the 2 query heads of its group
            state[name] = tensor.view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(state)
    x = torch.randint(0, 4096, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


def test_rope_preserves_norm_and_depends_on_relative_position():
    cos, sin = rope_tables(8, 64, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def rotated(x, pos):
        return apply_rope(x, cos[pos:pos + 1], sin[pos:pos + 1])

    torch.testing.assert_close(rotated(q, 5).norm(), q.norm())
    dot_a = (rotated(q, 7) * rotated(k, 3)).sum()
    dot_b = (rotated(q, 30) * rotated(k, 26)).sum()
    torch.testing.assert_close(dot_a, dot_b, rtol=1e-5, atol=1e-5)


def test_init_std_and_scaled_output_projections():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("toy", kernels="torch")
    model = Transformer(cfg)
    assert abs(model.layers[0].self_attn.q_proj.weight.std().item() - 0.02) < 1e-3
    out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    assert abs(model.layers[0].mlp.down_proj.weight.std().item() - out_std) < 2e-4
    assert torch.all(model.norm.weight == 1)


def test_sequence_longer_than_rope_tables_is_refused():
    model = Transformer(tiny(max_seq_len=16))
    with pytest.raises(ValueError, match="exceeds model.max_seq_len 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_weights_load_into_hugging_face_llama_by_rename():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tiny()
    ours = Transformer(cfg).eval()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_llama_config(cfg))).eval()
    renamed = to_hf_state_dict(ours.state_dict())
    missing, unexpected = hf.load_state_dict(renamed, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    x = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-4, atol=1e-4)


def test_auto_kernels_leave_fp32_attention_to_sdpa(monkeypatch):
    """On a GPU 'auto' runs the Triton attention for bf16/fp16 compute only; 'triton' always."""
    import stackfast.model as model_module
    import stackfast.ops as ops
    monkeypatch.setattr(model_module, "use_triton", lambda kernels, device: kernels != "torch")  # as on a GPU
    calls = []
    real = ops.attention
    monkeypatch.setattr(ops, "attention", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    x = torch.randint(0, 4096, (1, 8))
    for kernels, expected in (("auto", 0), ("triton", 2)):
        torch.manual_seed(0)
        Transformer(ModelConfig.from_preset("tiny", kernels=kernels))(x)
        assert len(calls) == expected, kernels


def test_triton_kernels_match_the_torch_path_in_loss_and_every_gradient():
    """kernels='triton' (attention, RMSNorm, RoPE, SwiGLU, fused linear cross-entropy; the
    interpreter on CPU) against kernels='torch', the same weights: logits, loss, gradients."""
    x = torch.randint(0, 4096, (2, 9))
    y = torch.randint(0, 4096, (2, 9))
    results = []
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_preset("tiny", kernels=kernels))
        loss = model(x, y)
        loss.backward()
        with torch.no_grad():
            logits = model(x)
        results.append((logits, loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (logits, loss, grads), (k_logits, k_loss, k_grads) = results
    torch.testing.assert_close(k_logits, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(k_loss, loss, rtol=1e-5, atol=1e-6)
    assert k_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(k_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_auto_kernels_on_a_gpu_use_every_fused_op(monkeypatch):
    import stackfast.model as model_module
    import stackfast.ops as ops
    monkeypatch.setattr(model_module, "use_triton", lambda kernels, device: kernels != "torch")  # as on a GPU
    calls = []
    for name in ("rope", "swiglu", "linear_cross_entropy"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, real=real, name=name, **kw: calls.append(name) or real(*a, **kw))
    x = torch.randint(0, 4096, (1, 8))
    torch.manual_seed(0)
    Transformer(ModelConfig.from_preset("tiny", kernels="auto"))(x, x)
    assert calls == ["rope", "swiglu"] * 2 + ["linear_cross_entropy"]
    calls.clear()
    Transformer(ModelConfig.from_preset("tiny", kernels="torch"))(x, x)
    assert calls == []


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_packed_documents_give_the_logits_of_each_document_alone(kernels):
    """A row packing two documents, with document_ids and rope_reset, computes what each document
    alone does (the Triton path under the interpreter on CPU). RoPE is relative, so the logits
    alone cannot tell whether positions restarted: the tables the layers get show it."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", kernels=kernels, rope_reset=True)
    model = Transformer(cfg).eval()
    tables = []
    model.layers[0].self_attn.register_forward_pre_hook(lambda module, args: tables.append(args[1]))
    first, second = torch.randint(0, 4096, (1, 7)), torch.randint(0, 4096, (1, 10))
    packed = torch.cat([first, second], dim=1)
    document_ids = torch.tensor([[0] * 7 + [1] * 10])
    with torch.no_grad():
        alone = torch.cat([model(first), model(second)], dim=1)
        got = model(packed, document_ids=document_ids)
        attending_across = model(packed)
    torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(attending_across[:, 7:], alone[:, 7:], rtol=1e-3, atol=1e-3)
    positions = torch.tensor([list(range(7)) + list(range(10))])
    assert torch.equal(tables[2], model.rope_cos[positions])  # (1, 17, head_dim): from 0 in each document
    with pytest.raises(ValueError, match=r"document_ids must be shaped like the tokens \(1, 17\)"):
        model(packed, document_ids=document_ids[:, :5])
