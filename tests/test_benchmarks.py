"""The benchmark suite's CPU path, end to end at tiny sizes (timings are not asserted: a
shared machine is noisy; the rows, the same-run baselines and the JSON are)."""
import json
import os
import pytest

from stackfast.bench import run_all


def test_cpu_suite_writes_rows_with_same_run_baselines(tmp_path, capsys):
    from stackfast import cli
    assert cli.main(["bench", "--cpu", "--quick", "--out", str(tmp_path)]) == 0  # = run_all.main
    printed = capsys.readouterr().out
    assert "| what | ours | baseline | ratio | target |" in printed
    train = json.loads(next(tmp_path.glob("train-*.json")).read_text())
    names = {r["name"] for r in train["rows"]}
    assert {"stackfast", "hf-llama-sdpa"} <= names
    ours = next(r for r in train["rows"] if r["name"] == "stackfast")
    assert ours["tokens_per_s"] > 0 and ours["ratio_vs_hf-llama-sdpa"] > 0
    assert train["environment"]["torch"] and "git_revision" in train["environment"]
    replicate = json.loads(next(tmp_path.glob("replicate-*.json")).read_text())["rows"]
    assert {r["method"] for r in replicate} >= {"copy_ loop", "replicate_"}
    summary = json.loads(next(tmp_path.glob("summary-*.json")).read_text())["rows"]
    assert any(r["what"].startswith("replicate_") for r in summary)
    assert any(r["what"].startswith("G_stack weights") for r in summary)
    assert any(r["what"].startswith("loader") for r in summary)
    memory = json.loads(next(tmp_path.glob("bench_linear_cross_entropy-*.json")).read_text())["rows"]
    memory = {r["impl"]: r for r in memory}
    assert memory["stackfast"]["same_loss_and_grads"] and memory["stackfast"]["peak_extra_bytes"] > 0
    assert any(r["what"].startswith("linear_cross_entropy") for r in summary)


def test_train_bench_as_a_one_process_fsdp_job(tmp_path):
    from stackfast.bench import bench_train
    rows = bench_train.main(["--cpu", "--preset", "tiny", "--seq-len", "32", "--reps", "1", "--fsdp",
                             "--activation-checkpointing", "--only", "stackfast", "--out", str(tmp_path)])
    assert [r["name"] for r in rows] == ["stackfast"] and rows[0]["fsdp"] and rows[0]["tokens_per_s"] > 0
    assert "RANK" not in os.environ  # the one-process group and its environment are undone


def test_train_bench_refuses_an_unknown_candidate(capsys):
    from stackfast.bench import bench_train
    with pytest.raises(SystemExit) as exit_info:
        bench_train.main(["--cpu", "--preset", "tiny", "--only", "stackfast,hf"])
    assert exit_info.value.code == 2
    assert "--only: unknown candidate hf; here: stackfast" in capsys.readouterr().err


def test_summary_of_a_gpu_run_reports_ratios_and_skips():
    """The GPU suite's last table, from rows shaped as its parts write them (no GPU here)."""
    parts = {
        "attention": [{"impl": "stackfast", "pass": "fwd+bwd", "batch": 4, "heads": 32, "kv_heads": 8,
                       "seqlen": 4096, "head_dim": 128, "tflops": 301.0, "baseline": "sdpa-cudnn", "ratio": 0.67},
                      {"impl": "sdpa-cudnn", "pass": "fwd+bwd", "tflops": 450.0}],
        "rms_norm": [{"impl": "stackfast", "pass": "fwd+bwd", "rows": 16384, "hidden": 4096, "dtype": "bf16",
                      "gbps": 3000.0, "copy_fraction": 0.7, "baseline": "F.rms_norm", "ratio": 1.6}],
        "replicate": [{"method": "replicate_", "g": 4, "source_bytes": 9.7e9 / 4, "median_ms": 10.0,
                       "roofline_fraction": 0.91, "speedup_vs_copy_loop": 1.45}],
        "train": [{"name": "stackfast", "preset": "tinyllama-1.1b", "seq_len": 2048, "batch": 8, "fsdp": False,
                   "tokens_per_s": 70000.0, "mfu": 0.48, "ratio_vs_hf-llama-sdpa": 1.45,
                   "ratio_vs_hf-llama+liger": 1.11},
                  {"name": "hf-llama-sdpa", "preset": "tinyllama-1.1b", "tokens_per_s": 48000.0},
                  {"name": "stackfast", "preset": "7b", "seq_len": 2048, "batch": 4, "fsdp": True,
                   "skipped": "skipped: weights, gradients and AdamW moments need 88 GiB, the GPU has 79 GiB"}],
        "growth": [{"what": "G_stack weights", "small": "7b-small", "target": "7b", "median_ms": 120.0},
                   {"what": "G_stack weights + Adam moments", "small": "7b-small", "target": "7b",
                    "skipped": "needs 47.5 GiB more, 40.0 GiB free"}],
    }
    rows = {r["what"]: r for r in run_all.summary_rows(parts)}
    assert rows["attention fwd+bwd 4x32/8x4096x128"]["ratio"] == 0.67
    assert rows["rms_norm fwd+bwd 16384x4096 bf16"]["ours"] == "3000 GB/s (70% of copy)"
    assert rows["replicate_ g=4 (2.42 GB sources)"]["ratio"] == 1.45
    ours = rows["train step stackfast tinyllama-1.1b seq 2048 x8"]
    assert ours["baseline"] == "hf-llama+liger" and ours["ratio"] == 1.11 and "MFU 48%" in ours["ours"]
    assert rows["train step stackfast 7b seq 2048 x4 (FSDP, AC)"]["ours"].startswith("skipped: weights")
    assert rows["G_stack weights (7b-small -> 7b)"]["ours"] == "120 ms"
    assert rows["G_stack weights + Adam moments (7b-small -> 7b)"]["ours"].startswith("needs 47.5 GiB")
    assert len(rows) == 7  # one row per claim: the baselines' own rows are not claims


