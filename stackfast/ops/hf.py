"""stackfast's kernels in a Hugging Face `transformers` Llama (and its Mistral / Qwen2 siblings).

    model = transformers.AutoModelForCausalLM.from_pretrained(...)   # a LlamaForCausalLM
    apply_stackfast_kernels(model)          # this instance, in place; or patch_llama() for the classes
    loss = model(input_ids=x, labels=x).loss

What is replaced (forward methods only: no module, parameter or buffer is added, removed or
renamed, so the state dict and checkpoints are untouched; a patched instance holds its
forwards as functools.partial of this module's functions, so torch.save / torch.load and
deepcopy keep the patch):
- every RMSNorm: stackfast.ops.rms_norm;
- every attention: q/k/v projections, stackfast.ops.rope on q and k (the tables Hugging
  Face computed: position_ids, rope scaling and attention_scaling are honoured), then
  stackfast.ops.attention (causal, GQA, flash-attn layout, no (B, H, S, D) transposes).
  Packed inputs, marked as transformers marks them by `position_ids` restarting at 0 inside
  a row, are masked per document as transformers' flash-attention path does (a document
  begins at each position 0; the kernels skip the tiles between documents); where
  transformers builds that mask itself (SDPA without a cache: `use_cache=False`) the module's
  own forward runs, on that mask.
  The module's own forward runs instead where the kernel would not give the same result:
  an explicit attention mask (padding, or an implementation that materialises the causal
  mask, e.g. 'eager'), a KV cache holding earlier tokens (generation; an empty one is
  filled), attention dropout in training, a sliding window shorter than the sequence, or a
  head dim the attention kernel does not take (stackfast.ops.attention.HEAD_DIMS);
- every MLP: down_proj(stackfast.ops.swiglu(gate_proj(x), up_proj(x))) where the model's
  hidden_act is silu / swish; any other activation runs the module's own forward (under
  the class patch; apply_stackfast_kernels refuses such a model);
- the causal-LM loss when `labels` are given: stackfast.ops.linear_cross_entropy of the final
  hidden states and lm_head's weight with Hugging Face's label shift, ignore_index -100 and
  `num_items_in_batch` / `shift_labels` handling; the logits are then not computed and the
  output's `logits` is None (as with Liger-Kernel's fused loss); `return_dict=False` gives
  Hugging Face's positions with None for them: (loss, None, cache, ...). Without labels the unpatched forward runs, with
  every argument as it came.

Every argument reaches the code that takes it as the caller gave it: the KV cache under the
name the installed transformers uses (`cache`; `past_key_values`, which transformers 5
still accepts with a FutureWarning, and older ones' `past_key_value`), and a subclass of a
patched class (patch_llama) inherits the patch without recursion. A module whose class
overrides forward keeps its own forward.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import weakref

import torch
import torch.nn.functional as F

# architecture (the ForCausalLM class name) -> (transformers module, class name prefix)
SUPPORTED = {
    "LlamaForCausalLM": ("transformers.models.llama.modeling_llama", "Llama"),
    "MistralForCausalLM": ("transformers.models.mistral.modeling_mistral", "Mistral"),
    "Qwen2ForCausalLM": ("transformers.models.qwen2.modeling_qwen2", "Qwen2"),
}
_ORIGINAL: dict[tuple[type, str], object] = {}  # (class, "forward") -> the forward patch_* replaced
# transformers' names for the KV cache argument, newest first (4.x: past_key_value(s); 5.x: cache)
_CACHE_NAMES = ("cache", "past_key_values", "past_key_value")
# (a weak reference to the last position_ids seen, their document ids): every layer of one
# model call gets the same position_ids tensor, so the host sync of _document_ids is once per call
_LAST_DOCUMENTS: list = [None, None]


def _original_forward(module):
    """The forward the patch replaced for this module: a patched class's original, found along
    the MRO (a subclass of a patched class inherits the patched forward: its own class
    attribute would call the patch again, endlessly), else the class's own forward."""
    for cls in type(module).__mro__:
        original = _ORIGINAL.get((cls, "forward"))
        if original is not None:
            return original
    return type(module).forward


