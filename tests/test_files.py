"""Folders written atomically (stackfast/files.py) and where they land.

What must hold: every folder stackfast writes has the mode the umask leaves (0755 under
umask 022, 0750 under 027), as run folders do: a tokenized dataset, a weights folder
(`stackfast grow`), a Hugging Face export and a checkpoint that another user of a shared
cluster should read (tempfile.mkdtemp made them 0700). And an output that is a symbolic
link, replaced (`--force`), is replaced where the link points: the link stays, the target
holds the new output, and no hidden entry (`.NAME.old-*`, `.NAME.tmp-*`) is left anywhere.
"""
import os
import stat

import pytest
import torch

from stackfast import cli
from stackfast.checkpoint import list_checkpoints, save_checkpoint, save_hf, save_weights_folder
from stackfast.config import Config, ModelConfig
from stackfast.data import TokenData
from stackfast.files import write_folder
from stackfast.model import Transformer


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_folder_gives_the_umask_mode(tmp_path, umask):
    write_folder(tmp_path / "out", lambda tmp: (tmp / "f.txt").write_text("x"))
    assert mode(tmp_path / "out") == 0o777 & ~umask
    assert mode(tmp_path / "out" / "f.txt") == 0o666 & ~umask
    # Replacing it keeps the mode too.
    write_folder(tmp_path / "out", lambda tmp: (tmp / "g.txt").write_text("y"))
    assert mode(tmp_path / "out") == 0o777 & ~umask and os.listdir(tmp_path / "out") == ["g.txt"]


def test_every_folder_written_atomically_gets_the_umask_mode(tmp_path, umask):
    """Tokenize output, a weights folder (grow), a Hugging Face export, a checkpoint."""
    (tmp_path / "t.txt").write_text("hello world\n" * 20)
    assert cli.main(["tokenize", "--input", str(tmp_path / "t.txt"), "--tokenizer", "bytes",
                     "--out", str(tmp_path / "ds")]) == 0
    model = Transformer(ModelConfig.from_preset("tiny"))
    config = Config()
    save_weights_folder(tmp_path / "grown", model, config, {"step": 0})
    save_hf(tmp_path / "hf", model)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, model, optimizer, {"run_id": "r", "step": 1}, config, 1)
    [checkpoint] = list_checkpoints(tmp_path / "run" / "checkpoints")
    for folder in (tmp_path / "ds", tmp_path / "grown", tmp_path / "hf", checkpoint):
        assert mode(folder) == 0o777 & ~umask, folder


def hidden(*folders):
    return sorted(p.name for folder in folders for p in folder.iterdir() if p.name.startswith("."))


def test_a_symlinked_output_is_replaced_where_it_points_and_the_link_stays(tmp_path):
    target, link = tmp_path / "disk" / "data", tmp_path / "work" / "data"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("old")
    link.parent.mkdir()
    link.symlink_to(target, target_is_directory=True)
    write_folder(link, lambda tmp: (tmp / "new.txt").write_text("new"))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert os.listdir(target) == ["new.txt"] and (link / "new.txt").read_text() == "new"
    assert hidden(target.parent, link.parent) == []
    # A relative link that dangles: the output is made where it points.
    (tmp_path / "work" / "later").symlink_to("../disk/later")
    write_folder(tmp_path / "work" / "later", lambda tmp: (tmp / "a.txt").write_text("a"))
    assert (tmp_path / "work" / "later").is_symlink() and (tmp_path / "disk" / "later" / "a.txt").read_text() == "a"
    assert hidden(target.parent, link.parent) == []


def test_tokenize_out_a_symlink_with_force_replaces_the_target(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("first corpus\n" * 10)
    (tmp_path / "b.txt").write_text("the second, longer corpus\n" * 10)
    target, link = tmp_path / "scratch" / "ds", tmp_path / "ds"
    target.parent.mkdir()
    link.symlink_to(target, target_is_directory=True)
    for name in ("a.txt", "b.txt"):
        assert cli.main(["tokenize", "--input", str(tmp_path / name), "--tokenizer", "bytes", "--out", str(link),
                         "--force"]) == 0, capsys.readouterr().err
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert TokenData(link).index["total_tokens"] == len((tmp_path / "b.txt").read_bytes())
    assert TokenData(target).index["total_tokens"] == len((tmp_path / "b.txt").read_bytes())
    assert hidden(tmp_path, target.parent) == []
