"""stackfast.checkpoint is a package of one module per job that re-exports, lazily, every name
callers import from it.

What must hold: each name that any module, test, benchmark or script of the repository
imports `from stackfast.checkpoint` resolves there (and __all__ lists it); and the run-folder
side (listing checkpoints, reading config.toml: `stackfast.runs`) imports no torch, so the
lazy re-export must not import every module up front.
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

import stackfast.checkpoint as checkpoint

REPO = Path(__file__).resolve().parent.parent


def imported_names():
    names = set()
    for path in REPO.glob("**/*.py"):
        if ".venv" in path.parts or "build" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "stackfast.checkpoint":
                names |= {alias.name for alias in node.names}
    return names


def test_every_imported_name_resolves_and_is_listed():
    names = imported_names()
    assert {"save_checkpoint", "AsyncSaver", "load_weights", "save_hf", "STEP_DIR"} <= names  # the scan works
    assert names <= set(checkpoint.__all__), names - set(checkpoint.__all__)
    for name in checkpoint.__all__:
        assert getattr(checkpoint, name) is not None, name


def test_listing_checkpoints_imports_no_torch():
    code = ("import json, sys\nfrom stackfast.checkpoint import list_checkpoints, load_config_of\nimport stackfast.runs\n"
            "import stackfast.checkpoint as c\nprint(json.dumps(['torch' in sys.modules, dir(c)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         check=True)
    torch_loaded, listed = json.loads(out.stdout)
    assert not torch_loaded
    assert set(checkpoint.__all__) <= set(listed)