@functools.lru_cache(maxsize=None)
def _signature_names(fn) -> tuple[tuple[str, ...], str]:
    """(the parameters of fn that can be given by position, after self; the name fn takes
    the KV cache by). inspect follows functools.wraps, so the decorated forward's own."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    positional = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    names = {p.name for p in params}
    return positional, next((name for name in _CACHE_NAMES if name in names), _CACHE_NAMES[0])


def _config_problem(config) -> str | None:
    """Why the kernels cannot honour this config (None when they can)."""
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        return f"hidden_act {act!r} is not SwiGLU's silu"
    return None


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


def _document_ids(position_ids: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Document ids (batch, seqlen) of rows packed from several sequences, marked by position_ids
    restarting at 0 inside a row (a document begins at each 0); None when no row restarts."""
    if position_ids is None:
        return None
    ref, ids = _LAST_DOCUMENTS
    if ref is not None and ref() is position_ids:
        return ids
    starts = position_ids.expand(batch, -1) == 0  # sometimes (1, seqlen) for the whole batch
    ids = starts.cumsum(-1) if bool(starts[:, 1:].any()) else None  # host sync
    _LAST_DOCUMENTS[:] = [weakref.ref(position_ids), ids]
    return ids


def attention_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                      cache=None, **kwargs):
    given_as_cache = cache is not None
    if not given_as_cache:  # an older transformers' name (it stays in kwargs, for the module's own forward)
        cache = next((kwargs[name] for name in _CACHE_NAMES[1:] if kwargs.get(name) is not None), None)
    if not _kernel_applies(self, hidden_states, attention_mask, cache):
        original = _original_forward(self)
        if given_as_cache:  # under the name this transformers' forward takes it by
            kwargs[_signature_names(original)[1]] = cache
        return original(self, hidden_states, position_embeddings=position_embeddings,
                        attention_mask=attention_mask, **kwargs)
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
    out = attention(q, k, v, causal=True, softmax_scale=self.scaling,
                    document_ids=_document_ids(kwargs.get("position_ids"), batch))
    return self.o_proj(out.reshape(batch, seqlen, -1)), None


def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    # the class patch reaches every model built, whatever its activation: SwiGLU only for silu
    if _config_problem(getattr(self, "config", None)) is not None:
        return _original_forward(self)(self, x)
    from stackfast.ops import swiglu
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def causal_lm_forward(self, *args, **kwargs):
    original = _original_forward(self)
    positional, _ = _signature_names(original)
    named = dict(zip(positional, args))
    if len(args) > len(positional) or named.keys() & kwargs.keys() or {**named, **kwargs}.get("labels") is None:
        # no loss to fuse (or arguments Python refuses): Hugging Face's forward, with the
        # arguments exactly as given (a cache under either name, return_dict, ...)
        return original(self, *args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from stackfast.ops import linear_cross_entropy
    kwargs = {**named, **kwargs}
    labels = kwargs.pop("labels")
    return_dict = kwargs.pop("return_dict", None)  # as transformers' can_return_tuple: the config's by default
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    kwargs.pop("logits_to_keep", None)  # it slices the logits, which are not computed
    # the rest (the cache under whichever name it came) goes to the base model as Hugging Face's does
    outputs = self.model(**kwargs, return_dict=True)
    hidden = outputs.last_hidden_state  # (B, S, hidden)
    if shift_labels is None:  # Hugging Face's ForCausalLMLoss: position t predicts labels[t + 1]
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    loss = linear_cross_entropy(hidden, self.lm_head.weight, shift_labels, ignore_index=ignore_index)
    # No counted token (every label ignore_index): Hugging Face's mean is F.cross_entropy's 0/0 =
    # nan, its sum (with num_items_in_batch) 0; the gradients are 0 either way, which torch.where
    # keeps (whatever linear_cross_entropy returns for an empty mean). No host sync.
    count = (shift_labels != ignore_index).sum()
    if num_items_in_batch is None:
        loss = torch.where(count > 0, loss, torch.nan)
    else:  # the sum over this batch divided by the caller's count (of the whole accumulated batch)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = torch.where(count > 0, loss * count, 0.0) / num_items_in_batch
    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    extra = {name: getattr(outputs, name, None) for name in ("cache", "past_key_values") if name in fields}
    output = CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                    attentions=outputs.attentions, **extra)
    if return_dict:
        return output
    # Hugging Face's tuple is (loss, logits, cache, ...): the same positions, with None for the
    # logits that were never computed, so `out[1]` fails loudly instead of being the cache.
    return (loss, None) + output.to_tuple()[1:]


