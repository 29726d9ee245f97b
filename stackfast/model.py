"""The Llama decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, untied LM head.

Parameter names follow Hugging Face's LlamaForCausalLM with the leading "model."
dropped (`embed_tokens`, `layers.{i}.self_attn.q_proj`, ..., `norm`, `lm_head`), and RoPE
uses the same rotate-half convention, so converting to or from a Hugging Face
checkpoint is a rename. No sharding code lives here (see parallel.py).

`ModelConfig.kernels` picks the implementation of attention, RMSNorm, RoPE, SwiGLU and the
loss at run time: 'triton' calls stackfast.ops (the Triton kernels; the loss is the fused
linear cross-entropy, never holding the logits), 'torch' calls PyTorch (SDPA, F.rms_norm,
apply_rope, F.silu(gate) * up, F.cross_entropy of the full logits), 'auto' the ops on CUDA
tensors and PyTorch elsewhere. Before the kernels run, the first forward checks them on the
device (stackfast.kernel_check); an op whose kernel fails runs PyTorch instead.
"""
from __future__ import annotations

import importlib.util
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from stackfast.config import ModelConfig
from stackfast.errors import ConfigError


def use_triton(kernels: str, device: torch.device) -> bool:
    """Whether the Triton ops run for this `kernels` setting on this device."""
    return kernels == "triton" or (kernels == "auto" and device.type == "cuda")


# Ops whose Triton kernel failed the kernel self-check in this process (stackfast.kernel_check):
# they run PyTorch's path whatever `kernels` says.
TORCH_FALLBACK: set[str] = set()


def use_kernel(op: str, kernels: str, device: torch.device) -> bool:
    """Whether `op` ('attention', 'rms_norm', ...) runs its Triton kernel: use_triton, unless the
    kernel failed the self-check here."""
    return use_triton(kernels, device) and op not in TORCH_FALLBACK


def triton_ops(cfg: ModelConfig, dtype: torch.dtype) -> tuple[str, ...]:
    """The ops whose kernel a model of `cfg` computing in `dtype` runs where use_triton holds: the
    choices the forwards below make."""
    return tuple(op for op, used in [
        ("attention", cfg.kernels == "triton" or dtype != torch.float32),
        ("rms_norm", cfg.kernels == "triton" or cfg.hidden_size <= _rms_max_hidden()),
        ("rope", True), ("swiglu", True), ("linear_cross_entropy", True)] if used)


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can run on `device`: CUDA tensors, or any device under the
    interpreter (TRITON_INTERPRET=1)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def check_kernels(kernels: str, device: torch.device) -> None:
    """Refuse, before a run writes anything, a `kernels` setting that cannot run on `device`:
    'triton' needs triton, and CUDA tensors unless the interpreter (TRITON_INTERPRET=1) is on."""
    if kernels != "triton":
        return  # 'auto' and 'torch' fall back to PyTorch wherever the kernels cannot run
    if importlib.util.find_spec("triton") is None:
        raise ConfigError("model.kernels = 'triton' needs the triton package (not installed); "
                          "use 'auto' or 'torch'")
    if not triton_runs_on(device):
        raise ConfigError(f"model.kernels = 'triton' needs a CUDA device (train.device is {device.type}); "
                          "use 'auto' or 'torch' on CPU, or set TRITON_INTERPRET=1 to run the kernels "
                          "in the (slow) Triton interpreter")


def _rms_max_hidden() -> int:
    from stackfast.ops.rms_norm import MAX_HIDDEN  # lazily: importing it imports triton
    return MAX_HIDDEN


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernels: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels = kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rms_norm(x) * weight; with `residual`, returns (rms_norm(x + residual), x + residual)."""
        # 'auto' leaves rows wider than the kernel's MAX_HIDDEN to PyTorch ('triton' refuses them)
        if use_kernel("rms_norm", self.kernels, x.device) and (self.kernels == "triton"
                                                               or x.shape[-1] <= _rms_max_hidden()):
            from stackfast.ops import rms_norm
            return rms_norm(x, self.weight, self.eps, residual=residual)
        if residual is not None:
            x = x + residual
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps), x
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_seq_len, head_dim), in the rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (S, head_dim): frequencies repeated for both halves
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, seq, heads, head_dim) by position; cos/sin are (seq, head_dim), or
    (batch, seq, head_dim) when the rows have positions of their own (rope_reset)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    # (S, 1, D) or (B, S, 1, D): broadcasts over heads
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d, kv = cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.kernels = cfg.kernels

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """document_ids (B, S): each query attends only to its own document (see Transformer)."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim)
        if use_kernel("rope", self.kernels, x.device):
            from stackfast.ops import rope
            q, k = rope(q, k, cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # 'auto' leaves fp32 attention to SDPA: the kernel's exact-fp32 path (there for tests)
        # gets no tensor-core speed and outgrows an A100's shared memory at head dim 128.
        if use_kernel("attention", self.kernels, x.device) and (self.kernels == "triton" or q.dtype != torch.float32):
            from stackfast.ops import attention
            # flash-attn layout (B, S, H, D) in and out
            out = attention(q, k, v, causal=True, document_ids=document_ids)
        else:
            # SDPA wants (B, H, S, D); enable_gqa shares each kv head across its query group.
            # Documents: the causal mask and the same-document mask as one (B, 1, S, S) boolean.
            mask = None
            if document_ids is not None:
                from stackfast.ops._documents import same_document
                causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
                mask = (same_document(document_ids) & causal)[:, None]
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=self.n_heads != self.n_kv_heads)
            out = out.transpose(1, 2)
        return self.o_proj(out.reshape(B, S, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=False)
        self.kernels = cfg.kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_kernel("swiglu", self.kernels, x.device):
            from stackfast.ops import swiglu
            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.kernels)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.kernels)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        attn_out = self.self_attn(self.input_layernorm(x), cos, sin, document_ids)
        # The residual add is fused into the second norm: h = x + attn_out, normed = norm(h).
        normed, h = self.post_attention_layernorm(attn_out, residual=x)
        return h + self.mlp(normed)


