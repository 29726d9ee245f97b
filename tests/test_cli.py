"""The `stackfast` command end to end, as a user runs it (subprocesses)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = ["--set", 'model.preset="tiny"', "--set", "data.seq_len=32", "--set", "train.global_batch_size=2",
        "--set", "train.eval_batches=1", "--set", "logging.tensorboard=false"]


def stackfast(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "stackfast", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or REPO, timeout=600)


def test_info_json():
    out = stackfast("info", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["stackfast"] == "0.1.0" and info["kernels_auto"] == "torch"
    assert info["torch"] and info["python"]


@pytest.mark.parametrize("args,message", [
    (["train", "--set", "model.n_layrs=2"], "model.n_layrs: unknown key (did you mean 'n_layers'?)"),
    (["train", "--set", "model.n_heads=3"], "model.n_heads: 3 heads do not divide hidden_size 256"),
    (["train", "--config", "missing.toml"], "config file not found: missing.toml"),
    (["train", "--set", 'data.path="no/such/folder"'], "no/such/folder: not a dataset folder"),
    (["bench", "--cpu", "--out", "README.md"], "--out README.md: exists and is not a folder"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    out = stackfast(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stackfast: error: ") and message in lines[0], out.stderr


def test_unknown_command_exits_2():
    assert stackfast("fly").returncode == 2


def test_config_describes_and_shows(tmp_path):
    out = stackfast("config")
    assert out.returncode == 0 and "[model]" in out.stdout and "n_kv_heads" in out.stdout
    out = stackfast("config", "--show", REPO / "configs" / "7b.toml", "--set", "train.seed=3")
    assert out.returncode == 0 and "hidden_size = 4096" in out.stdout and "seed = 3" in out.stdout


def test_tokenize_then_train_then_resume(tmp_path):
    (tmp_path / "t.txt").write_text("some text to learn from. " * 400)
    out = stackfast("tokenize", "--input", tmp_path / "t.txt", "--tokenizer", "bytes", "--out", tmp_path / "ds")
    assert out.returncode == 0, out.stderr
    assert "train +" in out.stdout and (tmp_path / "ds" / "index.json").is_file()
    again = stackfast("tokenize", "--input", tmp_path / "t.txt", "--tokenizer", "bytes", "--out", tmp_path / "ds")
    assert again.returncode == 2 and "already exists and is not empty" in again.stderr
    run_dir = tmp_path / "run"
    common = [*TINY, "--set", f'data.path="{tmp_path / "ds"}"', "--set", f'logging.run_dir="{run_dir}"',
              "--set", "model.vocab_size=256"]
    out = stackfast("train", *common, "--set", "train.max_steps=4")
    assert out.returncode == 0, out.stderr
    assert "done: 4 steps" in out.stdout
    out = stackfast("train", *common, "--set", "train.max_steps=6", "--resume", "auto")
    assert out.returncode == 0, out.stderr
    assert "resumed from" in out.stderr and "done: 6 steps" in out.stdout


def test_train_py_runs_as_a_file(tmp_path):
    out = subprocess.run([sys.executable, "stackfast/train.py", *TINY, "--set", "train.max_steps=2",
                          "--set", f'logging.run_dir="{tmp_path}"'], capture_output=True, text=True,
                         cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "metrics.jsonl").is_file()


def test_demo_smoke(tmp_path):
    # The real demo (9e12 FLOPs, ~4 minutes on 2 CPU cores) runs with `make demo`; a tiny
    # budget checks the whole command: four runs, table, JSON, plot.
    out = stackfast("demo", "--run-dir", tmp_path / "demo", "--flops", "3e11")
    assert out.returncode == 0, out.stderr
    assert "| scratch (8 layers) |" in out.stdout and "G_stack" in out.stdout and "speedup" in out.stdout
    assert "warning: far below" in out.stdout
    result = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert set(result["runs"]) == {"scratch", "small", "stack", "stack_half"}
    stack = result["runs"]["stack"]
    assert stack["growth_step"] >= 1 and stack["flops"] == pytest.approx(result["runs"]["scratch"]["flops"], rel=0.3)
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 10_000
    refused = stackfast("demo", "--run-dir", tmp_path / "demo")
    assert refused.returncode == 2 and "already exists" in refused.stderr


def test_plot_command(tmp_path):
    for name, steps in (("a", 4), ("b", 6)):
        out = stackfast("train", *TINY, "--set", f"train.max_steps={steps}", "--set", "train.eval_every=2",
                        "--set", f'logging.run_dir="{tmp_path / name}"')
        assert out.returncode == 0, out.stderr
    out = stackfast("plot", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "p.png", "--label", "scratch",
                    "--label", "other")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "p.png").stat().st_size > 10_000
    bad = stackfast("plot", tmp_path, "--out", tmp_path / "q.png")
    assert bad.returncode == 2 and "not a run folder" in bad.stderr