def _family(cls: type, what: str) -> str:
    """The supported ForCausalLM class name this model class is (or derives from); a
    ValueError naming any other class."""
    name = next((c.__name__ for c in cls.__mro__ if c.__name__ in SUPPORTED), None)
    if name is None:
        raise ValueError(f"{what}: {cls.__name__} is not supported (stackfast patches "
                         f"{', '.join(SUPPORTED)}: the Llama block with RMSNorm, rotate-half RoPE and SwiGLU)")
    return name


def _forwards(cls_name: str) -> dict:
    """transformers' module class -> the forward that replaces its own, for this family."""
    module_name, prefix = SUPPORTED[cls_name]
    module = importlib.import_module(module_name)
    return {getattr(module, prefix + suffix): forward for suffix, forward in (
        ("RMSNorm", rms_norm_forward), ("Attention", attention_forward), ("MLP", mlp_forward),
        ("ForCausalLM", causal_lm_forward))}


def apply_stackfast_kernels(model: torch.nn.Module) -> torch.nn.Module:
    """Patch this LlamaForCausalLM (or MistralForCausalLM / Qwen2ForCausalLM) instance in place
    to run stackfast's RMSNorm, RoPE, attention, SwiGLU and fused linear cross-entropy; its
    parameters, buffers and state dict are unchanged. Returns the model. Any other class is
    refused with a ValueError naming it, and so is a config the kernels cannot honour
    (hidden_act other than silu). A module whose class overrides forward keeps it."""
    forwards = _forwards(_family(type(model), "apply_stackfast_kernels"))
    problem = _config_problem(model.config)
    if problem is not None:
        raise ValueError(f"apply_stackfast_kernels: {problem}")
    for module in model.modules():
        for cls, forward in forwards.items():
            # a subclass with a forward of its own computes something else: it keeps its forward
            if isinstance(module, cls) and type(module).forward is cls.forward:
                # an instance attribute, not a parameter; a partial of a module-level function
                # pickles (a bound method would be looked up by name on load, and not found)
                module.forward = functools.partial(forward, module)
    return model


def _patch_classes(cls_name: str, undo: bool) -> None:
    for cls, forward in _forwards(cls_name).items():
        key = (cls, "forward")
        if undo:
            if key in _ORIGINAL:
                cls.forward = _ORIGINAL.pop(key)
        elif key not in _ORIGINAL:
            _ORIGINAL[key] = cls.forward
            cls.forward = forward


def patch_llama(undo: bool = False) -> None:
    """Patch transformers' Llama classes (every LlamaForCausalLM made afterwards, and existing
    ones, and their subclasses) to run stackfast's kernels, as Liger's apply_liger_kernel_to_llama
    does; undo=True restores the originals. Where a model's config is one the kernels cannot
    honour (hidden_act other than silu) its MLPs run Hugging Face's own forward."""
    _patch_classes("LlamaForCausalLM", undo)


def patch_mistral(undo: bool = False) -> None:
    """patch_llama for transformers' Mistral classes."""
    _patch_classes("MistralForCausalLM", undo)


def patch_qwen2(undo: bool = False) -> None:
    """patch_llama for transformers' Qwen2 classes."""
    _patch_classes("Qwen2ForCausalLM", undo)


def is_patched(model: torch.nn.Module) -> bool:
    """Whether this model's RMSNorm, attention, MLP and loss run stackfast's kernels."""
    forward = model.forward  # a partial (apply_stackfast_kernels) or a bound method (patch_llama)
    return getattr(forward, "func", getattr(forward, "__func__", None)) is causal_lm_forward

