"""What a checkpoint is on storage: its names, its files, its commit marker, and how a file is
read back safely. Pure format: nothing here writes (store.py does).

A run's checkpoint is one Lightning-format file, ``{storage_path}/{name}/checkpoints/
step=000001234[-epoch_end].ckpt``: Lightning's keys (``torch.load(path, weights_only=True)
["state_dict"]`` works, and pytorch-lightning's ``load_from_checkpoint``), raytrainer's
exact-resume state beside them (every rank's RNG, the data position, metric aggregates), and a
commit seal at its end (sealed.py): the file's sha256 and its position. It is written whole or
not at all (a temp file and a rename locally; one PUT on object stores).

A sharded FSDP checkpoint is a folder of the same name without the suffix, as in Lightning::

    sharded/      every rank's shards of the model and optimizer states, written by
                  torch.distributed.checkpoint (sharded.py)
    state.pt      everything else: schedulers, GradScaler, loop counters, data position,
                  callbacks, loggers, metric aggregates, hparams, format version
    rank-NNNNN.pt each rank's RNG states (python, numpy, torch, CUDA) and its epoch-start RNG
    COMMIT.json   written last: sha256 and size of every file above. Without it the folder is not
                  a checkpoint (a save that died half-way); with it, every load verifies hashes.

Folders with ``model.pt`` instead of ``sharded/`` are the format before ``.ckpt`` files: still
read (and resumed from), with a deprecation warning.

Loading uses ``torch.load(weights_only=True)`` and, for sharded/.metadata, an unpickler that
admits only DCP's index classes: no arbitrary unpickling, ever.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from typing import Any, Mapping

import torch

from raytrainer import storage
from raytrainer.checkpoint import sealed
from raytrainer.errors import CheckpointError

COMMIT_FILE = "COMMIT.json"
MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
SHARDED_DIR = "sharded"  # DCP's files of a sharded checkpoint (sharded.py)
SHARDED_METADATA = f"{SHARDED_DIR}/.metadata"
_SHARD_RE = re.compile(rf"{SHARDED_DIR}/__\d+_\d+\.distcp")
CKPT_SUFFIX = ".ckpt"
_DIR_RE = re.compile(r"^step=(\d{9})(-epoch_end)?(\.ckpt)?$")


def checkpoint_dir_name(global_step: int, epoch_end: bool, sharded: bool = False) -> str:
    """``step=000001234[-epoch_end].ckpt``: a file; a sharded checkpoint's folder has no suffix."""
    return f"step={global_step:09d}" + ("-epoch_end" if epoch_end else "") + ("" if sharded else CKPT_SUFFIX)


def is_file_checkpoint(uri: str) -> bool:
    return uri.rstrip("/").endswith(CKPT_SUFFIX)


def is_run_checkpoint_name(uri: str) -> bool:
    """Named as a run's checkpoint (``step=000001234[-epoch_end][.ckpt]``)."""
    return _DIR_RE.match(uri.rstrip("/").rsplit("/", 1)[-1]) is not None


def checkpoints_root(cfg) -> str:
    return storage.join(cfg.run_dir, "checkpoints")


def checkpoint_uri(cfg, global_step: int, epoch_end: bool, sharded: bool = False) -> str:
    return storage.join(checkpoints_root(cfg), checkpoint_dir_name(global_step, epoch_end, sharded))


def serialize(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def read_marker(uri: str, storage_options: Mapping | None = None) -> dict | None:
    """What a checkpoint says it is (its step, epoch, fit, loggers' versions), or None when it is
    not committed: a ``.ckpt`` file's seal (read from its last bytes only), a folder's COMMIT.json."""
    fs, path = storage.filesystem(uri, storage_options)
    if is_file_checkpoint(uri):
        try:
            return sealed.read_seal(fs.cat_file(path, start=-sealed.tail_size()))
        except (FileNotFoundError, IsADirectoryError):
            return None
    try:
        marker = json.loads(fs.cat_file(f"{path}/{COMMIT_FILE}"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None  # a torn marker counts as not committed
    if not isinstance(marker, dict) or not _valid_file_table(marker.get("files")):
        return None  # a marker without a usable file table commits nothing
    return marker


def is_sharded_file(name: str) -> bool:
    return name == SHARDED_METADATA or _SHARD_RE.fullmatch(name) is not None


def _valid_file_table(files) -> bool:
    """state.pt, rank files, and the model either as model.pt (full) or as sharded/.metadata plus
    shard files (sharded), never both; no other names (a table naming ../x is not ours)."""
    return (isinstance(files, dict) and STATE_FILE in files and (MODEL_FILE in files) != (SHARDED_METADATA in files)
            and all(isinstance(v, dict) and "sha256" in v and "size" in v for v in files.values())
            and all(n in (MODEL_FILE, STATE_FILE) or re.fullmatch(r"rank-\d{5}\.pt", n) or is_sharded_file(n)
                    for n in files))


def require_committed(uri: str, storage_options: Mapping | None = None) -> dict:
    """The commit marker of checkpoint ``uri``; CheckpointError if it is missing or uncommitted."""
    marker = read_marker(uri, storage_options)
    if marker is None:
        fs, path = storage.filesystem(uri, storage_options)
        if not fs.exists(path):
            raise CheckpointError(f"checkpoint {uri} does not exist: pass a checkpoint "
                                  f"(.../checkpoints/step=....ckpt), 'last' or 'best'")
        what = "no commit seal" if is_file_checkpoint(uri) else f"no valid {COMMIT_FILE}"
        raise CheckpointError(f"checkpoint {uri} is not committed ({what}): the save "
                              "that wrote it did not finish; use an earlier checkpoint")
    return marker


def read_verified(fs, path: str, uri: str, name: str, info: Mapping) -> bytes:
    """The bytes of ``{path}/{name}``, checked against their COMMIT.json entry ``info``."""
    try:
        data = fs.cat_file(f"{path}/{name}")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {uri} is missing {name}; load an earlier checkpoint") from None
    if len(data) != info["size"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise CheckpointError(f"checkpoint file {uri}/{name} is corrupted: its content does not "
                              f"match the hash recorded in {COMMIT_FILE}; load an earlier checkpoint")
    return data


def torch_load(data: bytes, where: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"refusing to load {where}: it holds objects that are not plain "
                              f"tensors/containers (weights_only=True): {e}") from e


def load_module_state(module: torch.nn.Module, state_dict: dict) -> None:
    """Load weights strictly, naming mismatched keys and shapes (a checkpoint of another model)."""
    check_module_state(module, state_dict)
    module.load_state_dict(state_dict)


def check_module_state(module: torch.nn.Module, state_dict: dict) -> None:
    """Raise CheckpointError naming missing/unexpected keys and shape mismatches."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(k for k in set(own) & set(state_dict)
                    if hasattr(own[k], "shape") and tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:10]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:10]}")
        if shapes:
            parts.append("shape mismatch " + ", ".join(
                f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}" for k in shapes[:10]))
        raise CheckpointError(f"the checkpoint does not fit {type(module).__name__}: " + "; ".join(parts)
                              + ". Was it saved from another model (or before the model changed)? Load it "
                              "into the model that saved it")


def plain_hparams(hparams: Mapping) -> dict:
    """hparams as plain data (what weights_only loading accepts); other objects become repr()."""
    def plain(v: Any) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        return repr(v)
    return {str(k): plain(v) for k, v in hparams.items()}
