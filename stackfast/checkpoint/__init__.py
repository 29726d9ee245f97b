"""Checkpoints: save, find, load; never unpickles arbitrary objects.

A training checkpoint is a folder `<run_dir>/checkpoints/step_XXXXXXXX/` holding the model
and AdamW state as DCP shards, each process's RNG state, state.json (the loop state),
config.toml (the resolved config) and checksums.json (the sha256 of every other file). One
module per job:

    layout.py      folder names, listing, the newest, pruning, stale saves, state.json and
                   config.toml (no torch: run-folder checks and --resume auto use it alone)
    checksums.py   checksums.json: written on save, re-hashed and compared on load
    dcp_io.py      the one writer of a checkpoint's files and the safe DCP reader
    save.py        the sync save: temporary folder, rename into place, prune, failure line
    async_save.py  checkpoint.async_save: the same files written on a background thread
    weights.py     a model's weights from any checkpoint; weights-only folders (grow)
    hf.py          Hugging Face Llama folders: import and export

The public names are importable from here, as they were before this was a package; each
is imported from its module on first use (PEP 562 `__getattr__` below), so
`from stackfast.checkpoint import list_checkpoints` does not import torch.
"""
from stackfast.lazy import lazy_exports

# Public name -> the module that defines it, imported when the name is first asked for.
_LAZY = {
    **dict.fromkeys(["STEP_DIR", "CheckpointError", "latest_checkpoint", "list_checkpoints", "load_config_of",
                     "load_state", "remove_stale_saves"], "layout"),
    **dict.fromkeys(["verify_checksums", "write_checksums"], "checksums"),
    **dict.fromkeys(["load_checkpoint"], "dcp_io"),
    **dict.fromkeys(["save_checkpoint"], "save"),
    **dict.fromkeys(["AsyncSaver"], "async_save"),
    **dict.fromkeys(["load_into_model", "load_model", "load_model_source", "load_weights", "model_from_weights",
                     "save_weights_folder"], "weights"),
    **dict.fromkeys(["hf_llama_config", "is_hf_dir", "load_hf", "save_hf", "to_hf_state_dict"], "hf"),
}
__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
