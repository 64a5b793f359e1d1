"""Writing, reading, listing and deleting checkpoints (the format is format.py's).

A save is committed atomically or not at all: one sealed ``.ckpt`` file (a temp file and a rename
locally; one PUT on object stores, where PUTs are atomic) or, sharded, every file first and the
COMMIT.json marker last. Rank 0 commits the shared state, in the background when the writer is
asynchronous (writer.py).
"""
from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
import warnings
from typing import Mapping

from raytrainer import storage
from raytrainer.checkpoint import sealed
from raytrainer.checkpoint.format import (COMMIT_FILE, MODEL_FILE, SHARDED_DIR, STATE_FILE, _DIR_RE,
                                          checkpoints_root, is_file_checkpoint, is_sharded_file, rank_file,
                                          read_marker, read_verified, require_committed, serialize, torch_load)
from raytrainer.checkpoint.layout import lightning_dict, resumable_state
from raytrainer.checkpoint.writer import CheckpointWriter, with_retries
from raytrainer.errors import CheckpointError


def save(uri: str, state: dict, storage_options: Mapping | None = None, ctx=None, meta: dict | None = None,
         writer=None, after_commit: list | None = None, sharded: bool = False) -> None:
    """Write ``state`` to ``uri`` and commit it; every rank calls this.

    ``state["rank_state"]`` (RNG states, the epoch's data RNG) differs per rank: rank 0 gathers
    every rank's, snapshots the whole state to bytes in Lightning's layout and commits it as one
    sealed ``.ckpt`` file — in the background when ``writer`` is asynchronous — then runs
    ``after_commit``. With ``sharded``, ``state["state_dict"]`` and ``state["optimizer_states"]``
    are this rank's shards: every rank writes them with DCP under ``sharded/`` right away,
    synchronously (a collective, which a background thread must not run), with its own rank
    file, and rank 0 commits the folder with its marker. A failure anywhere raises before the
    file or the marker: nothing half-written is ever committed.
    """
    writer = writer or CheckpointWriter(asynchronous=False)
    # The commit in flight finishes first, and one that failed is raised here, before this
    # checkpoint touches storage: the error names the checkpoint that was lost (during an outage,
    # preparing this one would fail too and hide it).
    writer.wait()
    state = dict(state)
    rank_state = state.pop("rank_state")
    marker_meta = {"global_step": state.get("global_step"), "epoch": state.get("epoch"), **(meta or {})}
    if sharded:
        _save_folder(uri, state, rank_state, storage_options, ctx, marker_meta, writer, after_commit)
        return
    # Every rank's RNG goes into the one file rank 0 writes (a few kB per rank).
    rank_states = ctx.all_gather_object(rank_state) if ctx is not None else [rank_state]
    if ctx is not None and ctx.global_rank != 0:
        return
    state["rank_states"] = dict(enumerate(rank_states))
    archive = serialize(lightning_dict(state))  # the snapshot: training may change the model from here
    fs, path = storage.filesystem(uri, storage_options)

    def commit() -> None:
        write_atomically(fs, path, sealed.seal(archive, {**marker_meta, "created": time.time()}))

    writer.submit(commit, list(after_commit or []), f"checkpoint {uri}")


def write_atomically(fs, path: str, data: bytes) -> None:
    """``data`` at ``path``, whole or not at all (a failure leaves no temp file behind)."""
    if "/" in path:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    if type(fs).__name__ == "LocalFileSystem":
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"  # local rename is atomic; object stores' PUTs are already
        try:
            fs.pipe_file(tmp, data)
            fs.mv(tmp, path)
        finally:
            if fs.exists(tmp):
                fs.rm(tmp)
    else:
        fs.pipe_file(path, data)


_DEAD_TEMP = re.compile(r"^step=\d{9}(-epoch_end)?\.ckpt\.tmp-[0-9a-f]{8}$")


