"""Sharded checkpoints: each rank writes its own shards with torch.distributed.checkpoint (DCP).

``strategy="fsdp_sharded"`` (or ``rt.FSDPStrategy(state_dict_type="sharded")``) saves the model
and optimizer state the way Lightning's ``FSDPStrategy(state_dict_type="sharded")`` and torchtitan
do: no rank ever gathers the full model. Inside the checkpoint folder, next to ``state.pt``,
``rank-NNNNN.pt`` and ``COMMIT.json`` (checkpoint.py), instead of ``model.pt``::

    sharded/__R_0.distcp   rank R's shards of the model and optimizer states (DCP's format:
                           torch.save'd tensors and small values at offsets in one file)
    sharded/.metadata      DCP's index (which piece of which tensor lies where), by rank 0

The commit protocol is checkpoint.py's. DCP writes through ``_CommitFS`` below: each file is
buffered, uploaded once through fsspec (so ``s3://`` works) with the checkpoint retry policy, and
its sha256 and size are recorded as it is uploaded. The ranks exchange these tables with the small
``rank-NNNNN.pt`` ones, and rank 0 writes COMMIT.json last. Nothing DCP writes counts until then.

Loading reads every byte through ``_VerifiedFS``: a file not listed in COMMIT.json, missing, or
whose sha256/size differ is a CheckpointError before DCP sees it. torch 2.13's own reader loads
``.metadata`` with plain ``pickle.load`` and non-tensor entries (learning rates, betas, ...) with
``torch.load(weights_only=False)``: arbitrary code could run from a crafted checkpoint. Here
``.metadata`` goes through an unpickler that admits only DCP's metadata classes, torch.Size, dtypes
and layouts, and the entries load with ``weights_only=True``.

A sharded checkpoint loads on any world size: into the shards of an FSDP model (DCP reshards,
each rank reading only the files holding its pieces) or, in one process, as a full state dict
(``rt.load_checkpoint``, ``validate(ckpt_path=...)``, a DDP or local resume).

With ``Trainer(async_checkpoint=True)`` the shards are still written synchronously, on every rank:
``dcp.save`` is a collective, which must not run in a background thread beside training's own
collectives. Only ``state.pt`` and COMMIT.json are committed in the background, as for full
checkpoints. Each file passes through memory whole (buffered to hash and upload it, read whole to
verify it): a rank holds its own shard file, about 1/world_size of the model and optimizer state.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import warnings
from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from raytrainer.checkpoint.format import SHARDED_DIR, SHARDED_METADATA, read_verified, torch_load
from raytrainer.checkpoint.writer import RetryPolicy, with_retries
from raytrainer.errors import CheckpointError, CheckpointUploadError


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# ----------------------------------------------------------------------------- save

def write(fs, path: str, uri: str, state: dict, policy: RetryPolicy) -> dict:
    """Every rank: write this rank's shards of ``state`` (DTensors, or plain tensors in one
    process) under ``{path}/sharded/``. A collective: DCP plans across ranks, then each writes its
    own file and rank 0 the index. Returns ``{name: {"sha256", "size"}}`` of what this rank wrote."""
    import torch.distributed.checkpoint as dcp
    commit_fs = _CommitFS(fs, path, uri, policy)
    writer = FileSystemWriter(path, single_file_per_rank=True, sync_files=False, thread_count=1)
    # fsync on an in-memory buffer would fall back to os.sync() of the whole machine; the upload is
    # fsspec's, as for every other checkpoint file.
    writer.fs, writer.path = commit_fs, f"{path}/{SHARDED_DIR}"
    with _unwrapped(CheckpointUploadError, f"writing the shards of {uri}"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # one process: the intent
        dcp.save(state, storage_writer=writer, no_dist=not _distributed())
    return commit_fs.written


class _Buffer(io.BytesIO):
    """An in-memory file whose bytes outlive ``close()`` (DCP closes the stream it writes)."""

    _closed_with: bytes | None = None

    def close(self) -> None:
        if not self.closed:
            self._closed_with = self.getvalue()
        super().close()

    def contents(self) -> bytes:
        return self._closed_with if self.closed else self.getvalue()


class _CommitFS(FileSystemBase):
    """DCP's file operations on an fsspec filesystem for one save: each file is buffered, then
    uploaded once with retries (a retry never re-enters DCP's collectives), and its hash recorded
    under its name relative to the checkpoint folder."""

    def __init__(self, fs, root: str, uri: str, policy: RetryPolicy):
        self.fs, self.root, self.uri, self.policy = fs, root, uri, policy
        self.written: dict = {}
        self._held: dict[str, bytes] = {}

    @contextmanager
    def create_stream(self, path, mode: str):
        if "w" not in mode:
            raise ValueError(f"a sharded checkpoint save only writes, got mode {mode!r}")
        buf = _Buffer()
        yield buf
        data = buf.contents()
        if str(path).endswith(".tmp"):
            # DCP writes .metadata.tmp and renames it: upload it once, under its final name.
            self._held[str(path)] = data
        else:
            self._upload(str(path), data)

    def _upload(self, path: str, data: bytes) -> None:
        name = path[len(self.root) + 1:]
        with_retries(lambda: self.fs.pipe_file(path, data), self.policy, f"writing {self.uri}/{name}")
        self.written[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    def rename(self, path, new_path) -> None:
        self._upload(str(new_path), self._held.pop(str(path)))

    def concat_path(self, path, suffix: str) -> str:
        return f"{path}/{suffix}"

    def init_path(self, path) -> str:
        return str(path)

    def mkdir(self, path) -> None:
        with_retries(lambda: self.fs.makedirs(str(path), exist_ok=True), self.policy, f"creating {path}")

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False

    def exists(self, path) -> bool:
        return False  # rank 0 removed any earlier sharded/ folder before this save (store.save)

    def rm_file(self, path) -> None:
        pass


# ----------------------------------------------------------------------------- load

def read_full(fs, path: str, uri: str, files: dict) -> dict:
    """One process, no collectives: the whole checkpoint as plain (unsharded) CPU tensors,
    ``{"model": state_dict, "optimizers": [optimizer state_dict, ...]}``."""
    import torch.distributed.checkpoint as dcp
    reader = _reader(fs, path, uri, files)
    metadata = reader.read_metadata()
    # What DCP's _EmptyStateDictLoadPlanner builds: an empty full tensor per saved tensor (None for
    # small values), nested back along the paths the save flattened; then a plain load into it.
    state: dict = {}
    for key, md in metadata.state_dict_metadata.items():
        value = torch.empty(md.size, dtype=md.properties.dtype) if isinstance(md, TensorStorageMetadata) else None
        set_element(state, (metadata.planner_data or {}).get(key, (key,)), value)
    with _unwrapped(CheckpointError, f"loading {uri}"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # no_dist is the intent
        dcp.load(state, storage_reader=reader, planner=_LoadPlanner(), no_dist=True)
    state.setdefault("optimizers", [])
    return state


def read_into(fs, path: str, uri: str, files: dict, target: dict, check: Callable[[dict, int], None]) -> None:
    """Every rank (a collective): load the checkpoint in place into ``target``, a sharded state
    ``{"model": ..., "optimizers": [...]}`` of the current model; DCP reshards when the world size
    differs from the one that saved. ``check(model_shapes, n_optimizers)`` runs first, with the
    saved tensors' full shapes as meta tensors, so a checkpoint of another model is refused with
    the names of its keys rather than DCP's planning error."""
    import torch.distributed.checkpoint as dcp
    reader = _reader(fs, path, uri, files)
    metadata = reader.read_metadata()
    model = {k[len("model."):]: torch.empty(v.size, dtype=v.properties.dtype, device="meta")
             for k, v in metadata.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
    n_optimizers = len({p[1] for p in (metadata.planner_data or {}).values()
                        if len(p) > 1 and p[0] == "optimizers"})
    check(model, n_optimizers)
    with _unwrapped(CheckpointError, f"loading {uri}"):
        dcp.load(target, storage_reader=reader, planner=_LoadPlanner(), no_dist=not _distributed())


@contextmanager
def _unwrapped(error: type, what: str):
    """DCP gathers every rank's exception into one CheckpointException (a BaseException, which
    ``except Exception`` and the retry logic would not see): raise ours as they were (a corrupted
    or refused file names itself), anything else as ``error``."""
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        yield
    except CheckpointException as e:
        failures = [exc for exc, _ in e.failures.values()]
        for exc in failures:
            if isinstance(exc, (CheckpointError, CheckpointUploadError)):
                raise exc from None
        raise error(f"{what} failed in torch.distributed.checkpoint: "
                    + "; ".join(f"{type(exc).__name__}: {exc}" for exc in failures)) from None


def _reader(fs, path: str, uri: str, files: dict) -> "_Reader":
    return _Reader(_VerifiedFS(fs, path, uri, files), f"{path}/{SHARDED_DIR}")


class _VerifiedFS(FileSystemBase):
    """Read-only: every file DCP opens is read whole and checked against COMMIT.json first."""

    def __init__(self, fs, root: str, uri: str, files: dict):
        self.fs, self.root, self.uri, self.files = fs, root, uri, files
        self._index: bytes | None = None  # .metadata is read twice (our checks, then DCP's)

    @contextmanager
    def create_stream(self, path, mode: str):
        if "r" not in mode or "+" in mode:
            raise ValueError(f"a checkpoint is read-only here, got mode {mode!r}")
        name = str(path)[len(self.root) + 1:]
        if name not in self.files:
            raise CheckpointError(f"checkpoint {self.uri}: {SHARDED_DIR}/.metadata refers to {name}, which "
                                  "COMMIT.json does not list; load an earlier checkpoint")
        if name == SHARDED_METADATA:
            if self._index is None:
                self._index = read_verified(self.fs, self.root, self.uri, name, self.files[name])
            yield io.BytesIO(self._index)
            return
        yield io.BytesIO(read_verified(self.fs, self.root, self.uri, name, self.files[name]))

    def concat_path(self, path, suffix: str) -> str:
        return f"{path}/{suffix}"

    def init_path(self, path) -> str:
        return str(path)

    def rename(self, path, new_path) -> None:
        raise ValueError("read-only")

    def mkdir(self, path) -> None:
        raise ValueError("read-only")

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False

    def exists(self, path) -> bool:
        return str(path)[len(self.root) + 1:] in self.files

    def rm_file(self, path) -> None:
        raise ValueError("read-only")


class _Reader(FileSystemReader):
    def __init__(self, verified: _VerifiedFS, path: str):
        super().__init__(path)
        self.fs, self.path = verified, path

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        where = f"{self.fs.uri}/{SHARDED_METADATA}"
        with self.fs.create_stream(f"{self.path}/.metadata", "rb") as stream:
            try:
                metadata = _MetadataUnpickler(stream).load()
            except Exception as e:
                raise CheckpointError(f"refusing to load {where}: {type(e).__name__}: {e}") from e
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"refusing to load {where}: it holds a {type(metadata).__name__}, "
                                  "not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


_METADATA_CLASSES = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict"),
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata, and nothing else: the only globals are the index's own dataclasses,
    torch.Size, dtypes and layouts (a pickle naming os.system or any other callable is refused)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a DCP .metadata file")


class _LoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner, but small values load with ``weights_only=True`` (torch 2.13: False)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch_load(value.read(), f"entry {read_item.dest_index.fqn} of a sharded checkpoint")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
