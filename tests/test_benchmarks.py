"""The benchmark suite's CPU path, end to end at tiny sizes (timings are not asserted: a
shared machine is noisy; the rows, the same-run baselines and the JSON are)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import run_all  # noqa: E402


def test_cpu_suite_writes_rows_with_same_run_baselines(tmp_path, capsys):
    assert run_all.main(["--cpu", "--quick", "--out", str(tmp_path)]) == 0
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