def test_gpu_candidate_set_builds_and_steps_on_cpu():
    """The GPU run's candidates (compile, kernels = 'torch', HF), built here on the CPU: the
    same initial weights for all, and one train_step each (compile excepted: slow on CPU)."""
    import argparse
    import torch
    from stackfast.bench import bench_train
    from stackfast.config import ModelConfig
    from stackfast.parallel import World
    cfg = ModelConfig.from_preset("tiny", kernels="auto")
    args = argparse.Namespace(activation_checkpointing=True, compile=False)
    built = bench_train.candidates(cfg, torch.device("cpu"), World(), args, gpu=True)
    names = [name for name, _, _ in built]
    assert names[:3] == ["stackfast", "stackfast+compile", "stackfast(kernels=torch)"]
    assert names[3:5] == ["hf-llama-sdpa", "hf-llama+stackfast"]  # kernels under the interpreter here
    x = torch.randint(0, cfg.vocab_size, (2, 17))
    batches = [(x[:, :-1], x[:, 1:])]
    embeddings = []
    for name, build, loss_fn in built:
        if name in ("stackfast+compile", "hf-llama+liger"):
            continue
        model = build()
        embeddings.append(next(model.parameters()).detach().clone())
        bench_train.make_step(model, loss_fn, batches, torch.device("cpu"))()
    assert all(torch.equal(e, embeddings[0]) for e in embeddings)


