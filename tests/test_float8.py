"""float8 training through torchao (train.float8), on the CPU with torchao's emulation.

Tolerance of the loss curves. On CPU the plain run is fp32 (train.dtype 'auto') and the
float8 run rounds the block linears' operands to float8 (e4m3: 3 mantissa bits) in every
matmul, forward and backward, so the two curves differ by quantisation noise that Adam
carries forward and that grows along the run. Measured here (tiny preset, 20 steps of
8 x 64 tokens, lr 3e-3; losses 8.33 -> 6.98), the largest per-step gap to the plain run:
3.7e-3 tensorwise, 3.4e-3 rowwise (a relative 5e-4); two processes (FSDP, float8
all-gather, per-rank input scales) against one, both float8 and growing: 2.8e-3. TOL =
1.5e-2, about 4x. With growth (stack x2 after step 10) against the plain growing run:
1.05e-2 tensorwise (at the last step; 4.4e-3 before it), 1.8e-3 rowwise: TOL_GROWTH =
4e-2, about 4x. What the curves catch: a conversion that silently did not happen (the
curves must *differ*, by more than 1e-5: without it they are the plain run's exactly), a
float8 path that breaks training (the converted weights' gradients lost: a gap of 0.61)
or its finiteness. What they cannot: the choice of layers (the LM head converted too
moves the curve by 3.2e-3 only: test_only_block_linears_... checks it), and torchao's own
scaling recipes (even scales forced to 1 move this toy's curve by only 2.3e-3; torchao
tests them).

torchao is an optional dependency (`pip install 'stackfast[float8]'`; `make test` installs
it): without it these tests skip, saying so.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from stackfast import float8
from stackfast.config import ConfigError, ModelConfig, load_config
from stackfast.metrics import read_metrics
from stackfast.model import Transformer
from test_packaging import without  # runs a command with a package hidden

# Everything but the refusals needs torchao.
needs_torchao = pytest.mark.skipif(not float8.installed(), reason="torchao is not installed (pip install "
                                   "'stackfast[float8]'; `make test` installs it): float8 training untested")

REPO = Path(__file__).resolve().parent.parent
STEPS, TOL, TOL_GROWTH, DIFFERS = 20, 1.5e-2, 4e-2, 1e-5
BASE = ['model.preset="tiny"', "model.kernels=torch", "data.seq_len=64", f"train.max_steps={STEPS}",
        "train.global_batch_size=8", "train.eval_batches=1", "train.eval_every=0", "schedule.warmup_steps=5",
        "optim.lr=3e-3", "logging.progress=false", "logging.tensorboard=false", "logging.log_every=1",
        "checkpoint.every_steps=10", "checkpoint.keep_last=5"]
GROW = ["growth.operator=stack", "growth.factor=2", f"growth.at_tokens={10 * 8 * 64}"]  # after step 10
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def train(run_dir, *extra):
    from stackfast.train import run
    return run(load_config(None, [*BASE, f'logging.run_dir="{run_dir}"', *extra]))


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == STEPS
    return max(abs(x - y) for x, y in zip(a, b))


def block_linears(n_layers: int) -> list[str]:
    return [f"layers.{i}.{name}" for i in range(n_layers) for name in BLOCK_LINEARS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """20-step runs of the same config with train.float8 none, tensorwise and rowwise."""
    dirs = {}
    for mode in ("none", "tensorwise", "rowwise"):
        dirs[mode] = tmp_path_factory.mktemp(mode)
        train(dirs[mode], f"train.float8={mode}")
    return dirs


@needs_torchao
@pytest.mark.parametrize("mode", ["tensorwise", "rowwise"])
def test_float8_loss_curve_follows_the_plain_run(runs, mode):
    plain, ours = losses(runs["none"]), losses(runs[mode])
    assert all(map(math.isfinite, ours)) and ours[-1] < ours[0] - 1.0  # it trains
    assert DIFFERS < gap(plain, ours) < TOL, (plain, ours)


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A growing run (stack x2 after step 10) with and without float8, and the models that
    grow_stage took and gave back in the float8 run."""
    import stackfast.train as train_module
    seen = {}
    grow = train_module.grow_stage

    def spy(cfg, stage, target, model, *args, **kwargs):
        seen["small"] = model_types(model)
        out = grow(cfg, stage, target, model, *args, **kwargs)
        seen["grown"] = model_types(out.model)
        return out
    dirs = {mode: tmp_path_factory.mktemp(f"grow-{mode}") for mode in ("none", "tensorwise")}
    train(dirs["none"], *GROW)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "grow_stage", spy)
        train(dirs["tensorwise"], *GROW, "train.float8=tensorwise")
    return dirs, seen


def model_types(model) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}


@needs_torchao
def test_growth_in_a_float8_run_converts_the_new_layers(grown):
    dirs, seen = grown
    # tiny: 2 layers, so the small model has 1 and the grown one 2; every block linear's dims
    # are multiples of 16 (hidden 64, kv 32, ffn 176)
    for key, n_layers in (("small", 1), ("grown", 2)):
        assert sorted(n for n, t in seen[key].items() if t == "Float8Linear") == sorted(block_linears(n_layers))
        assert seen[key]["lm_head"] == "Linear" and seen[key]["embed_tokens"] == "Embedding"
    plain, ours = losses(dirs["none"]), losses(dirs["tensorwise"])
    assert all(map(math.isfinite, ours))
    assert DIFFERS < gap(plain, ours) < TOL_GROWTH, (plain, ours)


