"""float8 training through torchao (`train.float8 = "tensorwise" | "rowwise"`).

torchao's `convert_to_float8_training` swaps chosen `nn.Linear` modules for its
`Float8Linear`: the three matmuls of each linear (output, grad_input, grad_weight) take
float8 operands (e4m3; e5m2 for tensorwise gradients) scaled per tensor ('tensorwise', the
faster) or per row ('rowwise', scales rounded to powers of two, the more accurate). The
master weights, the optimizer, the gradients and everything outside those matmuls stay as
they were (fp32 master weights, bf16 autocast on GPU).

What is converted: only the transformer blocks' linears (q/k/v/o, gate/up/down) whose
in and out dims are both multiples of 16 (what the float8 GEMMs need): never the embedding
and never the LM head (`module_filter`). The start line says how many were converted; a run
where none of its models has such a linear is refused (`check_convertible`): it would train
exactly as float8 off while saying float8 is on. The conversion runs before the block options
(torch.compile, activation checkpointing) and before FSDP2 wraps the model: `with_float8`
puts it in front of the run's `shard` function, which train.py calls for the model it
builds, for a model loaded from `init_from`, and for the grown model (a depth operator
under torchrun builds it through `shard`; in one process growth.event.grow_stage shards the
grown model itself), so layers that appear at growth are converted too.

Under torchrun (FSDP2) 'tensorwise' also all-gathers the weights in float8
(`enable_fsdp_float8_all_gather`: half the bytes of bf16) with their scales computed for all
float8 weights at once after each optimizer step (`precompute_float8_dynamic_scale_for_fsdp`,
one all-reduce; train.train_step calls `precompute_scales`). 'rowwise' gathers the weights in
the compute dtype (bf16 on GPU) as a plain run does: torchao's float8 all-gather is tensorwise
only.

Checkpoints do not change: a `Float8Linear` keeps `weight` (and `bias`) under the same names
and adds no state, so a float8 run's checkpoint resumes with float8 on or off, exports
(`stackfast export-hf`) and loads where torchao is not installed.

Where the matmul runs in float8: on NVIDIA GPUs of compute capability 8.9 and up (Ada,
Hopper: H100/H200 are sm_90) through `torch._scaled_mm`. A GPU below sm_89 is refused
(`check_float8`). On CPU torchao's emulation runs instead (`emulate=True`: the operands are
rounded to float8 and multiplied in high precision): the numerics of float8 training, none
of its speed — for tests, and slower than a plain run.

torchao is optional (`pip install 'stackfast[float8]'`) and imported only here, only when
float8 is switched on (and by `stackfast info`). The one-process tests of
tests/test_float8.py pass with torchao 0.10, 0.17 and 0.18 on torch 2.13 (CPU emulation);
the names used (`convert_to_float8_training`, `Float8LinearConfig` with `from_recipe_name`,
`emulate` and `enable_fsdp_float8_all_gather`, `precompute_float8_dynamic_scale_for_fsdp`)
are the same in all of them (0.17 and 0.18 load their compiled parts on torch 2.11 and
later; the GPU machines run torch 2.11).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import logging
import os

import torch
import torch.nn as nn

from stackfast.config import ModelConfig
from stackfast.errors import ConfigError
from stackfast.files import first_line
from stackfast.model import Transformer

MODES = ("none", "tensorwise", "rowwise")
INSTALL = "pip install 'stackfast[float8]'"
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (sm_89), Hopper (sm_90) and later
MULTIPLE = 16  # float8 GEMMs need both dims of a weight to be multiples of 16
_FSDP_MARK = "_stackfast_float8_fsdp"  # set on a converted model whose weights all-gather in float8


def installed() -> bool:
    """Whether torchao can be found (without importing it)."""
    try:
        return importlib.util.find_spec("torchao") is not None
    except ImportError:  # an import hook that refuses it (tests hide it so), a broken install
        return False


def torchao_version() -> str | None:
    """The installed torchao's version, or None (read from the package metadata: no import)."""
    if not installed():
        return None
    try:
        return importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def _quiet_import():
    """Importing torchao logs a warning per compiled extension it cannot load (a CPU-only
    torch cannot load its CUDA kernels, which float8 training does not use) and torch a
    deprecation note for an enum torchao registers: noise on every run's stderr, so
    warnings of those loggers are held back while it imports (errors still show)."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _torchao_float8():
    """torchao.float8, or a one-line ConfigError naming the install command."""
    if not installed():
        raise ConfigError(f"train.float8 needs torchao, which is not installed: {INSTALL} "
                          f"(or set train.float8 = 'none')")
    try:
        with _quiet_import():
            import torchao.float8 as float8
            float8.convert_to_float8_training, float8.Float8LinearConfig  # noqa: B018 - the names used here
            float8.precompute_float8_dynamic_scale_for_fsdp  # noqa: B018
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"train.float8: torchao {torchao_version()} has no usable float8 training "
                          f"({type(e).__name__}: {first_line(e)}); "
                          f"{INSTALL} installs a recent one") from None
    return float8


def emulated(device: torch.device) -> bool:
    """Whether float8 matmuls are emulated (CPU) rather than run on float8 tensor cores (GPU)."""
    return device.type != "cuda"


def gpu_problem(device: torch.device) -> str | None:
    """Why this CUDA device cannot run float8 matmuls (None: it can)."""
    if device.index is None:  # 'cuda' asked for: under torchrun each process takes cuda:LOCAL_RANK
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) >= MIN_CAPABILITY:
        return None
    return (f"float8 needs an sm_89+ GPU (Ada, Hopper or later; this is sm_{major}{minor}, "
            f"{torch.cuda.get_device_name(device)})")


def check_float8(mode: str, device: torch.device) -> None:
    """Refuse, before a run writes anything or joins a process group, a train.float8 setting
    that cannot run here: an unknown value, torchao missing (or too old), a GPU below sm_89.
    On CPU float8 is emulated (slow: for tests); 'none' needs nothing."""
    if mode not in MODES:
        raise ConfigError(f"train.float8: expected one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if mode == "none":
        return
    _torchao_float8()
    if device.type == "cuda":
        problem = gpu_problem(device)
        if problem:
            raise ConfigError(f"train.float8 = {mode!r}: {problem}; set train.float8 = 'none'")
    elif device.type != "cpu":
        raise ConfigError(f"train.float8 = {mode!r}: runs on CUDA GPUs (sm_89+) or, emulated, on the CPU; "
                          f"not on {device.type}")


def check_convertible(mode: str, models: list[ModelConfig]) -> None:
    """Refuse float8 for a run none of whose models (one per growth stage) has a linear that
    float8 converts (`module_filter`): it would train exactly as with float8 off while saying
    float8 is on. Each model is built on the meta device: no weights."""
    if mode == "none":
        return
    shapes = set()
    for model_cfg in models:
        with torch.device("meta"):
            model = Transformer(model_cfg)
        if any(module_filter(m, name) for name, m in model.named_modules()):
            return
        shapes |= {f"{m.in_features}x{m.out_features}" for _, m in block_linears(model)}
    raise ConfigError(f"train.float8 = {mode!r}: no linear of the model can run in float8 (both dims of a weight "
                      f"must be multiples of {MULTIPLE}; the block linears here are {', '.join(sorted(shapes))}); "
                      f"set train.float8 = 'none' or model sizes that are multiples of {MULTIPLE}")


def describe(mode: str, device: torch.device, fsdp: bool, model: nn.Module) -> str:
    """The start-up line of a float8 run: how many of the model's block linears were converted."""
    how = ("emulated on the CPU (float8 numerics without float8 speed; slower than train.float8 = 'none', "
           "for tests)" if emulated(device) else "float8 matmuls on the GPU")
    gather = ", weights all-gathered in float8" if fsdp and mode == "tensorwise" else ""
    return (f"stackfast: train.float8 = {mode!r} (torchao {torchao_version()}): {len(float8_linears(model))} of "
            f"{len(block_linears(model))} block linears converted (those with both dims multiples of {MULTIPLE}), "
            f"{how}{gather}")


