"""What an installed stackfast needs and declares: optional dependencies stay optional.

`without(...)` runs a command in a subprocess where some top-level modules cannot be
imported (a meta-path finder installed by a sitecustomize.py raises ImportError for
them), as on a machine where they are not installed.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = ['model.preset="tiny"', "model.kernels=torch", "data.seq_len=32", "train.micro_batch_size=2",
        "train.eval_batches=1", "logging.tensorboard=false", "logging.progress=false"]

BLOCKER = '''
import sys

class _Hide:
    """Makes `import NAME` (and its submodules) fail as if NAME were not installed."""
    hidden = {hidden!r}

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.hidden:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by the test)", name=name)
        return None

sys.meta_path.insert(0, _Hide())
'''


def without(modules: list[str], tmp_path: Path, *args: str, python_code: str | None = None):
    """Run `python -m stackfast ARGS` (or `python -c CODE`) with `modules` unimportable."""
    site = tmp_path / f"hide-{'-'.join(modules)}"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER.format(hidden=set(modules)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    command = ["-c", python_code] if python_code is not None else ["-m", "stackfast", *args]
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=600)


def test_the_blocker_hides_triton(tmp_path):
    out = without(["triton"], tmp_path, python_code="import triton")
    assert out.returncode != 0 and "hidden by the test" in out.stderr


def test_import_info_train_grow_eval_work_without_triton(tmp_path):
    code = ("import sys, stackfast, stackfast.ops, stackfast.growth, stackfast.train, stackfast.cli\n"
            "assert 'triton' not in sys.modules\n"
            "try:\n    from stackfast.ops import attention\nexcept ImportError as e:\n    print('lazy:', e)\n")
    out = without(["triton"], tmp_path, python_code=code)
    assert out.returncode == 0, out.stderr
    assert "lazy:" in out.stdout and "triton" in out.stdout  # the Triton op names what it misses

    out = without(["triton"], tmp_path, "info", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["triton"] is None

    run_dir = tmp_path / "run"
    sets = [a for s in [*TINY, "train.max_steps=2", f'logging.run_dir="{run_dir}"'] for a in ("--set", s)]
    out = without(["triton"], tmp_path, "train", *sets)
    assert out.returncode == 0, out.stderr
    ckpt = run_dir / "checkpoints" / "step_00000002"
    assert ckpt.is_dir()

    out = without(["triton"], tmp_path, "grow", "--checkpoint", str(ckpt), "--factor", "2", "--out",
                  str(tmp_path / "grown"))
    assert out.returncode == 0, out.stderr

    out = without(["triton"], tmp_path, "eval", "--checkpoint", str(tmp_path / "grown"), "--batches", "1",
                  "--batch-size", "2", "--seq-len", "16")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["val_loss"] > 0


def test_eval_tasks_without_lm_eval_is_one_line(tmp_path):
    (tmp_path / "ckpt").mkdir()  # lm-eval is looked for once the checkpoint folder is found
    out = without(["lm_eval"], tmp_path, "eval", "--checkpoint", str(tmp_path / "ckpt"), "--tasks", "piqa")
    assert out.returncode == 2
    assert out.stderr.startswith("stackfast: error:") and "lm-evaluation-harness" in out.stderr, out.stderr


def test_one_version_and_declared_dependencies():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 reads pyproject.toml itself
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "stackfast.__version__"}
    deps = project["project"]["dependencies"]
    assert "tomli>=1.1; python_version < '3.11'" in deps
    extras = project["project"]["optional-dependencies"]
    assert not any("pytest-benchmark" in d for group in extras.values() for d in group)
    assert any(d.startswith("lm-eval") for d in extras["eval"])
    assert "torch" not in " ".join(project["build-system"]["requires"])  # setup.py says why


def test_ops_lists_its_lazy_names():
    """dir() and tab completion show the lazily imported kernels before their first use (a
    fresh process: here another test may have imported them already); __all__ names exactly
    the public names, and each of them resolves."""
    import stackfast.ops as ops

    eager = {"extension_info", "extension_summary", "replicate_", "replicate_ref"}
    assert set(ops.__all__) == set(ops._LAZY) | eager and len(ops.__all__) == len(set(ops.__all__))
    out = subprocess.run([sys.executable, "-c", "import json, stackfast.ops as o; print(json.dumps(dir(o)))"],
                         capture_output=True, text=True, cwd=REPO, timeout=120, check=True)
    listed = json.loads(out.stdout)
    assert listed == sorted(listed) and set(ops.__all__) <= set(listed), set(ops.__all__) - set(listed)
    pytest.importorskip("triton")
    for name in ops.__all__:
        assert callable(getattr(ops, name)), name