@torch.no_grad()
def init_parameter(name: str, p: torch.Tensor, cfg: ModelConfig, generator: torch.Generator | None = None) -> None:
    """TinyLlama-style init of one named parameter: norm weights 1, output projections
    (o_proj, down_proj) N(0, (std / sqrt(2 * n_layers))^2), everything else N(0, std^2)."""
    if name.endswith("layernorm.weight") or name == "norm.weight":
        p.fill_(1.0)
    elif name.endswith(("o_proj.weight", "down_proj.weight")):
        p.normal_(0.0, cfg.init_std / math.sqrt(2 * cfg.n_layers), generator=generator)
    else:
        p.normal_(0.0, cfg.init_std, generator=generator)


class Transformer(nn.Module):
    """Llama-style causal language model built from a ModelConfig."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.kernels)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Buffers, not parameters: derived from the config, never trained or checkpointed.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.kernels_checked = False  # the kernel self-check runs in the first forward that uses them
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            init_parameter(name, p, self.config)

    def materialize(self, device: torch.device | str) -> "Transformer":
        """Allocate a model built under `torch.device("meta")` on `device`, weights left
        uninitialised (the caller fills them), RoPE tables computed. Skipping the random init
        matters when every weight is about to be overwritten (G_stack of a 7B model)."""
        self.to_empty(device=device)
        cfg = self.config
        with torch.device(device):
            self.rope_cos, self.rope_sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        return self

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, seq, vocab) or, with `targets`, the mean cross-entropy loss (fp32).

        document_ids (batch, seq) integers, non-decreasing in each row, mark the documents
        packed into a row (a run of equal ids is one document): attention stays inside each
        document, and with the config's rope_reset RoPE positions restart at 0 at each
        document's first token, so a packed row computes what each document alone would."""
        S = input_ids.shape[1]
        if S > self.config.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len {self.config.max_seq_len}")
        self.check_kernels_once(input_ids.device)
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]  # (S, head_dim)
        if document_ids is not None:
            if document_ids.shape != input_ids.shape:
                raise ValueError(f"document_ids must be shaped like the tokens {tuple(input_ids.shape)}, got "
                                 f"{tuple(document_ids.shape)}")
            if self.config.rope_reset:
                from stackfast.ops._documents import document_bounds
                start, _ = document_bounds(document_ids)
                position = torch.arange(S, device=input_ids.device) - start  # (B, S), from 0 in each document
                cos, sin = self.rope_cos[position], self.rope_sin[position]  # (B, S, head_dim)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, document_ids)
        h = self.norm(h)
        if targets is None:
            return self.lm_head(h)
        if use_kernel("linear_cross_entropy", self.config.kernels, h.device):
            # chunk by chunk: the (tokens x vocab) logits are never held
            from stackfast.ops import linear_cross_entropy
            return linear_cross_entropy(h, self.lm_head.weight, targets, use_kernel=True)
        return F.cross_entropy(self.lm_head(h).flatten(0, 1).float(), targets.flatten())

    @torch.compiler.disable
    def check_kernels_once(self, device: torch.device) -> None:
        """In the first forward that runs the Triton kernels: check them on this device at the
        compute dtype (autocast's, else the weights'), once per GPU, driver and versions (cached);
        ops whose kernel fails join TORCH_FALLBACK. STACKFAST_KERNEL_CHECK=0 skips it."""
        if self.kernels_checked or not use_triton(self.config.kernels, device):
            return
        self.kernels_checked = True
        from stackfast import kernel_check
        if not kernel_check.enabled():
            return
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else self.embed_tokens.weight.dtype)
        ops = tuple(op for op in triton_ops(self.config, dtype) if op not in TORCH_FALLBACK)  # said once
        TORCH_FALLBACK.update(kernel_check.failed_ops(kernel_check.Shapes.of(self.config, dtype), device, ops))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
