"""The data package's offline side (tokenize, its readers and workers) never imports torch."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

# A stand-in torch, first on the path of the scripts below and of the workers they spawn: a
# process that imports torch leaves a file named by its pid, and gets the real torch.
FAKE_TORCH = """
import importlib, os, sys
open(os.path.join(os.environ["TORCH_IMPORTS"], str(os.getpid())), "w").close()
here = sys.path.index(os.path.dirname(os.path.dirname(__file__)))
fake = sys.path.pop(here)
del sys.modules["torch"]
try:
    sys.modules["torch"] = importlib.import_module("torch")
finally:  # spawned workers get this process's sys.path: the stand-in stays first on theirs
    sys.path.insert(here, fake)
"""

SCRIPT = """
import sys
import stackfast.data.parts, stackfast.data.pipeline, stackfast.data.readers, stackfast.data.shards
import stackfast.data.tokenizer
from stackfast.data import TokenData, tokenize
if __name__ == "__main__":  # not again in the spawned workers, which import this file
    stackfast.data.pipeline.BATCH_DOCUMENTS = 1  # a batch per document: the workers get all but the first
    for workers in (1, 2):
        tokenize([sys.argv[1]], "bytes", f"{sys.argv[2]}/{workers}", val_fraction=0.1, workers=workers)
    assert "torch" not in sys.modules, "the parent imported torch"
    one, two = TokenData(f"{sys.argv[2]}/1"), TokenData(f"{sys.argv[2]}/2")
    assert [s.tokens.tolist() for s in one.train] == [s.tokens.tolist() for s in two.train]
"""

# What the `stackfast` console script runs: spawned workers import it again (as __mp_main__).
CLI = """
import os, sys
from stackfast.cli import main
if __name__ == "__main__":
    print(os.getpid())  # the command's own process: it may import torch (the train command's arguments do)
    sys.exit(main())
"""


def _run(tmp_path: Path, script: str, *args) -> tuple[list[str], str]:
    """Run `script` in a fresh interpreter with the stand-in torch: the pids that imported
    torch, and the script's output."""
    (tmp_path / "fake" / "torch").mkdir(parents=True)
    (tmp_path / "fake" / "torch" / "__init__.py").write_text(FAKE_TORCH)
    (tmp_path / "imports").mkdir()
    (tmp_path / "script.py").write_text(textwrap.dedent(script))
    root = Path(__file__).resolve().parents[1]
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "TORCH_IMPORTS": str(tmp_path / "imports"),
           "PYTHONPATH": f"{tmp_path / 'fake'}:{root}"}
    done = subprocess.run([sys.executable, str(tmp_path / "script.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return sorted(p.name for p in (tmp_path / "imports").iterdir()), done.stdout


def _corpus(tmp_path: Path, documents: int) -> Path:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " * 5}) + "\n" for i in range(documents)))
    return corpus


def test_tokenize_and_its_workers_never_import_torch(tmp_path):
    imports, _ = _run(tmp_path, SCRIPT, _corpus(tmp_path, 8), tmp_path / "out")
    assert imports == []


def test_tokenize_command_workers_never_import_torch(tmp_path):
    """The workers of the `stackfast` command import its module again (spawn's __mp_main__)."""
    from stackfast.data.pipeline import BATCH_DOCUMENTS
    corpus = _corpus(tmp_path, 4 * BATCH_DOCUMENTS)  # four batches: the workers encode three
    imports, output = _run(tmp_path, CLI, "tokenize", "--input", corpus, "--tokenizer", "bytes",
                           "--out", tmp_path / "out", "--workers", "2")
    assert set(imports) <= {output.split()[0]}
