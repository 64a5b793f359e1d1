"""Lightning's single-file checkpoints (``.ckpt``), both ways.

Reading: ``read_any`` takes a raytrainer checkpoint (a committed folder, verified) or a ``.ckpt``
file (Lightning's or one written here), local or any fsspec URI, and returns the checkpoint dict
with Lightning's keys. Writing: ``write_ckpt`` puts a full state in one file that
pytorch-lightning's ``load_from_checkpoint`` reads, committed atomically (a temp file and a rename
locally; one PUT on object stores).

The run's own checkpoints stay folders for now (per-rank RNG files, sharded FSDP state, a commit
marker with hashes); a ``.ckpt`` written by ``trainer.save_checkpoint(path)`` is an export of the
state at that moment.
"""
from __future__ import annotations

import io
from typing import Any, Mapping

import torch

from raytrainer import storage
from raytrainer.checkpoint import sealed
from raytrainer.checkpoint.format import COMMIT_FILE, read_marker, serialize
from raytrainer.checkpoint.layout import lightning_dict, resumable_state
from raytrainer.checkpoint.store import latest_committed, write_atomically
from raytrainer.checkpoint.store import load as load_committed
from raytrainer.errors import CheckpointError

def read_any(path: str, map_location: Any = None, weights_only: bool | None = None,
             storage_options: Mapping | None = None) -> dict:
    """The checkpoint at ``path``: a ``.ckpt`` file (Lightning's, an export, or a run's, then checked
    against its seal) or a committed checkpoint folder.
    ``weights_only`` (default True, torch's): a file is unpickled only as tensors and plain
    containers; pass False for a trusted file that holds other objects."""
    path = str(path)
    fs, fs_path = storage.filesystem(path, storage_options)
    if fs.isdir(fs_path):
        if read_marker(path, storage_options) is None:
            raise CheckpointError(f"{path} is a folder but not a committed checkpoint (no valid {COMMIT_FILE}): "
                                  "an interrupted save, or not a checkpoint")
        state = load_committed(path, storage_options)
        return _mapped(state, map_location) if map_location is not None else state
    if not fs.exists(fs_path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    with fs.open(fs_path, "rb") as f:
        data = f.read()
    if sealed.read_seal(data[-sealed.tail_size():]) is not None:
        sealed.verify(data, path)  # a run's checkpoint: never read torn or altered
    try:
        return torch.load(io.BytesIO(data), map_location=map_location,
                          weights_only=True if weights_only is None else weights_only)
    except Exception as e:
        if weights_only is None and "Unsupported global" in str(e):
            raise CheckpointError(f"{path} holds objects other than tensors and plain containers: pass "
                                  "weights_only=False if you trust the file") from e
        raise CheckpointError(f"{path} is not a readable checkpoint: {e}") from e


def _mapped(state: dict, map_location: Any) -> dict:
    """A folder checkpoint's tensors moved as torch.load's ``map_location`` would."""
    if callable(map_location):
        raise ValueError("map_location as a function applies to .ckpt files; a checkpoint folder loads its "
                         "tensors on the CPU: pass a device (or a {from: to} dict) to move them")

    def move(x):
        if isinstance(x, torch.Tensor):
            target = map_location.get(str(x.device), x.device) if isinstance(map_location, dict) else map_location
            return x.to(target)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(move(v) for v in x)
        return x
    return {**state, "state_dict": move(state["state_dict"])}


def write_ckpt(path: str, checkpoint: dict, storage_options: Mapping | None = None) -> str:
    """Write ``checkpoint`` to the file ``path``, atomically; returns ``path``."""
    fs, fs_path = storage.filesystem(str(path), storage_options)
    write_atomically(fs, fs_path, serialize(checkpoint))
    return str(path)


def export_newest(cfg, final_step: int, path: str, weights_only: bool = False) -> str:
    """After a fit on Ray workers (gone by then): the run's newest committed checkpoint, which
    holds the final weights when it was taken at the fit's last step, as one .ckpt at ``path``."""
    uri = latest_committed(cfg, cfg.storage_options)
    state = load_committed(uri, cfg.storage_options) if uri else None
    if state is None or state["global_step"] != final_step:
        raise ValueError(f"save_checkpoint({path!r}) after a fit on Ray workers exports the run's newest committed "
                         f"checkpoint, and none was committed at its last step ({final_step}): keep "
                         "enable_checkpointing=True with ModelCheckpoint(save_last=True), or call "
                         "trainer.save_checkpoint(path) from a callback during the fit")
    return write_ckpt(path, lightning_dict(state, weights_only), cfg.storage_options)


def is_ckpt_file(path: str, storage_options: Mapping | None = None) -> bool:
    fs, fs_path = storage.filesystem(str(path), storage_options)
    return fs.isfile(fs_path)


def require_readable_file(path: str, storage_options: Mapping | None = None) -> None:
    """A cheap check on the driver, before anything starts: a torch.save file (a zip archive)."""
    fs, fs_path = storage.filesystem(str(path), storage_options)
    with fs.open(fs_path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        raise CheckpointError(f"{path} is not a checkpoint file (torch.save writes a zip archive; this is not one)")


def load_for_run(path: str, storage_options: Mapping | None = None, strategy=None) -> dict:
    """The state a run restores from: a committed folder as written, or a ``.ckpt`` file read
    as raytrainer's restore takes it (``resumable_state``)."""
    if not is_ckpt_file(path, storage_options):
        return load_committed(path, storage_options, strategy=strategy)
    return resumable_state(read_any(path, "cpu", None, storage_options), path)