@needs_torchao
def test_resume_of_a_float8_checkpoint_is_exact_and_works_without_float8(runs, tmp_path):
    from stackfast.checkpoint import load_weights
    ckpt = runs["tensorwise"] / "checkpoints" / "step_00000010"
    with torch.device("meta"):
        plain_keys = set(Transformer(ModelConfig.from_preset("tiny", kernels="torch")).state_dict())
    assert set(load_weights(ckpt)) == plain_keys  # Float8Linear keeps weight: the format is unchanged

    train(tmp_path / "f8", "train.float8=tensorwise", f'checkpoint.resume="{ckpt}"')
    assert losses(tmp_path / "f8")[-10:] == losses(runs["tensorwise"])[-10:]  # bit for bit

    train(tmp_path / "plain", f'checkpoint.resume="{ckpt}"')  # float8 off: the same weights, fp32 matmuls
    resumed = losses(tmp_path / "plain")
    assert resumed != losses(runs["tensorwise"])[-10:]
    assert max(abs(a - b) for a, b in zip(resumed, losses(runs["tensorwise"])[-10:])) < TOL


def without_torchao(tmp_path, *args, python_code=None):
    """`python -m stackfast ARGS` (or `python -c CODE`) where torchao cannot be imported."""
    return without(["torchao"], tmp_path, *args, python_code=python_code)


@needs_torchao
def test_a_float8_checkpoint_loads_exports_and_resumes_without_torchao(runs, tmp_path):
    ckpt = runs["tensorwise"] / "checkpoints" / "step_00000010"
    sets = [a for s in [*BASE, f'logging.run_dir="{tmp_path / "run"}"', f'checkpoint.resume="{ckpt}"']
            for a in ("--set", s)]
    code = f"""
import json, sys
from stackfast.cli import info, main
from stackfast.checkpoint import load_model
assert main(["export-hf", "--checkpoint", {str(ckpt)!r}, "--out", {str(tmp_path / "hf")!r}]) == 0
load_model({str(ckpt)!r})
assert main(["train", *{sets!r}]) == 0
assert "torchao" not in sys.modules
print("INFO" + json.dumps(info()["float8"]))
"""
    out = without_torchao(tmp_path, python_code=code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert len(losses(tmp_path / "run")) == STEPS - 10
    reported = json.loads(out.stdout.split("INFO", 1)[1])
    assert reported["torchao"] is None and not reported["available"] and "stackfast[float8]" in reported["how"]


def test_float8_without_torchao_is_one_line_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    sets = [a for s in [*BASE, f'logging.run_dir="{run_dir}"', "train.float8=tensorwise"] for a in ("--set", s)]
    out = without_torchao(tmp_path, "train", *sets)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("stackfast: error: train.float8")
    assert "pip install 'stackfast[float8]'" in out.stderr
    assert not run_dir.exists()


def test_an_unknown_float8_setting_is_one_line_and_writes_nothing(tmp_path, capsys):
    from stackfast.cli import main
    run_dir = tmp_path / "run"
    assert main(["train", "--set", "train.float8=fp8", "--set", f'logging.run_dir="{run_dir}"']) == 2
    err = capsys.readouterr().err
    assert err == ("stackfast: error: train.float8: expected one of 'none', 'tensorwise', 'rowwise', "
                   "got 'fp8'\n")
    assert not run_dir.exists()
    assert main(["config"]) == 0
    described = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("float8 ="))
    assert "'tensorwise'" in described and "'rowwise'" in described and "emulated" in described


@needs_torchao
def test_a_gpu_below_sm89_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import stackfast.train as train_module
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"^train.float8 = 'rowwise': float8 needs an sm_89\+ GPU "
                                          r"\(Ada, Hopper or later; this is sm_80, NVIDIA A100-SXM4-80GB\)"):
        float8.check_float8("rowwise", torch.device("cuda"))
    monkeypatch.setattr(train_module, "resolve_device", lambda name: torch.device("cuda"))
    with pytest.raises(ConfigError, match="sm_80"):
        train(tmp_path / "run", "train.float8=tensorwise")
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # H100/H200
    float8.check_float8("tensorwise", torch.device("cuda"))
    assert float8.info(torch.device("cuda"))["how"] == "float8 matmuls on this GPU (sm_90)"


