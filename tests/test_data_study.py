"""benchmarks/data_study.py: bad arguments get one line and exit 2, and a tiny rehearsal
(2 arms, a 1-LR ladder, 2 steps, 1 seed) runs each arm with its own data settings on a
corpus slice of one epoch and writes the paired comparison."""
import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import data_study  # noqa: E402
import stackfast.recipes as recipes  # noqa: E402
from stackfast.config import load_config  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    (["--arms", "scratch_epoch,bogus"], "--arms"),
    (["--arms", "scratch_epoch,scratch_epoch"], "--arms"),
    (["--kinds", "linear"], "--kinds"),
    (["--seeds", "0"], "--seeds"),
    (["--seeds", "6"], "--seeds"),
    (["--budget", "0"], "--budget"),
    (["--epochs", "-1"], "--epochs"),
])
def test_bad_arguments_name_the_problem(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        data_study.main(argv + ["--runs-dir", str(tmp_path)])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing ran


def test_a_tiny_study_runs_each_arm_with_its_data_settings(monkeypatch, tmp_path):
    monkeypatch.setattr(recipes, "LR_LADDER", (3e-2,))  # a 1-LR search: nothing to step out to
    monkeypatch.setattr(recipes, "START", (3e-2,))
    out = tmp_path / "study.json"
    study = data_study.main(["--budget", "5e9", "--arms", "scratch_random,scratch_epoch", "--seeds", "1",
                             "--no-noise-run", "--runs-dir", str(tmp_path / "runs"), "--out", str(out)])
    assert json.loads(out.read_text())["comparisons"] == json.loads(json.dumps(study["comparisons"]))
    assert study["steps"] == 2 and study["reads"]["epochs"] == 1.0  # the slice holds the rows read, once
    assert study["reads"]["train_tokens"] == 2 * 16 * 128 + 1
    assert set(study["search"]) == {"scratch_random", "scratch_epoch"}
    assert all(list(k["losses"]) == ["0.03"] for a in study["search"].values() for k in a.values())
    assert set(study["final_losses"]) == {"scratch_random", "scratch_epoch"}
    assert list(study["comparisons"]) == ["scratch_epoch vs scratch_random"]
    assert study["comparisons"]["scratch_epoch vs scratch_random"]["seeds"] == [recipes.FINAL_SEEDS[0]]
    for run in study["runs"]:  # every run read the slice, with its arm's sampling
        cfg = load_config(Path(run["run_dir"]) / "config.toml")
        assert cfg.data.sampling == run["recipe"].removeprefix("scratch_")
        assert Path(cfg.data.path).name == f"corpus-{2 * 16 * 128 + 1}"
