"""`stackfast plan`, `stackfast grow` and `stackfast export-hf` as a user runs them."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stackfast.checkpoint import load_hf, load_weights
from stackfast.config import load_config
from stackfast.growth import growth_timing
from stackfast.train import run

REPO = Path(__file__).resolve().parent.parent


def stackfast(*args):
    return subprocess.run([sys.executable, "-m", "stackfast", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


def test_plan_prints_the_formula_and_writes_a_config(tmp_path):
    out = stackfast("plan", "--params", "7e9", "--tokens", "300e9", "--out", tmp_path / "plan.toml")
    assert out.returncode == 0, out.stderr
    d = growth_timing(7e9, 6 * 7e9 * 300e9)
    assert f"d = {d / 1e9:.4g}B tokens" in out.stdout and "factor g = 4" in out.stdout
    cfg = load_config(tmp_path / "plan.toml")
    assert cfg.growth.operator == "stack" and cfg.growth.at_tokens == int(d) and cfg.model.n_layers == 32
    again = stackfast("plan", "--params", "7e9", "--tokens", "300e9", "--out", tmp_path / "plan.toml")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert stackfast("plan", "--params", "7e9").returncode == 2  # a budget is required
    assert cfg.growth.schedule == "paper" and cfg.schedule.kind == "cosine"  # the paper's recipe by default
    assert "small model   8 layers" in out.stdout and "grown model   32 layers" in out.stdout
    # doublings does not grow at d: it neither prints d nor needs it to fit the budget
    assert stackfast("plan", "--params", "7e9", "--tokens", "20e9").returncode == 2  # d beyond 20B tokens
    out = stackfast("plan", "--params", "7e9", "--tokens", "20e9", "--recipe", "doublings", "--out", tmp_path / "d.toml")
    assert out.returncode == 0, out.stderr
    assert "d =" not in out.stdout and "recipe        doublings: x2 twice" in out.stdout
    assert [line.split()[2] for line in out.stdout.splitlines() if "model " in line[:13]] == ["8", "16", "32"]
    cfg = load_config(tmp_path / "d.toml")
    assert [s.at for s in cfg.growth.stages] == ["prop", "prop"] and cfg.growth.factor == 2
    assert (cfg.growth.schedule, cfg.schedule.kind, cfg.model.n_layers) == ("continue", "wsd", 32)
    from stackfast.growth.stages import growth_steps, stage_models
    assert [m.n_layers for m in stage_models(cfg)] == [8, 16, 32]
    total = cfg.total_steps()
    assert growth_steps(cfg, total) == [round(total / 6), round(total / 2)]


def test_grow_a_stackfast_checkpoint_then_train_from_it(trained, tmp_path):
    out = stackfast("grow", "--checkpoint", trained, "--operator", "stack", "--factor", "4", "--out", tmp_path / "g")
    assert out.returncode == 0, out.stderr
    assert "layer map     [0, 1, 0, 1, 0, 1, 0, 1]" in out.stdout
    grown, small = load_weights(tmp_path / "g"), load_weights(trained)
    assert torch.equal(grown["layers.6.mlp.up_proj.weight"], small["layers.0.mlp.up_proj.weight"])
    assert json.loads((tmp_path / "g" / "state.json").read_text())["growth_spec"]["operator"] == "stack"
    # The grown folder is a valid init for a run of the grown shape.
    summary = run(load_config(None, ['model.preset="tiny"', "model.n_layers=8", "model.kernels=torch",
                                     "data.seq_len=32", "train.max_steps=2", "train.global_batch_size=2",
                                     "train.eval_batches=1", "logging.progress=false", "logging.tensorboard=false",
                                     f'logging.run_dir="{tmp_path / "r"}"',
                                     f'checkpoint.init_from="{tmp_path / "g"}"']))
    assert summary["steps"] == 2 and math.isfinite(summary["loss"])


def test_grow_refuses_bad_input_and_never_overwrites(trained, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    cases = [
        (["--factor", "1"], "growth factor must be an integer >= 2"),
        (["--option", "layers=[0, 9, 1]"], "layer map index 9 out of range"),
        (["--operator", "nope"], "unknown growth operator 'nope'"),
    ]
    for extra, message in cases:
        out = stackfast("grow", "--checkpoint", trained, "--out", tmp_path / "o", *extra)
        assert out.returncode == 2 and message in out.stderr, out.stderr
    out = stackfast("grow", "--checkpoint", trained, "--out", tmp_path / "taken")
    assert out.returncode == 2 and "already exists" in out.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    out = stackfast("grow", "--checkpoint", trained, "--out", tmp_path / "taken", "--force")
    assert out.returncode == 2 and "replaces only a folder that stackfast wrote" in out.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    for out_dir in (trained, trained.parent):  # the input itself, or a folder holding it
        out = stackfast("grow", "--checkpoint", trained, "--out", out_dir, "--force")
        assert out.returncode == 2 and "the input is never overwritten" in out.stderr
    assert (trained / "state.json").is_file()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    out = stackfast("grow", "--checkpoint", tmp_path / "hf", "--out", tmp_path / "o2")
    assert out.returncode == 2 and "stackfast: error:" in out.stderr


def test_export_hf_loads_in_transformers_with_equal_logits_and_grows_in_hf_format(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = stackfast("export-hf", "--checkpoint", trained, "--out", tmp_path / "hf")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    from stackfast.model import Transformer
    cfg, weights = load_hf(tmp_path / "hf")
    ours = Transformer(cfg).eval()
    ours.load_state_dict(weights)
    x = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-5, atol=1e-5)
    # A grown HF checkpoint loads in transformers with g x the layers.
    out = stackfast("grow", "--checkpoint", tmp_path / "hf", "--factor", "4", "--out", tmp_path / "hf4")
    assert out.returncode == 0, out.stderr
    grown = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf4")
    assert grown.config.num_hidden_layers == 4 * cfg.n_layers
    assert torch.equal(grown.model.layers[5].mlp.up_proj.weight, hf.model.layers[1].mlp.up_proj.weight)
    assert stackfast("export-hf", "--checkpoint", trained, "--out", tmp_path / "hf").returncode == 2


def test_eval_equals_a_hand_computation(trained, tmp_path):
    from stackfast.checkpoint import load_config_of, load_into_model
    from stackfast.data import TokenData, builtin_dataset
    from stackfast.model import Transformer
    out = stackfast("eval", "--checkpoint", trained, "--batches", "1", "--batch-size", "2", "--seq-len", "16",
                    "--out", tmp_path / "eval.json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert json.loads((tmp_path / "eval.json").read_text()) == result
    # By hand: the first two 17-token windows of the held-out split, mean next-token cross-entropy.
    val = torch.from_numpy(TokenData(builtin_dataset()).val[0].tokens[:34].astype("int64")).view(2, 17)
    model = Transformer(load_config_of(trained).model).eval()
    load_into_model(model, load_weights(trained), trained)
    with torch.no_grad():
        logits = model(val[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), val[:, 1:].reshape(-1))
    assert result["val_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected.item()), rel=1e-5)
    assert result["tokens"] == 32
    # --tasks: tests/test_hf_export.py (lm-eval installed) and tests/test_packaging.py (not installed).


def test_hf_round_trip_is_exact_and_refuses_unsupported_features(tmp_path):
    transformers = pytest.importorskip("transformers")
    from stackfast.checkpoint import CheckpointError, hf_llama_config, save_hf
    from stackfast.config import ModelConfig
    from stackfast.model import Transformer
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", kernels="torch")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_llama_config(cfg)))
    hf.save_pretrained(tmp_path / "in", safe_serialization=True)
    # A folder stackfast did not write has no checksums: read only when the user says so.
    with pytest.raises(CheckpointError, match="no checksums.json"):
        load_hf(tmp_path / "in")
    loaded_cfg, weights = load_hf(tmp_path / "in", allow_unverified=True)
    model = Transformer(loaded_cfg)
    model.load_state_dict(weights)
    save_hf(tmp_path / "out", model)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    for name, tensor in hf.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    # Features the stackfast model lacks are refused, not silently dropped.
    config = json.loads((tmp_path / "in" / "config.json").read_text())
    for key, value in (("attention_bias", True), ("tie_word_embeddings", True),
                       ("rope_scaling", {"rope_type": "linear", "factor": 2.0}), ("model_type", "mistral")):
        bad = tmp_path / f"bad-{key}"
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(CheckpointError, match="unsupported|not supported"):
            load_hf(bad)
    (tmp_path / "in" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors missing"):
        load_hf(tmp_path / "in", allow_unverified=True)


def test_grown_toy_checkpoint_generates_text_in_transformers(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    assert stackfast("grow", "--checkpoint", trained, "--out", tmp_path / "g").returncode == 0
    assert stackfast("export-hf", "--checkpoint", tmp_path / "g", "--out", tmp_path / "hf").returncode == 0
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert model.config.num_hidden_layers == 8
    tokenizer = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    prompt = torch.tensor([tokenizer.encode("def main(").ids])
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape[1] == prompt.shape[1] + 8
    assert isinstance(tokenizer.decode(out[0].tolist()), str)


def test_init_from_accepts_a_hugging_face_folder(trained, tmp_path):
    assert stackfast("export-hf", "--checkpoint", trained, "--out", tmp_path / "hf").returncode == 0
    cfg = load_config(None, ['model.preset="tiny"', "model.kernels=torch", "data.seq_len=32", "train.max_steps=1",
                             "train.global_batch_size=2", "train.eval_batches=1", "logging.progress=false",
                             "logging.tensorboard=false", f'logging.run_dir="{tmp_path / "r"}"', "optim.lr=1e-4",
                             f'checkpoint.init_from="{tmp_path / "hf"}"'])
    run(cfg)
    # The run started from the exported weights: its step-1 checkpoint differs from them only
    # by one AdamW step (at most about lr = 1e-4 per weight), far less than a fresh init would.
    start, after = load_weights(trained), load_weights(tmp_path / "r" / "checkpoints" / "step_00000001")
    diff = (after["lm_head.weight"] - start["lm_head.weight"]).abs().max().item()
    assert diff < 1e-3
