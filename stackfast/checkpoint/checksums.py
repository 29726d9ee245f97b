"""checksums.json: the sha256 of every file of a checkpoint, weights or export folder.

A resume or export re-hashes the files and refuses one whose bytes changed (a flipped bit
keeps its size; DCP would load it silently). Each rank hashes its share of the files, on
save and on load; DCP's .metadata (every tensor's shard, offset and length) is listed too.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch.distributed as dist

from stackfast.checkpoint.layout import CHECKSUM_FILE, CheckpointError
from stackfast.parallel import World, barrier


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(folder: Path, world: World = World()) -> None:
    """checksums.json: the sha256 of every file in `folder`, each rank hashing every
    world_size-th one into a part file that rank 0 merges after a barrier (collective under
    FSDP; files and barriers only: no object collective at the end of a run's last save)."""
    hash_share(folder, world)
    barrier(world)
    merge_checksums(folder, world)


def hash_share(folder: Path, world: World) -> None:
    """This rank's share of checksums.json (every world_size-th file) into its part file."""
    # Part files may already be there (a faster rank's): never hashed themselves.
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(CHECKSUM_FILE))
    part = folder / f"{CHECKSUM_FILE}.rank{world.rank}"
    part.write_text(json.dumps({name: sha256(folder / name) for name in names[world.rank::world.world_size]}))


def merge_checksums(folder: Path, world: World) -> None:
    """Rank 0, once every rank's part is written: the parts merged into checksums.json."""
    if world.main:
        parts = [folder / f"{CHECKSUM_FILE}.rank{r}" for r in range(world.world_size)]
        checksums = {name: digest for p in parts for name, digest in json.loads(p.read_text()).items()}
        (folder / CHECKSUM_FILE).write_text(json.dumps(checksums, indent=1, sort_keys=True) + "\n")
        for p in parts:
            p.unlink()


def verify_checksums(folder: Path, world: World = World(), required: list[str] | None = None) -> None:
    """Re-hash the files that checksums.json lists, each rank its share (collective under
    FSDP); a file whose bytes changed is an error naming it, raised on every rank.

    `required`: the files that must be listed (default: every file of the folder; a Hugging
    Face folder names the ones stackfast reads, so a README added later does no harm). A
    folder without checksums.json is refused: callers skip this check only when the user
    allowed unverified files explicitly."""
    path = folder / CHECKSUM_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CHECKSUM_FILE}, so a changed or corrupt file would go unnoticed; if "
                              f"you trust these files, allow that explicitly (--allow-unverified, or "
                              f"checkpoint.allow_unverified = true in a run's config)")
    try:
        expected = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt checksum list ({e.msg})") from None
    # Plain file names of this folder mapped to hex digests; anything else is not ours.
    if not (isinstance(expected, dict) and all(isinstance(v, str) and Path(k).name == k and k not in ("", ".", "..")
                                               for k, v in expected.items())):
        raise CheckpointError(f"{path}: corrupt checksum list (expected file names of this folder and their sha256)")
    if required is None:
        required = [p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(CHECKSUM_FILE)]
    unlisted = sorted(set(required) - set(expected))
    if unlisted:
        raise CheckpointError(f"{folder / unlisted[0]}: not in {CHECKSUM_FILE} (a file added or renamed after the "
                              f"folder was written)")
    missing = sorted(name for name in expected if not (folder / name).is_file())
    if missing:
        raise CheckpointError(f"{folder / missing[0]}: missing (listed in {CHECKSUM_FILE})")
    names = sorted(expected)
    bad = [name for name in names[world.rank::world.world_size] if sha256(folder / name) != expected[name]]
    if world.distributed:
        parts = [None] * world.world_size
        dist.all_gather_object(parts, bad)
        bad = sorted(name for part in parts for name in part)
    if bad:
        more = f"; also {', '.join(bad[1:])}" if len(bad) > 1 else ""
        raise CheckpointError(f"{folder / bad[0]}: checksum mismatch: the file changed after the checkpoint "
                              f"was saved (disk or copy corruption){more}. Resume from an earlier checkpoint")