@needs_torchao
def test_only_block_linears_with_dims_multiple_of_16_are_converted():
    cfg = ModelConfig.from_preset("tiny", kernels="torch", ffn_size=100)  # the MLP's dims: 64 and 100
    model = Transformer(cfg)
    before = dict(model.state_dict(keep_vars=True))
    float8.convert(model, "tensorwise", torch.device("cpu"))
    types = model_types(model)
    attention = [n for n in block_linears(2) if "self_attn" in n]
    assert sorted(n for n, t in types.items() if t == "Float8Linear") == sorted(attention)
    assert {n: t for n, t in types.items() if n not in attention} == {
        "embed_tokens": "Embedding", "lm_head": "Linear",
        **{n: "Linear" for n in block_linears(2) if "mlp" in n}}
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)  # the same Parameters
    float8.convert(model, "rowwise", torch.device("cpu"))  # converting again changes nothing
    assert model_types(model) == types and model.layers[0].self_attn.q_proj.config.cast_config_weight \
        .scaling_granularity.value == "tensorwise"
    assert float8.info(torch.device("cpu")) == {"torchao": float8.torchao_version(), "available": True,
                                                "how": "emulation only (CPU: float8 numerics, no speed-up)"}


@needs_torchao
def test_the_start_line_says_how_many_linears_were_converted(tmp_path, capsys):
    train(tmp_path / "all", "train.float8=tensorwise", "train.max_steps=1", "logging.progress=true")
    assert ": 14 of 14 block linears converted (those with both dims multiples of 16), emulated on the CPU" \
        in capsys.readouterr().err  # tiny: 2 layers of 7
    model = Transformer(ModelConfig.from_preset("tiny", kernels="torch", ffn_size=100))  # the MLP's: 64 x 100
    float8.convert(model, "rowwise", torch.device("cpu"))
    assert ": 8 of 14 block linears converted" in float8.describe("rowwise", torch.device("cpu"), False, model)


@needs_torchao
def test_a_model_without_a_linear_float8_converts_is_refused_before_anything_is_written(tmp_path, capsys):
    from stackfast.cli import main
    run_dir = tmp_path / "run"
    sizes = ["model.hidden_size=40", "model.n_heads=2", "model.n_kv_heads=2", "model.ffn_size=100"]
    args = [a for s in [*BASE, *sizes, f'logging.run_dir="{run_dir}"', "train.float8=tensorwise"] for a in ("--set", s)]
    assert main(["train", *args]) == 2
    assert capsys.readouterr().err == (
        "stackfast: error: train.float8 = 'tensorwise': no linear of the model can run in float8 (both dims of a "
        "weight must be multiples of 16; the block linears here are 100x40, 40x100, 40x40); set train.float8 = "
        "'none' or model sizes that are multiples of 16\n")
    assert not run_dir.exists()
    # a run converts where one of its stage models has such a linear (hidden 48: the attention's)
    float8.check_convertible("tensorwise", [ModelConfig.from_preset("tiny", hidden_size=size, n_heads=2, n_kv_heads=2,
                                                                    ffn_size=100) for size in (40, 48)])


SPY = '''
import json, sys
import stackfast.train as T
from stackfast.config import load_config

seen = {"precomputed": 0}
grow, precompute = T.grow_stage, T.precompute_scales

def kinds(model):
    return {"float8": sorted(n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"),
            "gathered_in_float8": sorted(n for n, p in model.named_parameters()
                                         if type(p.to_local()).__name__ == "WeightWithDynamicFloat8CastTensor")}

def grow_spy(*args, **kwargs):
    out = grow(*args, **kwargs)
    seen["grown"] = kinds(out.model)
    return out

def precompute_spy(model):
    precompute(model)
    scales = [p._local_tensor._precomputed_scale for n, p in model.named_parameters()
              if type(p._local_tensor).__name__ == "WeightWithDynamicFloat8CastTensor"]
    seen["precomputed"] += bool(scales) and all(s is not None for s in scales)

T.grow_stage, T.precompute_scales = grow_spy, precompute_spy
summary = T.run(load_config(None, sys.argv[1:]))
if summary["rank"] == 0:
    print("SPY" + json.dumps(seen))
'''


@needs_torchao
def test_fsdp_float8_all_gather_with_growth_under_torchrun(grown, tmp_path):
    """Two processes (gloo, FSDP2): tensorwise all-gathers the converted weights in float8,
    their scales are precomputed after every optimizer step, and the layers that growth adds
    under FSDP are converted and gathered in float8 too; the losses follow the one-process
    float8 run (the input scales are per rank there: float8 noise, within TOL), and a resume
    from the checkpoint before growth (DCP into float8-gathered shards) is exact."""
    script = tmp_path / "spy.py"
    script.write_text(SPY)

    def launch(run_dir, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               *BASE, f'logging.run_dir="{run_dir}"', *GROW, "train.float8=tensorwise", *extra]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
        return out

    out = launch(tmp_path / "run")
    seen = json.loads(out.stdout.split("SPY", 1)[1])
    weights = sorted(f"{n}.weight" for n in block_linears(2))
    assert seen["grown"] == {"float8": sorted(block_linears(2)), "gathered_in_float8": weights}
    assert seen["precomputed"] == STEPS
    one_process = losses(grown[0]["tensorwise"])
    assert gap(one_process, losses(tmp_path / "run")) < TOL

    launch(tmp_path / "resumed", f'checkpoint.resume="{tmp_path / "run" / "checkpoints" / "step_00000010"}"')
    assert losses(tmp_path / "resumed")[-10:] == losses(tmp_path / "run")[-10:]
