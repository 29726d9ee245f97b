"""The run configuration: one typed dataclass tree, loaded from TOML, overridable from the CLI.

A config file has one TOML table per section (`[model]`, `[data]`, `[optim]`,
`[schedule]`, `[growth]`, `[parallel]`, `[checkpoint]`, `[logging]`, `[train]`); every
field has a default, so an empty file is a valid (toy) run. `--set section.key=value`
overrides a field after the file is read. `[model] preset = "7b"` starts the model
section from a named preset (PRESETS) and lets the other keys in the table override it.

Every field carries its documentation in `field(metadata={"doc": ...})`, printed by
`describe()`. Anything wrong (unknown key, wrong type, inconsistent shape, a
non-positive length or rate) raises ConfigError with one line naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from stackfast.errors import ConfigError, StackfastError  # noqa: F401 - imported from here across the package
from stackfast.growth_operators import OPERATORS, operators_where




def doc(text: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with its documentation attached (shown by `describe()`)."""
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    """Shape of the Llama decoder (RMSNorm, RoPE, SwiGLU, GQA, untied LM head)."""
    preset: str = doc("Named preset the other model keys start from ('' = none); see PRESETS.", "")
    vocab_size: int = doc("Vocabulary size (rows of the embedding and the LM head).", 4096)
    n_layers: int = doc("Number of transformer blocks.", 8)
    hidden_size: int = doc("Model width d.", 256)
    n_heads: int = doc("Attention (query) heads; must divide hidden_size.", 4)
    n_kv_heads: int = doc("Key/value heads for grouped-query attention; must divide n_heads.", 4)
    ffn_size: int = doc("Hidden size of the SwiGLU feed-forward block.", 688)
    max_seq_len: int = doc("Longest sequence the RoPE tables cover.", 2048)
    rope_theta: float = doc("RoPE base frequency.", 10000.0)
    norm_eps: float = doc("RMSNorm epsilon.", 1e-5)
    init_std: float = doc("Std of the normal init (TinyLlama: 0.02); output projections get "
                          "init_std / sqrt(2 * n_layers).", 0.02)
    kernels: str = doc("'auto' (Triton ops on GPU, except fp32 attention; PyTorch on CPU), 'triton' or 'torch'.",
                       "auto")
    rope_reset: bool = doc("Restart the RoPE positions at 0 at each document of a row (needs data.document_mask).",
                           False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        """The model of a named preset (e.g. '7b', '7b-small', 'toy'), with overrides."""
        if name not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {name!r}{_suggest(name, PRESETS)}; "
                              f"known: {', '.join(PRESETS)}")
        cfg = cls(preset=name, **{**PRESETS[name], **overrides})
        cfg.validate()
        return cfg

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count (analytic, equals the built model's)."""
        d, f, L = self.hidden_size, self.ffn_size, self.n_layers
        kv = self.n_kv_heads * self.head_dim
        per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
        head = self.vocab_size * d
        return L * per_layer + d + head + (self.vocab_size * d if embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward).

        Convention (docs/design.md, "MFU convention"): 6 * (non-embedding weights + LM head) plus
        6 * n_layers * hidden * seq_len for attention scores and values, which is the
        12*L*d*S of full attention counted at half because the mask is causal.
        """
        return 6.0 * self.num_params(embeddings=False) + 6.0 * self.n_layers * self.hidden_size * seq_len

    def validate(self) -> None:
        _positive(self, "model", ["vocab_size", "n_layers", "hidden_size", "n_heads", "n_kv_heads",
                                  "ffn_size", "max_seq_len", "rope_theta", "norm_eps", "init_std"])
        if self.hidden_size % self.n_heads:
            raise ConfigError(f"model.n_heads: {self.n_heads} heads do not divide hidden_size "
                              f"{self.hidden_size}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_kv_heads: {self.n_kv_heads} kv heads do not divide "
                              f"n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"model.n_heads: head_dim {self.head_dim} must be even for RoPE")
        _choice(self, "model", "kernels", ("auto", "triton", "torch"))


@dataclass
class DataSource:
    """One dataset of a mixture (an element of `data.sources`)."""
    path: str = doc("Its folder, as data.path: written by `stackfast tokenize`, or a built-in corpus.", "")
    weight: float = doc("Its share of the training rows (the weights are normalised to sum to 1).", 1.0)
    name: str = doc("Its name in metrics (val_loss/NAME, epochs/NAME) and messages; '' = the folder's name.", "")


@dataclass
class DataConfig:
    """Where training tokens come from."""
    path: str = doc("A folder written by `stackfast tokenize`, or 'builtin:python-stdlib' "
                    "(the running Python's standard library source, BPE vocab 4096, cached) or "
                    "'builtin:python-stdlib-bytes' (the same, byte-level: vocab 256).",
                    "builtin:python-stdlib")
    tokenizer: str = doc("Expected tokenizer: '' accepts the data's own; 'bytes', a tokenizer.json "
                         "or a SentencePiece .model must match the one the shards were made with.", "")
    seq_len: int = doc("Tokens per training sequence.", 256)
    val_fraction: float = doc("Fraction of the built-in corpus held out for validation "
                              "(tokenized folders carry their own split).", 0.01)
    sources: list[DataSource] = doc("A mixture of datasets instead of data.path (empty: data.path alone), e.g. "
                                    "sources = [{path = \"data/web\", weight = 0.7}, {path = \"data/code\", "
                                    "weight = 0.3}]: the rows are shared among the sources by the weights. "
                                    "The sources must share one tokenizer; each is validated on its own held-out "
                                    "split (docs/data.md, \"Mixtures of datasets\").", default_factory=list)
    max_epochs: float = doc("A run that would read a source more than this many times over says so at its "
                            "start (a warning, not an error).", 4.0)
    sampling: str = doc("Which windows the rows read: 'epoch' (every window of each source once per epoch, in a "
                        "new order each epoch; a mixture's sources hold their weights within one row), 'random' "
                        "(windows drawn with replacement: runs made before 'epoch') or 'auto': 'epoch' for a new "
                        "run, and a resumed run keeps the sampling it started with (docs/data.md, \"Sampling\").",
                        "auto")
    document_mask: bool = doc("Give each row's tokens their document ids (a new document after each end-of-text "
                              "token) so that attention never crosses documents; needs a tokenizer with an "
                              "end-of-text token (not 'bytes').", False)

    def validate(self) -> None:
        _positive(self, "data", ["seq_len", "max_epochs"])
        _choice(self, "data", "sampling", ("auto", "epoch", "random"))
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"data.val_fraction: must be in (0, 0.5), got {self.val_fraction}")
        # data.path keeps its default beside sources (config_from_dict refuses it set, even to the default)
        default_path = next(f.default for f in dataclasses.fields(self) if f.name == "path")
        if self.sources and self.path != default_path:
            raise ConfigError(f"data.sources: set together with data.path ({self.path!r}); a run reads data.path "
                              f"alone or the mixture of data.sources: remove one of them")
        if not self.sources and not self.path:
            raise ConfigError("data.path: must not be empty (a dataset folder, or a mixture in data.sources)")
        for i, source in enumerate(self.sources):
            if not source.path:
                raise ConfigError(f"data.sources[{i}].path: must not be empty")
            if not source.weight > 0:
                raise ConfigError(f"data.sources[{i}].weight: must be positive, got {source.weight}")
        total = sum(s.weight for s in self.sources)
        if not math.isfinite(total):
            raise ConfigError(f"data.sources: the weights sum to {total} (too large for a float); use shares such as "
                              f"0.7 and 0.3")
        for i, source in enumerate(self.mixture() if self.sources else []):
            if not source.weight > 0:
                raise ConfigError(f"data.sources[{i}].weight: {self.sources[i].weight} is 0 beside the others' sum "
                                  f"{total:g}; use shares such as 0.7 and 0.3")
        names = [s.name for s in self.mixture()]
        for i, name in enumerate(names if self.sources else []):
            if not name:
                raise ConfigError(f"data.sources[{i}].name: empty, and the path {self.sources[i].path!r} has no "
                                  f"folder name to take")
            if names.index(name) != i:
                raise ConfigError(f"data.sources[{i}].name: {name!r} is data.sources[{names.index(name)}]'s name "
                                  f"too; give each source a name of its own")

    def mixture(self) -> list[DataSource]:
        """The run's datasets, names filled in and weights normalised to sum to 1: data.sources,
        or data.path alone (weight 1)."""
        sources = self.sources or [DataSource(self.path)]
        total = sum(s.weight for s in sources)
        # the default name: the folder's ('data/web/' -> 'web'), a built-in corpus's without 'builtin:'
        return [DataSource(s.path, s.weight / total, s.name or Path(s.path.removeprefix("builtin:")).name)
                for s in sources]


@dataclass
class OptimConfig:
    """AdamW (fused, on CPU and GPU) with decoupled weight decay and gradient clipping."""
    lr: float = doc("Peak learning rate.", 1e-3)
    weight_decay: float = doc("AdamW weight decay on matrices (norm weights are not decayed).", 0.1)
    beta1: float = doc("AdamW beta1.", 0.9)
    beta2: float = doc("AdamW beta2.", 0.95)
    eps: float = doc("AdamW epsilon.", 1e-8)
    grad_clip: float = doc("Clip the global gradient norm to this (0 = no clipping).", 1.0)

    def validate(self) -> None:
        _positive(self, "optim", ["lr", "eps"])
        _non_negative(self, "optim", ["weight_decay", "grad_clip"])
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optim.{name}: must be in [0, 1), got {getattr(self, name)}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then cosine decay or warmup-stable-decay to a floor."""
    kind: str = doc("'cosine' (down from the peak along half a cosine) or 'wsd' (warmup-stable-decay: the peak "
                    "until the last decay_share of the steps, then down; the strongest baseline in the study).",
                    "cosine")
    warmup_steps: int = doc("Linear warmup steps from 0 to optim.lr.", 20)
    min_lr_ratio: float = doc("The schedule ends at optim.lr * min_lr_ratio (paper: 0.1).", 0.1)
    decay_share: float = doc("wsd: the share of the steps (of each stage, with growth.schedule = 'restart') "
                             "spent decaying.", 0.2)
    decay_shape: str = doc("wsd: the decay's shape, 'linear' or '1-sqrt'.", "linear")

    def validate(self) -> None:
        _non_negative(self, "schedule", ["warmup_steps"])
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"schedule.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        _choice(self, "schedule", "kind", ("cosine", "wsd"))
        _choice(self, "schedule", "decay_shape", ("linear", "1-sqrt"))
        if not 0.0 < self.decay_share <= 1.0:
            raise ConfigError(f"schedule.decay_share: must be in (0, 1], got {self.decay_share}")


@dataclass
class TrainConfig:
    """Budget, batch and device of the run."""
    total_tokens: int = doc("Training budget in tokens; steps = ceil(total_tokens / tokens per step).",
                            2_000_000)
    max_steps: int = doc("If > 0, the number of optimizer steps (overrides total_tokens).", 0)
    global_batch_size: int = doc("Sequences per optimizer step, over all processes together: the batch of the "
                                 "run, the same at any number of processes (tokens per step = global_batch_size "
                                 "* data.seq_len). Each process takes global_batch_size / processes of them.", 16)
    micro_batch_size: int = doc("The memory knob: at most this many sequences per forward/backward on a process; "
                                "a process's share of the global batch runs as gradient-accumulated "
                                "micro-batches of this size. 0 = the whole share in one pass.", 0)
    seed: int = doc("Seed of the model init and the data order.", 1234)
    device: str = doc("'auto' (CUDA if present, else CPU), 'cpu', 'cuda' or 'cuda:N'.", "auto")
    dtype: str = doc("Compute dtype: 'auto' (bf16 autocast on GPU, fp32 on CPU), 'bf16' or 'fp32'. "
                     "Master weights and optimizer state stay fp32.", "auto")
    eval_every: int = doc("Validate every this many steps (and at the end); 0 = only at the end.", 100)
    eval_batches: int = doc("Validation covers this many global batches of held-out sequences "
                            "(eval_batches * global_batch_size, or the whole split if smaller).", 8)
    peak_tflops: float = doc("Peak dense TFLOP/s for MFU; 0 = known GPU's bf16 peak, MFU null on CPU.", 0.0)
    max_bad_steps: int = doc("A step whose loss or gradient norm is not finite is skipped (no update); "
                             "after this many in a row the run stops with an error.", 5)
    float8: str = doc("float8 training through torchao (`pip install 'stackfast[float8]'`): 'none', 'tensorwise' "
                      "(one scale per tensor; the faster) or 'rowwise' (one per row; the more accurate). The "
                      "transformer blocks' linears with dims that are multiples of 16 compute their matmuls in "
                      "float8 (not the embedding or the LM head; layers added by growth too); master weights, "
                      "optimizer and checkpoints are unchanged. Needs an sm_89+ GPU (H100/H200); under torchrun "
                      "'tensorwise' also all-gathers weights in float8. On CPU it is emulated: float8 numerics, "
                      "slower than 'none', for tests.", "none")

    def validate(self) -> None:
        _positive(self, "train", ["total_tokens", "global_batch_size", "eval_batches", "max_bad_steps"])
        _non_negative(self, "train", ["max_steps", "micro_batch_size", "eval_every", "peak_tflops"])
        _choice(self, "train", "dtype", ("auto", "bf16", "fp32"))
        _choice(self, "train", "float8", ("none", "tensorwise", "rowwise"))
        check_device(self.device, "train.device")


def check_device(name: str, key: str) -> None:
    """Refuse a device name other than 'auto', 'cpu', 'cuda' or 'cuda:N' (N a GPU index)."""
    if not (name in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:[0-9]+", name)):
        raise ConfigError(f"{key}: expected 'auto', 'cpu', 'cuda' or 'cuda:N' (N a GPU index), got {name!r}")


LAYER_CHOICES = ("all", "front", "middle", "back", "midas")


@dataclass
class GrowthStage:
    """One growth event of a multi-stage run (`[[growth.stages]]`); factor, layers and block
    left out take [growth]'s values."""
    at: int | float | str = doc("When: a token count (an integer), a fraction of the run's tokens (a number "
                                "in (0, 1)), or 'prop' (every stage: Prop-alpha stage lengths, "
                                "growth.prop_alpha).", "")
    factor: int = doc("This stage's growth factor (0 = growth.factor).", 0)
    layers: str = doc("stack: the layers this stage repeats ('' = growth.layers; 'midas': one copy of the middle "
                      "block, no factor).", "")
    block: int = doc("stack: how many layers the partial modes repeat (-1 = growth.block).", -1)


@dataclass
class GrowthConfig:
    """Growth inside the running job: train the small model, grow it, train the grown one.

    [model] describes the *target*; with an operator set, the job starts from the small
    model that the operator grows into it (depth: n_layers / factor layers; width: hidden,
    FFN and heads / sqrt(factor)); with several stages, from the model that all of them
    grow into it, one after another.
    """
    operator: str = doc("'none' (train [model] from scratch) or an operator: " + ", ".join(OPERATORS) + ".",
                        "none")
    factor: int = doc("Growth factor g (paper: 4).", 4)
    at_tokens: int | str = doc("Grow after this many tokens, or 'auto' for the paper's timing formula "
                               "(growth_timing of the target size and the run's total FLOPs).", "auto")
    stages: list[GrowthStage] = doc("Several growth events (empty: one, from factor and at_tokens), e.g. two "
                                    "doublings: stages = [{at = 0.1, factor = 2}, {at = 0.3, factor = 2}]. "
                                    "Each grows the model before it; [model] is the last one's result.",
                                    default_factory=list)
    prop_alpha: float = doc("Stages at 'prop': stage k of K trains for a share of the run's tokens proportional "
                            "to k ** prop_alpha (MIDAS's Prop-alpha; 1: lengths 1 : 2 : 3 ...).", 1.0)
    optimizer: str = doc("'reset' (fresh AdamW, the paper's choice) or 'replicate' (copy the Adam moments along "
                         "with the layers; " + " and ".join(operators_where("copies_layers")) + " only).", "reset")
    schedule: str = doc("'paper' (as the paper's code runs it: the small model on the first steps of a long "
                        "schedule, so it grows near its peak LR (growth.small_warmup, growth.small_horizon); each "
                        "grown model a fresh warmup and the [schedule] over its stage), 'restart' (every model, the "
                        "small one too, a complete schedule of its own over its stage: the small model grows at "
                        "the floor) or 'continue' (one schedule over the whole run, growth events included).",
                        "paper")
    small_horizon: float = doc("schedule 'paper': the long schedule the small model starts, as a multiple of its "
                               "stage (paper: a 300,000-step cosine, stacked at step 5,000: 60).", 60.0)
    small_warmup: float = doc("schedule 'paper': the small model's warmup as a share of its stage (paper: 3,000 "
                              "of 5,000 steps: 0.6).", 0.6)
    small_lr: float = doc("Peak LR of the first (smallest) model (paper: 1e-3); 0 = optim.lr.", 0.0)
    layers: str = doc("G_stack layers to repeat: 'all' (paper's best), 'front', 'middle', 'back' (a window of "
                      "`block` layers repeated so the depth grows by the factor), or 'midas' (MIDAS, Saunshi et "
                      "al. 2024: one copy of the middle block of `block` layers, no factor: each stage adds "
                      "`block` layers, e.g. 2-4-6-8).", "all")
    block: int = doc("G_stack with layers front/middle/back: how many layers are repeated (0 = half of them); "
                     "with 'midas': the block size b (every stage's model is a whole number of blocks).", 0)
    order: str = doc("G_stack order: 'stack' (0 1 .. n-1 0 1 ..) or 'interpolate' (0 0 1 1 ..).", "stack")
    noise: float = doc("Noise alpha of stack and width_direct: W <- (1 - alpha) W + alpha * eps (paper: 0.2 "
                       "helps G_stack slightly; width_direct: a small alpha, e.g. 0.01, lets copied units diverge).",
                       0.0)
    ramp_steps: int = doc(" / ".join(operators_where("ramp")) + ": steps over which new parts fade in.", 100)
    learn_steps: int = doc(" / ".join(operators_where("learns")) + ": steps training the LiGO expansion.", 100)

    def validate(self) -> None:
        _choice(self, "growth", "operator", ("none", *OPERATORS))
        if self.factor < 2:
            raise ConfigError(f"growth.factor: must be an integer >= 2, got {self.factor}")
        if isinstance(self.at_tokens, str) and self.at_tokens != "auto":
            raise ConfigError(f"growth.at_tokens: expected a token count or 'auto', got {self.at_tokens!r}")
        if isinstance(self.at_tokens, int) and self.at_tokens < 0:
            raise ConfigError(f"growth.at_tokens: must be >= 0, got {self.at_tokens}")
        _choice(self, "growth", "optimizer", ("reset", "replicate"))
        _choice(self, "growth", "schedule", ("paper", "restart", "continue"))
        if self.small_horizon < 1.0:
            raise ConfigError(f"growth.small_horizon: the long schedule spans at least the small model's stage "
                              f"(>= 1), got {self.small_horizon}")
        if not 0.0 <= self.small_warmup <= 1.0:
            raise ConfigError(f"growth.small_warmup: a share of the small model's stage, in [0, 1], got "
                              f"{self.small_warmup}")
        _choice(self, "growth", "layers", LAYER_CHOICES)
        _choice(self, "growth", "order", ("stack", "interpolate"))
        _non_negative(self, "growth", ["small_lr", "noise", "learn_steps", "block", "prop_alpha"])
        _positive(self, "growth", ["ramp_steps"])
        if self.optimizer == "replicate" and self.operator != "none" and not OPERATORS[self.operator].copies_layers:
            raise ConfigError(f"growth.optimizer: 'replicate' needs a copying operator "
                              f"({', '.join(operators_where('copies_layers'))}), not {self.operator!r}")
        self._validate_stages()

    def _validate_stages(self) -> None:
        if not self.stages:
            return
        if self.operator == "none":
            raise ConfigError("growth.stages: set growth.operator (the operator every stage grows with)")
        spec = OPERATORS[self.operator]
        if len(self.stages) > 1 and (spec.ramp or spec.learns):
            raise ConfigError(f"growth.stages: {self.operator!r} takes one stage (its fade-in or learned expansion "
                              f"is a single event); several stages grow with "
                              f"{', '.join(n for n, s in OPERATORS.items() if not (s.ramp or s.learns))}")
        prop = [isinstance(s.at, str) and s.at == "prop" for s in self.stages]
        if any(prop) and not all(prop):
            raise ConfigError("growth.stages: 'prop' sets every stage's length: give it to all stages or none")
        for i, stage in enumerate(self.stages):
            key = f"growth.stages[{i}]"
            at = stage.at
            if isinstance(at, str) and at != "prop":
                raise ConfigError(f"{key}.at: expected a token count, a fraction in (0, 1) or 'prop', got {at!r}"
                                  + (" (every stage needs one)" if at == "" else ""))
            if isinstance(at, int) and at < 0:
                raise ConfigError(f"{key}.at: a token count must be >= 0, got {at}")
            if isinstance(at, float) and not 0.0 < at < 1.0:
                raise ConfigError(f"{key}.at: a fraction of the run must be in (0, 1), got {at}"
                                  + (f"; for a token count write an integer (at = {int(at)})"
                                     if at.is_integer() else ""))
            if stage.factor == 1 or stage.factor < 0:
                raise ConfigError(f"{key}.factor: must be an integer >= 2 (0: growth.factor), got {stage.factor}")
            if (stage.layers or self.layers) == "midas" and stage.factor:
                raise ConfigError(f"{key}.factor: a 'midas' stage adds one copy of the middle block (the block "
                                  f"size sets its depth); leave factor out")
            _choice(stage, key, "layers", ("", *LAYER_CHOICES))
            if stage.block < -1:
                raise ConfigError(f"{key}.block: must be >= 0 (-1: growth.block), got {stage.block}")
            if (stage.layers or stage.block != -1) and "layers" not in spec.accepted_options():
                raise ConfigError(f"{key}: layers and block choose what G_stack repeats; {self.operator!r} "
                                  f"takes neither")


@dataclass
class ParallelConfig:
    """How the model is wrapped for speed and memory."""
    compile: bool = doc("torch.compile each transformer block.", False)
    activation_checkpointing: str = doc("'none', 'full' (recompute each block in backward) or 'selective' "
                                        "(every other block: half the saving for half the recompute).", "none")
    reshard_after_forward: bool = doc("FSDP (under torchrun): free each block's gathered parameters after its "
                                      "forward and gather them again for backward (less memory, more "
                                      "communication); false keeps them until backward.", True)
    defer_grad_sync: bool = doc("FSDP with grad_accum_steps > 1: reduce gradients only after the last "
                                "micro-batch of a step (less communication; each process holds unsharded "
                                "gradients meanwhile); false reduces after every micro-batch.", True)
    replicate_degree: int = doc("HSDP under torchrun. 1 = FSDP: every parameter sharded over all processes. N > 1: "
                                "N groups of world_size / N consecutive ranks, each holding a full copy of the model "
                                "state sharded within the group (N must divide the number of processes). Multi-node "
                                "jobs: set it to the number of nodes, so parameter all-gathers and gradient "
                                "reduce-scatters stay inside a node (NVLink) and only the gradient all-reduce, "
                                "once per step, crosses the network; the cost is memory: each node holds all "
                                "weights, gradients and optimizer state, sharded over its own GPUs only. Same "
                                "losses at any setting; a checkpoint resumes under any other.", 1)

    def validate(self) -> None:
        _choice(self, "parallel", "activation_checkpointing", ("none", "full", "selective"))
        _positive(self, "parallel", ["replicate_degree"])


@dataclass
class CheckpointConfig:
    """Saving and resuming."""
    every_steps: int = doc("Save every this many steps (and at the end); 0 = only at the end.", 0)
    keep_last: int = doc("Keep this many newest checkpoints; older ones are deleted.", 2)
    async_save: bool = doc("Write checkpoints in the background: at a checkpoint step the loop waits only while "
                           "every process copies its model and optimizer shards to host memory, then trains on "
                           "while a thread writes, hashes and renames the checkpoint (one in flight at most: the "
                           "next save waits for it; the last checkpoint, and one for a stop signal, are written "
                           "at once). The same files and the same atomic rename as without it; costs one host "
                           "copy of each process's state (pinned on GPU). Recommended on GPU for large models; "
                           "not yet measured on a GPU. On 2 CPU cores, a 134M model (1.6 GB checkpoints): the "
                           "stall went from 6.7 s to 0.32 s, the run losing about 1.8 s a save with the writer "
                           "sharing the cores (benchmarks/results/checkpoint_stall-cpu.json).", False)
    resume: str = doc("'' (fresh run), 'auto' (newest complete checkpoint in the run dir, if any) "
                      "or a checkpoint folder.", "")
    init_from: str = doc("Start from these weights (a checkpoint folder) with a fresh optimizer.", "")
    allow_unverified: bool = doc("Load a checkpoint or weights folder that has no checksums.json (resume, "
                                 "init_from): a changed or corrupt file then goes unnoticed.", False)
    allow_changes: str = doc("Resume: comma-separated settings that may differ from the checkpoint's although "
                             "they change the run (model, data, growth, train.global_batch_size, train.seed), "
                             "e.g. 'data.path' to continue on new data.", "")

    def validate(self) -> None:
        _positive(self, "checkpoint", ["keep_last"])
        _non_negative(self, "checkpoint", ["every_steps"])


@dataclass
class LoggingConfig:
    """Where logs go and how often."""
    run_dir: str = doc("Run folder: metrics.jsonl, config.toml, checkpoints/. A fresh run refuses one that "
                       "holds a run's checkpoints or metrics (resume it, or set overwrite).", "runs/toy")
    overwrite: bool = doc("Start a fresh run in a run folder that holds another run: its checkpoints, metrics, "
                          "config and TensorBoard events are deleted first (`stackfast train --force`).", False)
    log_every: int = doc("Write metrics (one host sync) every this many steps.", 10)
    tensorboard: bool = doc("Also write TensorBoard events when tensorboard is installed.", True)
    progress: bool = doc("Show a live progress line.", True)

    def validate(self) -> None:
        _positive(self, "logging", ["log_every"])
        if not self.run_dir:
            raise ConfigError("logging.run_dir: must not be empty")


@dataclass
class Config:
    """A whole run."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        if self.model.rope_reset and not self.data.document_mask:
            raise ConfigError("model.rope_reset: restarts positions at each document, which needs "
                              "data.document_mask = true")
        self.batch_split(1)  # a split that fails on one process fails on any number
        self.allowed_changes()
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len: {self.data.seq_len} exceeds model.max_seq_len "
                              f"{self.model.max_seq_len}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Every field as 'section.key': value."""
        return {f"{section}.{key}": value for section, values in self.to_dict().items() for key, value in values.items()}

    def allowed_changes(self) -> set[str]:
        """checkpoint.allow_changes as a set of 'section.key' or 'section' names (checked to exist)."""
        items = {item.strip() for item in self.checkpoint.allow_changes.split(",") if item.strip()}
        unknown = sorted(i for i in items if i not in self.flat() and i not in SECTIONS)
        if unknown:
            raise ConfigError(f"checkpoint.allow_changes: {', '.join(unknown)} is not a setting (expected "
                              f"section.key names such as data.path, comma-separated)")
        return items

    def to_toml(self) -> str:
        tree = self.to_dict()
        if self.data.sources:  # data.path is unset beside a mixture: writing it would set it
            del tree["data"]["path"]
        return dumps_toml(tree)

    def tokens_per_step(self) -> int:
        return self.train.global_batch_size * self.data.seq_len

    def total_steps(self) -> int:
        if self.train.max_steps > 0:
            return self.train.max_steps
        return max(1, math.ceil(self.train.total_tokens / self.tokens_per_step()))

    def batch_split(self, world_size: int) -> tuple[int, int]:
        """(micro-batch rows, micro-batches per step) of each process: its share of the
        global batch, in micro-batches of at most train.micro_batch_size rows."""
        t = self.train
        if t.global_batch_size % world_size:
            raise ConfigError(f"train.global_batch_size: {t.global_batch_size} sequences do not split evenly over "
                              f"{world_size} processes")
        share = t.global_batch_size // world_size
        micro = min(t.micro_batch_size or share, share)
        if share % micro:
            raise ConfigError(f"train.micro_batch_size: {micro} does not divide a process's share of the global "
                              f"batch ({t.global_batch_size} / {world_size} processes = {share} sequences)")
        return micro, share // micro


# --------------------------------------------------------------------------------------
# Presets: the paper's sizes (docs/method.md "Settings"), their g = 4 small models, toy sizes
# --------------------------------------------------------------------------------------

_LLAMA = dict(vocab_size=32000, max_seq_len=2048, norm_eps=1e-5)
PRESETS: dict[str, dict] = {
    "410m": dict(_LLAMA, n_layers=24, hidden_size=1024, n_heads=16, n_kv_heads=1, ffn_size=4096),
    "410m-small": dict(_LLAMA, n_layers=6, hidden_size=1024, n_heads=16, n_kv_heads=1, ffn_size=4096),
    "1.1b": dict(_LLAMA, n_layers=24, hidden_size=2048, n_heads=32, n_kv_heads=32, ffn_size=5632),
    "1.1b-small": dict(_LLAMA, n_layers=6, hidden_size=2048, n_heads=32, n_kv_heads=32, ffn_size=5632),
    "3b": dict(_LLAMA, n_layers=32, hidden_size=2560, n_heads=20, n_kv_heads=4, ffn_size=7040),
    "3b-small": dict(_LLAMA, n_layers=8, hidden_size=2560, n_heads=20, n_kv_heads=4, ffn_size=7040),
    "7b": dict(_LLAMA, n_layers=32, hidden_size=4096, n_heads=32, n_kv_heads=8, ffn_size=11008),
    "7b-small": dict(_LLAMA, n_layers=8, hidden_size=4096, n_heads=32, n_kv_heads=8, ffn_size=11008),
    # TinyLlama's shape, the throughput benchmark's 1.1B (issue 7; docs/design.md, reference figures).
    "tinyllama-1.1b": dict(_LLAMA, n_layers=22, hidden_size=2048, n_heads=32, n_kv_heads=4, ffn_size=5632),
    # CPU sizes: the pilot of docs/method.md (2 -> 8 layers, hidden 256, vocab 4096).
    "toy": dict(vocab_size=4096, n_layers=8, hidden_size=256, n_heads=4, n_kv_heads=4, ffn_size=688,
                max_seq_len=1024),
    "toy-small": dict(vocab_size=4096, n_layers=2, hidden_size=256, n_heads=4, n_kv_heads=4, ffn_size=688,
                      max_seq_len=1024),
    "tiny": dict(vocab_size=4096, n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, ffn_size=176,
                 max_seq_len=256),
}

# Peak learning rates of the paper's targets (docs/method.md); used by the shipped configs.
PAPER_LR = {"410m": 6e-4, "1.1b": 3e-4, "3b": 1.6e-4, "7b": 1e-4}


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
# Settings of earlier versions, with what replaces them.
REMOVED = {"train.grad_accum_steps": "set train.global_batch_size (sequences per step over all processes); the "
                                     "micro-batches per step follow from it and train.micro_batch_size"}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or start from defaults), apply `section.key=value` overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder, not a config file")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = tomllib.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start}); TOML is UTF-8") \
                from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    for item in overrides or []:
        _apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict) -> Config:
    """Build and validate a Config from nested dicts (unknown keys and wrong types are errors)."""
    sections = {}
    hints = get_type_hints(Config)
    for name, value in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"{name}: unknown config section{_suggest(name, SECTIONS)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a table of keys, got {type(value).__name__}")
        sections[name] = value
    if "path" in sections.get("data", {}) and sections["data"].get("sources"):
        raise ConfigError(f"data.sources: set together with data.path ({sections['data']['path']!r}); a run reads "
                          f"data.path alone or the mixture of data.sources: remove one of them")
    built = {}
    for name, cls in hints.items():
        values = dict(sections.get(name, {}))
        base = {}
        if cls is ModelConfig and values.get("preset"):
            preset = values["preset"]
            if not isinstance(preset, str) or preset not in PRESETS:
                raise ConfigError(f"model.preset: unknown preset {preset!r}"
                                  f"{_suggest(str(preset), PRESETS)}; known: {', '.join(PRESETS)}")
            base = dict(PRESETS[preset])
        built[name] = _build_section(name, cls, {**base, **values})
    return Config(**built).validate()