def test_gpu_suite_kernel_parts_rehearsed_at_toy_sizes(monkeypatch, tmp_path):
    """The GPU suite's own functions (run_all.gpu_parts: ceilings, bf16 checks, attention and
    RMSNorm timing against every baseline that runs here) at toy sizes on the CPU, kernels
    under the interpreter: a GPU session gets one try, so its Python must already work."""
    import torch
    from stackfast.bench import (bench_attention, bench_fused, bench_linear_cross_entropy, bench_rms_norm, gpu_kernels,
                            harness)
    monkeypatch.setattr(run_all, "MATMUL_SIZE", 64)
    monkeypatch.setattr(harness, "COPY_BYTES", 1 << 20)
    monkeypatch.setattr(gpu_kernels, "ATTENTION_CHECKS", [(1, 2, 1, 40, 16, True)])
    monkeypatch.setattr(gpu_kernels, "RMS_NORM_CHECKS", [(5, 80, True)])
    monkeypatch.setattr(bench_attention, "QUICK_CASES", [(1, 2, 1, 33, 16)])
    monkeypatch.setattr(bench_attention, "DOCUMENT_CASE", (1, 1, 1, 96, 16))
    monkeypatch.setattr(bench_rms_norm, "ROWS", 8)
    monkeypatch.setattr(bench_rms_norm, "HIDDEN", 64)
    monkeypatch.setattr(bench_fused, "GPU_CHECKS", bench_fused.SMOKE_CASES)
    monkeypatch.setattr(bench_fused, "TOKENS", (1, 9))
    monkeypatch.setattr(bench_fused, "ROPE_HEADS", (2, 1, 16))
    monkeypatch.setattr(bench_fused, "FFN", 40)
    monkeypatch.setattr(bench_linear_cross_entropy, "GPU_QUICK", (16, 50, 8))
    parts = run_all.gpu_parts(torch.device("cpu"), str(tmp_path))
    assert list(parts) == ["ceilings", "checks", "attention", "rms_norm", "fused", "linear_cross_entropy", "replicate",
                           "train", "train_7b", "growth", "checkpoint"]
    results = {name: parts[name]() for name in ("ceilings", "checks", "attention", "rms_norm", "fused",
                                                "linear_cross_entropy")}
    assert results["ceilings"][0]["what"] == "bf16 matmul 64^3" and results["ceilings"][1]["gbps"] > 0
    assert all(r["ok"] for r in results["checks"])
    attention = [r for r in results["attention"] if r["impl"] == "stackfast"]
    assert {r["pass"] for r in attention} == {"fwd", "fwd+bwd"}
    assert all(r["tflops"] > 0 and (r["baseline"] is None or r["ratio"] > 0) for r in attention)
    documents = {r["impl"]: r for r in results["attention"] if "documents" in r}
    assert documents.keys() == {"stackfast-causal", "stackfast-documents"}  # built-in corpus rows
    assert documents["stackfast-documents"]["skipped"] >= 0 and documents["stackfast-documents"]["ratio"] > 0
    norm = {(r["impl"], r["pass"]) for r in results["rms_norm"]}
    assert {("stackfast", "fwd+bwd"), ("F.rms_norm", "fwd+bwd"), ("torch.compile", "fwd+bwd")} <= norm
    fused = {(r["op"], r["impl"], r["pass"]) for r in results["fused"]}
    assert {(op, impl, p) for op in ("rope", "swiglu") for impl in ("stackfast", "eager")
            for p in ("fwd", "fwd+bwd")} <= fused
    assert {r["impl"] for r in results["linear_cross_entropy"]} >= {"stackfast", "torch"}
    for name in ("ceilings", "gpu_kernels_checks", "bench_attention", "bench_rms_norm", "bench_fused",
                 "bench_linear_cross_entropy"):
        assert json.loads(next(tmp_path.glob(f"{name}-*.json")).read_text())["rows"]
    rows = {r["what"]: r for r in run_all.summary_rows(results)}
    assert "attention fwd+bwd 1x2/1x33x16" in rows and "rms_norm fwd+bwd 8x64 bf16" in rows
    assert "rope fwd+bwd 1x9x2/1x16 bfloat16" in rows and "swiglu fwd+bwd 9x40 bfloat16" in rows
    assert "linear_cross_entropy 16x50x8 bf16 peak memory" in rows


def test_gpu_timing_path_reports_fits_failures_and_skips(monkeypatch, capsys):
    """bench_train's one-at-a-time path (the GPU's), run on the CPU: a candidate that fails is
    a row with its error and the others are still timed; a model whose training state cannot
    fit is skipped with the numbers."""
    import argparse
    import torch
    from stackfast.bench import bench_train
    from stackfast.config import ModelConfig
    from stackfast.parallel import World
    cfg = ModelConfig.from_preset("tiny", kernels="torch")
    args = argparse.Namespace(activation_checkpointing=False, compile=False)
    built = bench_train.chosen(bench_train.candidates(cfg, torch.device("cpu"), World(), args), "stackfast")

    def broken():
        raise RuntimeError("liger_kernel does not support this transformers version")
    built.append(("hf-llama+liger", broken, bench_train.hf_loss))
    x = torch.randint(0, cfg.vocab_size, (2, 17))
    batches = [(x[:, :-1], x[:, 1:])]
    results = bench_train.time_candidates(cfg, built, batches, torch.device("cpu"), World(), reps=2,
                                          one_at_a_time=True)
    (name, timing, note), (_, no_timing, failure) = results
    assert name == "stackfast" and timing["median_ms"] > 0 and note is None
    assert no_timing is None
    assert failure == "failed: RuntimeError: liger_kernel does not support this transformers version"
    monkeypatch.setattr(bench_train, "memory_problem", lambda cfg, device: "skipped: needs 88 GiB, the GPU has 79 GiB")
    results = bench_train.time_candidates(cfg, built[:1], batches, torch.device("cpu"), World(), reps=2,
                                          one_at_a_time=True)
    assert results == [("stackfast", None, "skipped: needs 88 GiB, the GPU has 79 GiB")]
