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
    (["train", "--set", 'train.device="cuda:x"'], "train.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (["train", "--set", "optim.lr=inf"], "optim.lr: must be a finite number, got inf"),
    (["plan", "--params", "1e30", "--tokens", "3e11"], "target parameters 1e+30: plan covers 2.1e+08 to 1.2e+10"),
    (["grow", "--checkpoint", "no-ckpt", "--out", "no-out", "--option", "bogus=1"],
     "stack takes no option 'bogus'; its options: layers='all', order='stack', block=0, noise=0.0, seed=0"),
    (["grow", "--checkpoint", "no-ckpt", "--out", "no-out", "--operator", "depth_zero", "--option", "noise=0.2"],
     "depth_zero takes no option 'noise'; its options: order='interpolate'"),
    (["eval", "--checkpoint", "no-ckpt", "--device", "tpu"], "--device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    out = stackfast(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stackfast: error: ") and message in lines[0], out.stderr


def test_triton_kernels_on_cpu_without_the_interpreter_are_refused_before_anything_is_written(tmp_path):
    import os
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "stackfast", "train", *TINY, "--set", "model.kernels=triton",
                          "--set", 'train.device="cpu"', "--set", f'logging.run_dir="{tmp_path / "run"}"'],
                         capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert out.returncode == 2
    assert out.stderr.strip() == ("stackfast: error: model.kernels = 'triton' needs a CUDA device (train.device is "
                                  "cpu); use 'auto' or 'torch' on CPU, or set TRITON_INTERPRET=1 to run the kernels "
                                  "in the (slow) Triton interpreter"), out.stderr
    assert not (tmp_path / "run").exists()


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


@pytest.mark.slow
def test_demo_quick(tmp_path):
    # `stackfast demo --quick`: the whole command at a smaller budget (the real demo, ~5
    # minutes on 2 CPU cores, runs with `make demo`): seeds, table, paired verdicts, JSON, plot.
    from stackfast.demo import CPU_SIZING, QUICK_DIVISOR
    from stackfast.recipes import RECIPES
    out = stackfast("demo", "--run-dir", tmp_path / "demo", "--quick", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    paper = RECIPES["stack_paper"].label
    assert "| scratch | 2 |" in out.stdout and f"| {paper} | 2 |" in out.stdout and "| small alone | 2 |" in out.stdout
    assert f"{paper} vs scratch:" in out.stdout and f"{paper} vs small alone:" in out.stdout
    assert "small alone vs scratch:" in out.stdout and "2 seeds paired, 95% t interval" in out.stdout
    result = json.loads((tmp_path / "demo" / "demo.json").read_text())
    runs = result["runs"]
    assert sorted((r["arm"], r["seed"]) for r in runs) == sorted(
        (arm, seed) for arm in ("scratch", "small", "stack_paper") for seed in (1, 2))
    assert all(r["val_loss"] > 0 and r["threads"] == 1 for r in runs)
    # the two seeds are different runs, and every run spends the same FLOPs
    seeds = [r["val_loss"] for r in runs if r["arm"] == "scratch"]
    assert seeds[0] != seeds[1]
    flops = [r["run_flops"] for r in runs]
    assert max(flops) == pytest.approx(min(flops), rel=0.1)
    assert result["sizing"]["flops"] == pytest.approx(CPU_SIZING.flops / QUICK_DIVISOR)
    assert result["comparisons"]["stack_paper vs small"]["seeds"] == [1, 2] and result["noise_floor"] > 0
    assert result["machine"]["cpu"]
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


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    """A user's folder (the current one): text, a dataset whose validation split is shorter
    than a window, a checkpoint folder's config (no weights), an existing file, a Latin-1 config."""
    from stackfast.config import load_config
    from stackfast.data import tokenize
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "in.txt").write_text("some text to learn from. " * 80)
    tokenize(["src/in.txt"], "bytes", "ds", val_fraction=0.01)  # 20 held-out tokens
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.toml").write_text(
        load_config(None, ['model.preset="tiny"', f'data.path="{tmp_path / "ds"}"']).to_toml())
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    (tmp_path / "exists.json").write_text("{}")
    (tmp_path / "latin1.toml").write_bytes("[logging]\nrun_dir = 'caf\u00e9'\n".encode("latin-1"))
    (tmp_path / "tasks").mkdir()  # an lm-eval task whose data file is missing
    (tmp_path / "tasks" / "broken_mc.yaml").write_text(
        "task: broken_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: missing.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n")
    return tmp_path