def module_filter(module: nn.Module, fqn: str) -> bool:
    """Which linears become Float8Linear: plain nn.Linear inside a transformer block
    ('layers.N.' names) with in and out dims both multiples of 16. The embedding is no
    linear; the LM head stays in high precision (its logits feed the loss directly, and
    float8 recipes keep the output layer out); a converted one is not converted again."""
    return (type(module) is nn.Linear and fqn.startswith("layers.")
            and module.in_features % MULTIPLE == 0 and module.out_features % MULTIPLE == 0)


def linear_config(mode: str, device: torch.device, fsdp: bool):
    """torchao's Float8LinearConfig for a mode: the named recipe, emulated off the GPU,
    float8 all-gather under FSDP with tensorwise scaling (the only one torchao gathers)."""
    float8 = _torchao_float8()
    if mode == "tensorwise":
        return float8.Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp, emulate=emulated(device))
    if mode == "rowwise":
        return dataclasses.replace(float8.Float8LinearConfig.from_recipe_name("rowwise"), emulate=emulated(device))
    raise ConfigError(f"train.float8: expected one of {', '.join(map(repr, MODES))}, got {mode!r}")


def convert(model: nn.Module, mode: str, device: torch.device, fsdp: bool = False) -> nn.Module:
    """Swap the block linears of `model` (not yet wrapped: no FSDP, compile or checkpoint
    wrapper) for Float8Linear, in place; weights are kept (the same Parameters). fsdp: the
    model is about to be FSDP2-sharded (float8 all-gather for 'tensorwise'). 'none': as it is."""
    if mode == "none":
        return model
    config = linear_config(mode, device, fsdp)
    _torchao_float8().convert_to_float8_training(model, module_filter_fn=module_filter, config=config)
    if config.enable_fsdp_float8_all_gather:
        setattr(model, _FSDP_MARK, True)
    return model