def remove_dead_temp_files(cfg) -> None:
    """Before a fit, on the driver: the temp files of local writes that never finished (a process
    killed mid-write; never checkpoints, only clutter). Object stores have none."""
    root = checkpoints_root(cfg)
    if storage.is_remote(root):
        return
    fs, path = storage.filesystem(root, cfg.storage_options)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return
    for name in names:
        if _DEAD_TEMP.match(name):
            fs.rm(f"{path}/{name}")


def _save_folder(uri, state, rank_state, storage_options, ctx, marker_meta, writer, after_commit) -> None:
    """A sharded checkpoint: a folder of files, committed by its marker (format.py)."""
    rank = ctx.global_rank if ctx is not None else 0
    fs, path = storage.filesystem(uri, storage_options)
    if rank == 0:
        with_retries(lambda: _prepare_folder(fs, path, True), writer.policy, f"preparing checkpoint {uri}")
    if ctx is not None:
        ctx.barrier()
    files: dict = {}
    rank_blob = serialize(rank_state)
    with_retries(lambda: files.update(_write(fs, path, rank_file(rank), rank_blob)), writer.policy,
                 f"writing {uri}/{rank_file(rank)}")
    from raytrainer.checkpoint import sharded as shards_io  # imports torch.distributed.checkpoint (0.5 s)
    shards = {"model": state.pop("state_dict"), "optimizers": state.pop("optimizer_states")}
    files.update(shards_io.write(fs, path, uri, shards, writer.policy))
    gathered = ctx.all_gather_object(files) if ctx is not None else [files]
    if rank != 0:
        return
    for f in gathered:
        files.update(f)
    state_blob = serialize(state)  # the snapshot

    def commit() -> None:
        written = dict(files)
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


def load(uri: str, storage_options: Mapping | None = None, strategy=None, weights: bool = True) -> dict:
    """Read and verify a committed checkpoint; returns the state with ``state_dict`` included.

    A sharded checkpoint loads as full tensors in this process, unless ``strategy.shard_target()``
    returns a sharded state of the current model (FSDP): then every rank must call this, and each
    loads its own pieces into it after ``strategy.check_shards`` accepted the saved keys and
    shapes (sharded.read_into). ``weights=False`` reads neither the model nor the
    optimizer states of a folder (e.g. to read what a callback recorded); a file is read whole."""
    if is_file_checkpoint(uri):
        return resumable_state(read_sealed(uri, storage_options), uri)
    marker = require_committed(uri, storage_options)
    fs, path = storage.filesystem(uri, storage_options)
    files = marker["files"]
    if MODEL_FILE in files:
        warnings.warn(f"{uri} is a checkpoint folder, the format before .ckpt files: it loads, but save it again "
                      "(trainer.save_checkpoint, or continue the run) to have the .ckpt format", DeprecationWarning,
                      stacklevel=2)
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
    from raytrainer.checkpoint import sharded as shards_io  # imports torch.distributed.checkpoint (0.5 s)
    target = strategy.shard_target() if strategy is not None else None
    if target is None:
        loaded = shards_io.read_full(fs, path, uri, files)
    else:
        shards_io.read_into(fs, path, uri, files, target, strategy.check_shards)
        loaded = target
    state["state_dict"], state["optimizer_states"] = loaded["model"], loaded["optimizers"]
    return state


def read_sealed(uri: str, storage_options: Mapping | None = None) -> dict:
    """A run's ``.ckpt`` file, checked against its seal, as the Lightning-layout dict it holds."""
    fs, path = storage.filesystem(uri, storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {uri} does not exist: pass a checkpoint "
                              "(.../checkpoints/step=....ckpt), 'last' or 'best'") from None
    sealed.verify(data, uri)
    return torch_load(data, uri)


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
    """Remove a checkpoint: a file; a folder's marker first, so a half-deleted folder is never
    'committed'."""
    fs, path = storage.filesystem(uri, storage_options)
    if is_file_checkpoint(uri):
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass
        return
    try:
        fs.rm(f"{path}/{COMMIT_FILE}")
    except FileNotFoundError:
        pass
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass

