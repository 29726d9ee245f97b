"""stackfast's kernels in a Hugging Face `transformers` Llama (and its Mistral / Qwen2 siblings).

    model = transformers.AutoModelForCausalLM.from_pretrained(...)   # a LlamaForCausalLM
    apply_stackfast_kernels(model)          # this instance, in place; or patch_llama() for the classes
    loss = model(input_ids=x, labels=x).loss

What is replaced (forward methods only: no module, parameter or buffer is added, removed or
renamed, so the state dict and checkpoints are untouched):
- every RMSNorm: stackfast.ops.rms_norm;
- every attention: q/k/v projections, stackfast.ops.rope on q and k (the tables Hugging
  Face computed: position_ids, rope scaling and attention_scaling are honoured), then
  stackfast.ops.attention (causal, GQA, flash-attn layout, no (B, H, S, D) transposes).
  The module's own forward runs instead where the kernel would not give the same result:
  an explicit attention mask (padding, or an implementation that materialises the causal
  mask, e.g. 'eager'), a KV cache holding earlier tokens (generation; an empty one is
  filled), attention dropout in training, a sliding window shorter than the sequence, or a
  head dim the attention kernel does not take (stackfast.ops.attention.HEAD_DIMS);
- every MLP (silu / swish only): down_proj(stackfast.ops.swiglu(gate_proj(x), up_proj(x)));
- the causal-LM loss when `labels` are given: stackfast.ops.linear_cross_entropy of the final
  hidden states and lm_head's weight with Hugging Face's label shift, ignore_index -100 and
  `num_items_in_batch` / `shift_labels` handling; the logits are then not computed and the
  output's `logits` is None (as with Liger-Kernel's fused loss). Without labels the logits
  are returned as before.
"""
from __future__ import annotations

import dataclasses
import importlib
import types

import torch
import torch.nn.functional as F

# architecture (the ForCausalLM class name) -> (transformers module, class name prefix)
SUPPORTED = {
    "LlamaForCausalLM": ("transformers.models.llama.modeling_llama", "Llama"),
    "MistralForCausalLM": ("transformers.models.mistral.modeling_mistral", "Mistral"),
    "Qwen2ForCausalLM": ("transformers.models.qwen2.modeling_qwen2", "Qwen2"),
}
_ORIGINAL: dict[tuple[type, str], object] = {}  # (class, "forward") -> the forward patch_* replaced


def _original_forward(module):
    cls = type(module)
    return _ORIGINAL.get((cls, "forward"), cls.forward)


def rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    from stackfast.ops import rms_norm
    from stackfast.ops.rms_norm import MAX_HIDDEN
    if hidden_states.shape[-1] > MAX_HIDDEN:  # the kernel refuses wider rows: Hugging Face's own
        return _original_forward(self)(self, hidden_states)
    out = rms_norm(hidden_states, self.weight, self.variance_epsilon)
    # Hugging Face returns weight * normed.to(input dtype): the promoted dtype
    return out.to(torch.promote_types(hidden_states.dtype, self.weight.dtype))


def _kernel_applies(module, hidden_states, attention_mask, cache) -> bool:
    # Qwen2 sets the window per layer on the module; Mistral in the config; Llama has none
    window = (module.sliding_window if hasattr(module, "sliding_window")
              else getattr(module.config, "sliding_window", None))
    head_dims = getattr(importlib.import_module("stackfast.ops.attention"), "HEAD_DIMS", None)
    # an empty cache (Hugging Face makes one whenever config.use_cache, training included) is
    # filled below; one holding earlier tokens (generation) needs the module's own path
    return (attention_mask is None and (cache is None or cache.get_seq_length(module.layer_idx) == 0)
            and (head_dims is None or module.head_dim in head_dims)
            and not (module.training and module.attention_dropout > 0)
            and (window is None or hidden_states.shape[1] <= window))


def attention_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                      cache=None, **kwargs):
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    if not _kernel_applies(self, hidden_states, attention_mask, cache):
        return _original_forward(self)(self, hidden_states, position_embeddings=position_embeddings,
                                       attention_mask=attention_mask, cache=cache, **kwargs)
    from stackfast.ops import attention, rope
    batch, seqlen = hidden_states.shape[:2]
    # (B, S, heads, head_dim): the flash-attn layout both kernels take
    q = self.q_proj(hidden_states).view(batch, seqlen, -1, self.head_dim)
    k = self.k_proj(hidden_states).view(batch, seqlen, -1, self.head_dim)
    v = self.v_proj(hidden_states).view(batch, seqlen, -1, self.head_dim)
    cos, sin = position_embeddings  # (B, S, head_dim)
    q, k = rope(q, k, cos, sin)
    if cache is not None:  # Hugging Face caches (B, kv_heads, S, head_dim) after RoPE
        cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
    out = attention(q, k, v, causal=True, softmax_scale=self.scaling)
    return self.o_proj(out.reshape(batch, seqlen, -1)), None


def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    from stackfast.ops import swiglu
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                      inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    if labels is None:
        return _original_forward(self)(self, input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
                                       use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from stackfast.ops import linear_cross_entropy
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    hidden = outputs.last_hidden_state  # (B, S, hidden)
    if shift_labels is None:  # Hugging Face's ForCausalLMLoss: position t predicts labels[t + 1]
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    loss = linear_cross_entropy(hidden, self.lm_head.weight, shift_labels, ignore_index=ignore_index)
    if num_items_in_batch is not None:  # a sum over this batch divided by the caller's count
        loss = loss * (shift_labels != ignore_index).sum() / num_items_in_batch
    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    extra = {name: getattr(outputs, name, None) for name in ("cache", "past_key_values") if name in fields}
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                  attentions=outputs.attentions, **extra)


def _family(cls_name: str, what: str):
    if cls_name not in SUPPORTED:
        raise ValueError(f"{what}: {cls_name} is not supported (stackfast patches "
                         f"{', '.join(SUPPORTED)}: the Llama block with RMSNorm, rotate-half RoPE and SwiGLU)")
    module_name, prefix = SUPPORTED[cls_name]
    module = importlib.import_module(module_name)
    return {getattr(module, prefix + suffix): forward for suffix, forward in (
        ("RMSNorm", rms_norm_forward), ("Attention", attention_forward), ("MLP", mlp_forward),
        ("ForCausalLM", causal_lm_forward))}


def _check_config(config, what: str) -> None:
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{what}: hidden_act {act!r} is not SwiGLU's silu")


def apply_stackfast_kernels(model: torch.nn.Module) -> torch.nn.Module:
    """Patch this LlamaForCausalLM (or MistralForCausalLM / Qwen2ForCausalLM) instance in place
    to run stackfast's RMSNorm, RoPE, attention, SwiGLU and fused linear cross-entropy; its
    parameters, buffers and state dict are unchanged. Returns the model. Any other class is
    refused with a ValueError naming it."""
    forwards = _family(type(model).__name__, "apply_stackfast_kernels")
    _check_config(model.config, "apply_stackfast_kernels")
    for module in model.modules():
        for cls, forward in forwards.items():
            if isinstance(module, cls):
                module.forward = types.MethodType(forward, module)  # an instance attribute, not a parameter
    return model


def _patch_classes(cls_name: str, undo: bool) -> None:
    for cls, forward in _family(cls_name, "patch").items():
        key = (cls, "forward")
        if undo:
            if key in _ORIGINAL:
                cls.forward = _ORIGINAL.pop(key)
        elif key not in _ORIGINAL:
            _ORIGINAL[key] = cls.forward
            cls.forward = forward


def patch_llama(undo: bool = False) -> None:
    """Patch transformers' Llama classes (every LlamaForCausalLM made afterwards, and existing
    ones) to run stackfast's kernels, as Liger's apply_liger_kernel_to_llama does; undo=True
    restores the originals. Only models with hidden_act silu should be built while patched."""
    _patch_classes("LlamaForCausalLM", undo)


def patch_mistral(undo: bool = False) -> None:
    """patch_llama for transformers' Mistral classes."""
    _patch_classes("MistralForCausalLM", undo)


def patch_qwen2(undo: bool = False) -> None:
    """patch_llama for transformers' Qwen2 classes."""
    _patch_classes("Qwen2ForCausalLM", undo)


def is_patched(model: torch.nn.Module) -> bool:
    """Whether this model's RMSNorm, attention, MLP and loss run stackfast's kernels."""
    return getattr(model.forward, "__func__", None) is causal_lm_forward