def saved_config(raw: dict) -> Config:
    """The config of a run as its config.toml holds it (a checkpoint's, a run folder's), written
    by this version or an earlier one, read as it was meant: without data.sampling (earlier
    versions), 'random', their only sampling; data.path beside data.sources, the default that
    earlier versions wrote there."""
    data = dict(raw.get("data", {}))
    data.setdefault("sampling", "random")
    if data.get("sources"):
        data.pop("path", None)
    return config_from_dict({**raw, "data": data})


def _build_section(section: str, cls: type, values: dict):
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if f"{section}.{key}" in REMOVED:
            raise ConfigError(f"{section}.{key}: no longer a setting; {REMOVED[f'{section}.{key}']}")
        if key not in hints:
            raise ConfigError(f"{section}.{key}: unknown key{_suggest(key, hints)}")
        kwargs[key] = _coerce(f"{section}.{key}", hints[key], value)
    return cls(**kwargs)


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def _coerce(key: str, typ: Any, value: Any):
    if isinstance(typ, types.UnionType):  # e.g. int | str: the first member that accepts the value
        members = typ.__args__
        if isinstance(value, float) and float in members:  # 1.0 is a float (growth.stages' at: a fraction)
            members = (float, *[m for m in members if m is not float])
        for member in members:
            try:
                return _coerce(key, member, value)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {typ}, got {type(value).__name__} {value!r}")
    if get_origin(typ) is list:  # a list of tables, e.g. growth.stages: each built as a section of its own
        (item,) = get_args(typ)
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(f"{key}: expected a list of tables ([{{key = value, ...}}, ...]), got {value!r}")
        return [_build_section(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    # TOML gives int/float/bool/str; accept an int where a float is expected (lr = 1),
    # never a bool where a number is expected (bool is a subclass of int in Python).
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, float) and value.is_integer():  # 2e6 written in float notation
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if not INT64_MIN <= value <= INT64_MAX:  # a config.toml must be readable by any TOML reader
                raise ConfigError(f"{key}: {value} is beyond TOML's 64-bit integer range")
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # TOML and --set accept inf and nan; no setting means them
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {typ.__name__}, got {type(value).__name__} {value!r}")


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: the key must look like section.key")
    section, key = parts
    if section not in SECTIONS:
        raise ConfigError(f"{section}: unknown config section{_suggest(section, SECTIONS)}")
    raw.setdefault(section, {})[key] = parse_value(text.strip())


def parse_value(text: str) -> Any:
    """A TOML value (`4`, `1e-3`, `true`, `"x"`); anything else is taken as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _positive(obj, section: str, names: list[str]) -> None:
    for name in names:
        if not getattr(obj, name) > 0:
            raise ConfigError(f"{section}.{name}: must be positive, got {getattr(obj, name)}")


def _non_negative(obj, section: str, names: list[str]) -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise ConfigError(f"{section}.{name}: must be >= 0, got {getattr(obj, name)}")


def _choice(obj, section: str, name: str, choices: tuple) -> None:
    if getattr(obj, name) not in choices:
        raise ConfigError(f"{section}.{name}: expected one of {', '.join(map(repr, choices))}, "
                          f"got {getattr(obj, name)!r}")


def dumps_toml(tree: dict) -> str:
    """Write a two-level dict of scalars (and lists of scalars or of inline tables) as TOML."""
    lines = []
    for section, values in tree.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        raise ConfigError(f"{value} is beyond TOML's 64-bit integer range")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table (an element of growth.stages)
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def describe() -> str:
    """Every section and field with its type, default and documentation (for `--help-config`)."""
    out = []
    for section, cls in get_type_hints(Config).items():
        out.append(f"[{section}]  {cls.__doc__.splitlines()[0]}")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(f"  {f.name} = {_toml_value(default)}    # {f.metadata['doc']}")
    return "\n".join(out)
