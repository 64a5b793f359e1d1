"""Checkpoint format, atomic commit, verified load.

A checkpoint is a folder ``{storage_path}/{name}/checkpoints/step=000001234[-epoch_end]/``::

    model.pt      the module's state_dict (full; or, sharded, sharded/ below instead)
    state.pt      everything else: optimizers, schedulers, GradScaler, loop counters, data
                  position, callbacks, loggers, metric aggregates, hparams, format version
    rank-NNNNN.pt each rank's RNG states (python, numpy, torch, CUDA) and its epoch-start RNG
    sharded/      strategy="fsdp_sharded" only: every rank's shards of the model and optimizer
                  states, written by torch.distributed.checkpoint (sharded_checkpoint.py); then
                  state.pt holds no model or optimizer state
    COMMIT.json   written last: sha256 and size of every file above. Without it the folder is not
                  a checkpoint (a save that died half-way); with it, every load verifies hashes.

Loading uses ``torch.load(weights_only=True)`` and, for sharded/.metadata, an unpickler that
admits only DCP's index classes: no arbitrary unpickling, ever.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import time
from typing import Any, Mapping

import torch

from raytrainer import storage

COMMIT_FILE = "COMMIT.json"
MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
SHARDED_DIR = "sharded"  # DCP's files of a sharded checkpoint (sharded_checkpoint.py)
SHARDED_METADATA = f"{SHARDED_DIR}/.metadata"
_SHARD_RE = re.compile(rf"{SHARDED_DIR}/__\d+_\d+\.distcp")
_DIR_RE = re.compile(r"^step=(\d{9})(-epoch_end)?$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, uncommitted, corrupted, or does not fit the model."""


def checkpoint_dir_name(global_step: int, epoch_end: bool) -> str:
    return f"step={global_step:09d}" + ("-epoch_end" if epoch_end else "")


def checkpoints_root(cfg) -> str:
    return storage.join(cfg.run_dir, "checkpoints")


def checkpoint_uri(cfg, global_step: int, epoch_end: bool) -> str:
    return storage.join(checkpoints_root(cfg), checkpoint_dir_name(global_step, epoch_end))


def serialize(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def save(uri: str, state: dict, storage_options: Mapping | None = None, ctx=None, meta: dict | None = None,
         writer=None, after_commit: list | None = None, sharded: bool = False) -> None:
    """Write ``state`` to ``uri`` and commit it; every rank calls this.

    ``state["rank_state"]`` (RNG states, the epoch's data RNG) differs per rank: each rank writes
    its own small ``rank-NNNNN.pt`` right away and the ranks exchange hashes. With ``sharded``,
    ``state["state_dict"]`` and ``state["optimizer_states"]`` are this rank's shards: every rank
    writes them with DCP under ``sharded/`` right away, synchronously (a collective, which a
    background thread must not run), and reports their hashes with its rank file. Rank 0
    snapshots the shared state to bytes and commits it — in the background when ``writer`` is
    asynchronous — writing the marker last and then running ``after_commit``. A failure anywhere
    raises before the marker: nothing half-written is ever committed.
    """
    from raytrainer.checkpoint_writer import CheckpointWriter, with_retries
    writer = writer or CheckpointWriter(asynchronous=False)
    # The commit in flight finishes first, and one that failed is raised here, before this
    # checkpoint touches storage: the error names the checkpoint that was lost (during an outage,
    # preparing this one would fail too and hide it).
    writer.wait()
    state = dict(state)
    rank_state = state.pop("rank_state")
    rank = ctx.global_rank if ctx is not None else 0
    fs, path = storage.filesystem(uri, storage_options)
    if rank == 0:
        with_retries(lambda: _prepare_folder(fs, path, sharded), writer.policy, f"preparing checkpoint {uri}")
    if ctx is not None:
        ctx.barrier()
    files: dict = {}
    rank_blob = serialize(rank_state)
    with_retries(lambda: files.update(_write(fs, path, rank_file(rank), rank_blob)), writer.policy,
                 f"writing {uri}/{rank_file(rank)}")
    if sharded:
        from raytrainer import sharded_checkpoint
        shards = {"model": state.pop("state_dict"), "optimizers": state.pop("optimizer_states")}
        files.update(sharded_checkpoint.write(fs, path, uri, shards, writer.policy))
    gathered = ctx.all_gather_object(files) if ctx is not None else [files]
    if rank != 0:
        return
    for f in gathered:
        files.update(f)
    # The snapshot: after these two lines training may change the model freely.
    model_blob = None if sharded else serialize(state.pop("state_dict"))
    state_blob = serialize(state)
    marker_meta = {"global_step": state.get("global_step"), "epoch": state.get("epoch"), **(meta or {})}

    def commit() -> None:
        written = dict(files)
        if model_blob is not None:
            written.update(_write(fs, path, MODEL_FILE, model_blob))
        written.update(_write(fs, path, STATE_FILE, state_blob))
        marker = {"format_version": 1, "files": written, "created": time.time(), **marker_meta}
        _write_marker(fs, path, json.dumps(marker, indent=1).encode())

    writer.submit(commit, list(after_commit or []), f"checkpoint {uri}")


def _prepare_folder(fs, path: str, sharded: bool = False) -> None:
    if fs.exists(f"{path}/{COMMIT_FILE}"):
        # Re-committing over a committed folder would leave a window where it is half-written;
        # uncommit first, so readers skip it until the new marker lands.
        fs.rm(f"{path}/{COMMIT_FILE}")
    if sharded and fs.exists(f"{path}/{SHARDED_DIR}"):
        fs.rm(f"{path}/{SHARDED_DIR}", recursive=True)  # shards of an earlier save (maybe more ranks)
    fs.makedirs(path, exist_ok=True)


def _write(fs, path: str, name: str, data: bytes) -> dict:
    fs.pipe_file(f"{path}/{name}", data)
    return {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}}