def with_float8(shard, mode: str, device: torch.device, fsdp: bool):
    """The run's `shard` function (parallel.wrap_model with its settings) preceded by the
    float8 conversion; `shard` itself for 'none'."""
    if mode == "none":
        return shard

    def convert_then_shard(model):
        return shard(convert(model, mode, device, fsdp))
    return convert_then_shard


def precompute_scales(model: nn.Module) -> None:
    """After the optimizer step: the float8 scales of all weights that FSDP all-gathers in
    float8, in one all-reduce (collective), so the next all-gathers need none. A no-op for a
    model without float8 all-gather (torchao is not even imported then)."""
    if getattr(model, _FSDP_MARK, False):
        _torchao_float8().precompute_float8_dynamic_scale_for_fsdp(model)


def plain(t: torch.Tensor) -> torch.Tensor:
    """The tensor holding the data of a local shard: under FSDP with float8 all-gather, the
    local shard of a converted weight (and AdamW's moments, made with empty_like of it) is
    torchao's WeightWithDynamicFloat8CastTensor, a wrapper without storage of its own around
    the fp32 shard (`_tensor`); anything else is returned as it is. In-place writes to the
    result are writes to the weight: what growth's local copies (replicate_) need, as the
    C++ kernel reads raw pointers. Looked up by name: torchao is not imported."""
    return t._tensor if type(t).__name__ == "WeightWithDynamicFloat8CastTensor" else t


def float8_linears(model: nn.Module) -> list[str]:
    """Names of the model's converted linears."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and type(m) is not nn.Linear
            and type(m).__name__ == "Float8Linear"]


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linears inside the model's transformer blocks ('layers.N.' names, also under the
    block wrappers of parallel.apply_block_options), converted or not."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("layers.")]


def info(device: torch.device | None = None) -> dict:
    """For `stackfast info`: torchao's version and where float8 training runs on this machine."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    version = torchao_version()
    if version is None:
        return {"torchao": None, "available": False, "how": f"not installed ({INSTALL})"}
    try:
        _torchao_float8()
    except ConfigError as e:
        return {"torchao": version, "available": False, "how": str(e)}
    if device.type == "cuda":
        problem = gpu_problem(device)
        if problem:
            return {"torchao": version, "available": False, "how": problem}
        major, minor = torch.cuda.get_device_capability(device)
        return {"torchao": version, "available": True, "how": f"float8 matmuls on this GPU (sm_{major}{minor})"}
    return {"torchao": version, "available": True, "how": "emulation only (CPU: float8 numerics, no speed-up)"}
