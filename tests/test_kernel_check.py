"""stackfast.kernel_check: the Triton kernels checked against their references on the device
(the interpreter on CPU), the verdicts cached per device and versions, and a model whose kernel
fails the check running PyTorch for that op alone."""
import importlib
import json

import pytest
import torch

import stackfast.model as model_module
from stackfast import kernel_check
from stackfast.cli import build_parser, main
from stackfast.config import ModelConfig
from stackfast.model import Transformer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# tiny and odd: head dim 16, GQA group 2, a vocab of two 1024-column blocks with a ragged tail
SMALL = dict(vocab_size=1500, n_layers=1, hidden_size=32, n_heads=2, n_kv_heads=1, ffn_size=40, max_seq_len=64)
SHAPES = kernel_check.Shapes.of(ModelConfig(**SMALL), torch.float32)


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    """An empty cache folder and no op fallen back yet, for each test."""
    monkeypatch.setenv("STACKFAST_CACHE", str(tmp_path))
    monkeypatch.setattr(model_module, "TORCH_FALLBACK", set())
    return tmp_path / kernel_check.CACHE_FILE


@pytest.fixture
def checks_run(monkeypatch):
    """The ops the check runs its kernels for, call by call."""
    calls = []
    real = kernel_check.run_checks

    def spy(shapes, device, ops=kernel_check.OPS):
        calls.append(ops)
        return real(shapes, device, ops)
    monkeypatch.setattr(kernel_check, "run_checks", spy)
    return calls


def _wrong(monkeypatch, op, error=1e-2):
    """The kernel of `op` as the check calls it, off by `error` in its first output (a compiler
    bug's stand-in)."""
    module = importlib.import_module(f"stackfast.ops.{op}")
    real = getattr(module, op)

    def wrong(*args, **kwargs):
        out = real(*args, **kwargs)
        return (out[0] + error, *out[1:]) if isinstance(out, tuple) else out + error
    monkeypatch.setattr(module, op, wrong)


def test_every_kernel_passes_and_the_verdicts_are_cached(fresh, checks_run):
    assert kernel_check.failed_ops(SHAPES, DEVICE, kernel_check.OPS) == set()
    assert checks_run == [kernel_check.OPS]
    saved = json.loads(fresh.read_text())
    (key, entry), = saved.items()
    assert key == kernel_check.cache_key(SHAPES, DEVICE) and f"checks {kernel_check.CHECKS}" in key
    assert all(entry[op]["ok"] for op in kernel_check.OPS)
    # the second time: read from the cache, no kernel run
    assert kernel_check.failed_ops(SHAPES, DEVICE, kernel_check.OPS) == set()
    assert len(checks_run) == 1
    # another dtype or model size is another check
    kernel_check.cached_checks(kernel_check.Shapes.of(ModelConfig(**{**SMALL, "ffn_size": 24}), torch.float32),
                               DEVICE, ("swiglu",))
    assert checks_run[1:] == [("swiglu",)]


@pytest.mark.parametrize("version", ["triton", "torch", "stackfast"])
def test_a_new_version_checks_again(version, checks_run, monkeypatch):
    kernel_check.cached_checks(SHAPES, DEVICE, ("swiglu",))
    if version == "triton":
        monkeypatch.setattr(importlib.import_module("triton"), "__version__", "99.0")
    elif version == "torch":
        monkeypatch.setattr(torch, "__version__", "99.0")
    else:
        monkeypatch.setattr(kernel_check, "__version__", "99.0")
    kernel_check.cached_checks(SHAPES, DEVICE, ("swiglu",))
    assert checks_run == [("swiglu",)] * 2


def test_every_check_can_fail(monkeypatch):
    """Each kernel made wrong by 1e-2 in its first output (a compiler bug's stand-in) fails its check."""
    for op in kernel_check.OPS:
        _wrong(monkeypatch, op)
    for op, verdict in kernel_check.run_checks(SHAPES, DEVICE).items():
        assert not verdict.ok and verdict.error > verdict.allowed, op