def _write_marker(fs, path: str, data: bytes) -> None:
    target = f"{path}/{COMMIT_FILE}"
    if type(fs).__name__ == "LocalFileSystem":
        tmp = f"{target}.tmp"  # local rename is atomic; object stores' PUTs are atomic already
        fs.pipe_file(tmp, data)
        fs.mv(tmp, target)
    else:
        fs.pipe_file(target, data)


def read_marker(uri: str, storage_options: Mapping | None = None) -> dict | None:
    fs, path = storage.filesystem(uri, storage_options)
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
            raise CheckpointError(f"checkpoint {uri} does not exist: pass a checkpoint folder "
                                  f"(.../checkpoints/step=...), 'last' or 'best'")
        raise CheckpointError(f"checkpoint {uri} is not committed (no valid {COMMIT_FILE}): the save "
                              "that wrote it did not finish; use an earlier checkpoint")
    return marker


def load(uri: str, storage_options: Mapping | None = None, strategy=None, weights: bool = True) -> dict:
    """Read and verify a committed checkpoint; returns the state with ``state_dict`` included.

    A sharded checkpoint loads as full tensors in this process, unless ``strategy.shard_target()``
    returns a sharded state of the current model (FSDP): then every rank must call this, and each
    loads its own pieces into it after ``strategy.check_shards`` accepted the saved keys and
    shapes (sharded_checkpoint.read_into). ``weights=False`` reads neither the model nor the
    optimizer states (e.g. to read what a callback recorded)."""
    marker = require_committed(uri, storage_options)
    fs, path = storage.filesystem(uri, storage_options)
    files = marker["files"]
    blobs = {name: read_verified(fs, path, uri, name, info) for name, info in files.items()
             if not is_sharded_file(name) and (weights or name != MODEL_FILE)}
    state = torch_load(blobs[STATE_FILE], f"{uri}/{STATE_FILE}")
    state["rank_states"] = {int(name[5:10]): torch_load(data, f"{uri}/{name}")
                            for name, data in blobs.items() if name.startswith("rank-")}
    if not weights:
        return state
    if MODEL_FILE in files:
        state["state_dict"] = torch_load(blobs[MODEL_FILE], f"{uri}/{MODEL_FILE}")
        return state
    from raytrainer import sharded_checkpoint  # imports torch.distributed.checkpoint (0.5 s): only here
    target = strategy.shard_target() if strategy is not None else None
    if target is None:
        loaded = sharded_checkpoint.read_full(fs, path, uri, files)
    else:
        sharded_checkpoint.read_into(fs, path, uri, files, target, strategy.check_shards)
        loaded = target
    state["state_dict"], state["optimizer_states"] = loaded["model"], loaded["optimizers"]
    return state


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


def list_committed(cfg_or_root, storage_options: Mapping | None = None) -> list[str]:
    """URIs of committed checkpoints under a run, oldest first (by step, epoch-end last)."""
    root = cfg_or_root if isinstance(cfg_or_root, str) else checkpoints_root(cfg_or_root)
    fs, path = storage.filesystem(root, storage_options)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        m = _DIR_RE.match(name)
        if m and read_marker(storage.join(root, name), storage_options) is not None:
            found.append((int(m.group(1)), bool(m.group(2)), storage.join(root, name)))
    return [uri for _, _, uri in sorted(found)]


def latest_committed(cfg, storage_options: Mapping | None = None, fit_token: str | None = None) -> str | None:
    """The newest committed checkpoint of the run (of one ``fit`` call, given its token)."""
    found = list_committed(cfg, storage_options)
    if fit_token is not None:
        found = [u for u in found if (read_marker(u, storage_options) or {}).get("fit_token") == fit_token]
    return found[-1] if found else None


def delete(uri: str, storage_options: Mapping | None = None) -> None:
    """Remove a checkpoint: the marker first, so a half-deleted folder is never 'committed'."""
    fs, path = storage.filesystem(uri, storage_options)
    try:
        fs.rm(f"{path}/{COMMIT_FILE}")
    except FileNotFoundError:
        pass
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


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
