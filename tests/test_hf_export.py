"""Exports are complete Hugging Face folders: tokenizer files, special-token ids, generation
config; AutoTokenizer, pipeline("text-generation") and lm-evaluation-harness accept them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"


def stackfast(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "stackfast", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_OFFLINE": "1"})


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "hf"
    result = stackfast("export-hf", "--checkpoint", trained, "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def test_export_declares_special_tokens(exported):
    from tokenizers import Tokenizer
    eos = Tokenizer.from_file(str(exported / "tokenizer.json")).token_to_id("<|endoftext|>")
    config = json.loads((exported / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == config["pad_token_id"] == eos
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == eos and generation["pad_token_id"] == eos
    tokenizer_config = json.loads((exported / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == tokenizer_config["bos_token"] == "<|endoftext|>"
    assert tokenizer_config["model_max_length"] == config["max_position_embeddings"]


def test_auto_tokenizer_and_pipeline_accept_the_export(exported):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    text = "def main(argv):\n    return 0\n"
    # The same ids as training saw: no beginning-of-text token is added.
    assert tokenizer(text)["input_ids"] == Tokenizer.from_file(str(exported / "tokenizer.json")).encode(text).ids
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    generate = transformers.pipeline("text-generation", model=str(exported), device="cpu")
    out = generate("import os\n", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("import os\n")


def test_sentencepiece_export_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")  # transformers reads a .model through protobuf (the [hf] extra)
    from stackfast.checkpoint import save_hf
    from stackfast.config import ModelConfig
    from stackfast.model import Transformer
    text = tmp_path / "spm.txt"
    text.write_text("".join(f"line {i} hello world of tokens\n" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   model_type="bpe", minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", kernels="torch", vocab_size=60))
    # The dataset folder keeps the tokenizer as tokenizer.model; export copies that name.
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    save_hf(tmp_path / "hf", model, tmp_path / "ds" / "tokenizer.model")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == sp.eos_id() and config["bos_token_id"] == sp.bos_id()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.eos_token_id == sp.eos_id() and tokenizer.eos_token == "</s>"
    assert tokenizer("hello world of line 7")["input_ids"] == sp.encode("hello world of line 7")
    generate = transformers.pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    assert isinstance(generate("hello", max_new_tokens=3, do_sample=False)[0]["generated_text"], str)


def test_eval_tasks_scores_a_local_multiple_choice_task(trained, tmp_path):
    """lm-evaluation-harness for real: a task shipped in tests/lm_eval_tasks (YAML + JSONL,
    no download), run on the trained tiny model through `stackfast eval --tasks`."""
    pytest.importorskip("lm_eval")
    out = stackfast("eval", "--checkpoint", trained, "--tasks", "stackfast_tiny_mc", "--task-path", TASKS,
                    "--device", "cpu", "--out", tmp_path / "scores.json", cwd=TASKS)
    assert out.returncode == 0, out.stderr[-3000:]
    scores = json.loads((tmp_path / "scores.json").read_text())
    accuracy = scores["stackfast_tiny_mc"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0
    assert "stackfast_tiny_mc" in out.stderr and "acc" in out.stderr
    unknown = stackfast("eval", "--checkpoint", trained, "--tasks", "stackfast_tiny_mcq", "--task-path", TASKS)
    assert unknown.returncode == 2 and unknown.stderr.startswith("stackfast: error: --tasks: unknown"), unknown.stderr


def test_export_into_a_full_disk_is_one_line_and_replaces_nothing(trained, tmp_path, monkeypatch, capsys):
    """safetensors reports a full disk in its own error ("I/O error: No space left on device
    (os error 28)", no OSError): the export ends in one line, exit 2, with no temporary folder
    left and the earlier export it was to replace (--force) untouched. The full disk is
    simulated by monkeypatching the weights writer."""
    from safetensors import SafetensorError
    from stackfast import cli
    out = tmp_path / "hf"
    assert cli.main(["export-hf", "--checkpoint", str(trained), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr("stackfast.checkpoint.hf.save_file", full)
    capsys.readouterr()
    assert cli.main(["export-hf", "--checkpoint", str(trained), "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"stackfast: error: {out}: not written: no space left on device ("), err
    assert sorted(os.listdir(tmp_path)) == ["hf"] and {p.name: p.read_bytes() for p in out.iterdir()} == before