def test_the_document_masked_attention_is_checked_too(monkeypatch):
    """The document-masked kernel (a separate compile) made wrong, the unmasked one right: the
    attention check fails, at the masked output."""
    module = importlib.import_module("stackfast.ops.attention")
    real = module.attention

    def wrong_with_documents(*args, document_ids=None, **kwargs):
        out = real(*args, document_ids=document_ids, **kwargs)
        return out if document_ids is None else out + 1e-2
    monkeypatch.setattr(module, "attention", wrong_with_documents)
    verdict = kernel_check.run_checks(SHAPES, DEVICE, ("attention",))["attention"]
    assert not verdict.ok and verdict.output == "out (documents)"


def test_a_kernel_that_raises_fails_its_check(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of shared memory\nsecond line")
    monkeypatch.setattr(importlib.import_module("stackfast.ops.swiglu"), "swiglu", broken)
    verdict = kernel_check.run_checks(SHAPES, DEVICE, ("swiglu",))["swiglu"]
    assert not verdict.ok and verdict.text() == "failed: RuntimeError: out of shared memory"


def _loss(kernels, x):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL, kernels=kernels)).to(DEVICE)
    return model(x, x)


def test_the_model_runs_pytorch_for_the_wrong_kernel_only(monkeypatch, capsys):
    """kernels='triton': the first forward checks the kernels; rms_norm, made wrong, is said in one
    line and runs F.rms_norm; the other ops keep their kernels; the loss is the torch path's."""
    _wrong(monkeypatch, "rms_norm")
    import stackfast.ops as ops
    calls = []
    for name in ("rms_norm", "swiglu"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, real=real, name=name, **kw: calls.append(name) or real(*a, **kw))
    x = torch.randint(0, SMALL["vocab_size"], (1, 11), device=DEVICE)
    loss = _loss("triton", x)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stackfast: kernel check on this device: rms_norm (fp32) wrong: ")
    assert "off by 0.01" in lines[0] and lines[0].endswith("rms_norm runs PyTorch instead")
    assert model_module.TORCH_FALLBACK == {"rms_norm"}
    assert calls == ["swiglu"]
    torch.testing.assert_close(loss, _loss("torch", x), rtol=1e-5, atol=1e-6)
    # a second model in the process: the verdict stands (cached), nothing more is said
    _loss("triton", x)
    assert calls == ["swiglu"] * 2 and capsys.readouterr().err == ""


def test_kernel_check_off(monkeypatch, checks_run):
    monkeypatch.setenv("STACKFAST_KERNEL_CHECK", "0")
    _loss("triton", torch.randint(0, SMALL["vocab_size"], (1, 5), device=DEVICE))
    assert checks_run == []


def test_auto_on_cpu_runs_no_check(checks_run):
    _loss("auto", torch.randint(0, SMALL["vocab_size"], (1, 5), device="cpu"))
    assert checks_run == []


def test_info_check_prints_every_verdict(capsys, checks_run, monkeypatch):
    settings = [f"model.{key}={value}" for key, value in SMALL.items()]
    settings += ["data.seq_len=64", f'train.device="{DEVICE.type}"']
    args = build_parser().parse_args(["info", "--check", *sum((["--set", s] for s in settings), [])])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert all(f"  {op:21} ok: " in out for op in kernel_check.OPS)
    # on demand means now, cache or not
    _wrong(monkeypatch, "rope")
    args = build_parser().parse_args(["info", "--check", "--json", *sum((["--set", s] for s in settings), [])])
    assert args.func(args) == 1
    verdicts = json.loads(capsys.readouterr().out)["kernel_check"]
    assert verdicts["rope"].startswith("wrong: ") and verdicts["swiglu"].startswith("ok: ")
    assert len(checks_run) == 2


def test_the_cache_folder_is_the_users(tmp_path, monkeypatch):
    from stackfast.data import cache_dir
    monkeypatch.delenv("STACKFAST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "stackfast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path.home() / ".cache" / "stackfast"


def test_info_check_where_the_kernels_cannot_run_is_one_line(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert main(["info", "--check"]) == 2
    assert capsys.readouterr().err.strip() == (
        "stackfast: error: info --check runs the Triton kernels on train.device (cpu): it needs a CUDA device, or "
        "TRITON_INTERPRET=1 to check them in the (slow) Triton interpreter")