def _tree(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.parametrize("args,message", [
    (["tokenize", "--input", "src", "--tokenizer", "bytes", "--out", "new", "--shard-tokens", "-1"],
     "--shard-tokens must be a positive number of tokens, got -1"),
    (["tokenize", "--input", "src/in.txt", "--tokenizer", "bytes", "--out", ".", "--force"],
     ".: is or contains the input src/in.txt"),
    (["tokenize", "--input", "src", "--tokenizer", "bytes", "--out", "other", "--force"],
     "other: exists and is not an earlier `stackfast tokenize` output"),
    (["tokenize", "--input", "src", "--tokenizer", "bytes", "--out", "new", "--val-fraction", "nan"],
     "val_fraction must be in (0, 0.5), got nan"),
    (["eval", "--checkpoint", "ckpt", "--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["eval", "--checkpoint", "ckpt", "--seq-len", "-4"], "--seq-len must be a positive integer, got -4"),
    (["eval", "--checkpoint", "ckpt", "--batches", "0"], "--batches must be a positive integer, got 0"),
    (["eval", "--checkpoint", "ckpt", "--out", "exists.json"], "--out exists.json: already exists (use --force"),
    (["eval", "--checkpoint", "ckpt", "--out", "nodir/r.json"], "--out nodir/r.json: folder nodir does not exist"),
    (["eval", "--checkpoint", "ckpt", "--out", "src"], "--out src: is a folder"),
    # The validation split is checked before the model is loaded (this checkpoint has no weights).
    (["eval", "--checkpoint", "ckpt"], "validation split has 20 tokens, 0 windows of 257 (seq_len 256 + 1)"),
    (["eval", "--checkpoint", "nope"], "nope: no such checkpoint folder"),
    (["eval", "--checkpoint", "ckpt", "--device", "tpu"], "--device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (["plot", "ckpt", "--out", "exists.json"], "--out exists.json: already exists (use --force"),
    (["plot", "ckpt", "--out", "x.toml"], "--out x.toml: not an image file name; use one of"),
    (["plot", "ckpt", "src", "--label", "a", "--out", "p.png"], "--label given 1 times for 2 runs"),
    (["plot", "run", "--out", "p.png"], "metrics.jsonl:2: corrupt metrics row"),
    (["plan", "--params", "7e9", "--tokens", "3e11", "--out", "nodir/p.toml"], "folder nodir does not exist"),
    (["plan", "--params", "7e9", "--tokens", "3e11", "--out", "src"], "--out src: is a folder"),
    (["plan", "--params", "7e9", "--tokens", "3e11", "--out", "exists.json"], "already exists (use --force"),
    (["plan", "--params", "7e9", "--tokens", "1e30", "--out", "p.toml"], "budget of 1e+30 tokens does not fit"),
    (["plan", "--params", "1e8", "--tokens", "3e11"], "target parameters 1e+08: plan covers 2.1e+08 to 1.2e+10"),
    (["plan", "--params", "7e9", "--flops", "inf"], "FLOP budget must be a positive finite number, got inf"),
    (["plan", "--params", "7e9", "--tokens", "nan"], "token budget must be a positive finite number, got nan"),
    (["plan", "--params", "7e9", "--tokens", "0"], "token budget must be a positive finite number, got 0"),
    (["grow", "--checkpoint", "ckpt", "--out", "g", "--operator", "bogus"],
     "unknown growth operator 'bogus'; known: stack, depth_zero"),
    (["grow", "--checkpoint", "ckpt", "--out", "g", "--option", "noise=abc"],
     "stack option noise: expected a finite number, got str 'abc'"),
    (["grow", "--checkpoint", "ckpt", "--out", "g", "--factor", "1"], "growth factor must be an integer >= 2"),
    (["grow", "--checkpoint", "ckpt", "--out", "."], "--out . overlaps --checkpoint ckpt: the input is never"),
    (["export-hf", "--checkpoint", "ckpt", "--out", "ckpt", "--force"], "overlaps --checkpoint ckpt: the input is"),
    (["config", "--show", "latin1.toml"], "latin1.toml: not a UTF-8 text file (invalid continuation byte"),
    (["config", "--show", "src"], "src: is a folder, not a config file"),
    (["demo", "--run-dir", "exists.json"], "exists.json already exists and is not empty"),
    (["demo", "--run-dir", "d", "--flops", "inf"], "--flops must be a positive finite number, got inf"),
    (["demo", "--run-dir", "d", "--lr", "-1"], "--lr must be a positive finite number, got -1.0"),
    (["demo", "--run-dir", "d", "--seeds", "0"], "--seeds must be at least 1, got 0"),
    (["demo", "--run-dir", "d", "--device", "cuda:x"], "--device: expected"),
    # Budgets so small that the 2-step floor made G_stack's runs bigger than scratch's (and the
    # half run equal to the full one) printed ">= +100% in every seed".
    (["demo", "--run-dir", "d", "--flops", "1", "--quick"],
     "a budget of 1 FLOPs a run is too small for an equal-budget comparison"),
    (["demo", "--run-dir", "d", "--flops", "1e10"], "a budget of 1e+10 FLOPs a run is too small"),
    (["eval", "--checkpoint", "ckpt", "--tasks", ",,,"], "--tasks ',,,': no task names"),
    (["eval", "--checkpoint", "ckpt", "--tasks", "stackfast_tiny_mc", "--limit", "-1"],
     "--limit must be a positive integer, got -1"),
    (["eval", "--checkpoint", "ckpt", "--tasks", "broken_mc", "--task-path", "tasks"],
     "--tasks broken_mc: lm-evaluation-harness could not load the task: FileNotFoundError"),
])
def test_more_bad_input_is_one_line_exit_2_and_writes_nothing(user_files, capsys, args, message):
    """The same contract as above, in-process (no interpreter start per case)."""
    from stackfast.cli import main
    before = _tree(user_files)
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stackfast: error: ") and message in lines[0], lines
    assert _tree(user_files) == before


def test_index_without_vocab_size_is_one_line(user_files, capsys):
    from stackfast.cli import main
    index = json.loads((user_files / "ds" / "index.json").read_text())
    del index["vocab_size"]
    (user_files / "ds" / "index.json").write_text(json.dumps(index))
    assert main(["eval", "--checkpoint", "ckpt", "--data", "ds"]) == 2
    assert f"{Path('ds') / 'index.json'}: corrupt index: vocab_size missing" in capsys.readouterr().err


def test_a_torn_last_metrics_row_is_dropped(tmp_path):
    from stackfast.metrics import read_metrics
    # A kill during a write leaves a last row without its newline; rows end at \n only.
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "note": "a\u2028b"}\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "note": "a\u2028b"}]
