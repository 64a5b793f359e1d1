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
import uuid
import warnings
from typing import Any, Mapping

import torch

from raytrainer import storage
from raytrainer.checkpoint.format import COMMIT_FILE, read_marker
from raytrainer.checkpoint.store import latest_committed
from raytrainer.checkpoint.store import load as load_committed
from raytrainer.errors import CheckpointError

# The Lightning checkpoint layout these files follow; pytorch-lightning reads the version to decide
# which of its migrations to apply (none for this one).
LIGHTNING_FORMAT_VERSION = "2.6.0"


def read_any(path: str, map_location: Any = None, weights_only: bool | None = None,
             storage_options: Mapping | None = None) -> dict:
    """The checkpoint at ``path``: a committed raytrainer folder or a ``.ckpt`` file.
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


def lightning_dict(state: dict, weights_only: bool = False) -> dict:
    """A raytrainer checkpoint state as Lightning's file holds it: Lightning's keys, and
    raytrainer's exact-resume extras beside them (Lightning ignores keys it does not know)."""
    out = {"pytorch-lightning_version": LIGHTNING_FORMAT_VERSION, "epoch": state["epoch"],
           "global_step": state["global_step"], "state_dict": state["state_dict"],
           "hyper_parameters": dict(state.get("hyper_parameters") or {}),
           "loops": _lightning_loops(state), "raytrainer_loops": state.get("loops", {})}
    if "datamodule_hyper_parameters" in state:  # Lightning keeps both hparams in a weights-only file too
        out["datamodule_hyper_parameters"] = dict(state["datamodule_hyper_parameters"])
    if weights_only:
        return out
    extras = {k: v for k, v in state.items() if k not in out and k not in ("rank_state", "loops")}
    if "rank_state" in state:  # a live snapshot: the state of the process that writes the file
        extras["rank_states"] = {0: state["rank_state"]}  # (a committed checkpoint has every rank's)
    return {**extras, **out}


def _lightning_loops(state: dict) -> dict:
    """Lightning's loop progress for the same position, so pytorch-lightning continues a fit
    from the file: inside an epoch after ``batches_done`` batches, or at the next epoch's start
    after an epoch-end boundary."""
    loops = state.get("loops", {})
    epoch, step = state["epoch"], state["global_step"]
    batches, stepped = loops.get("batches_done", 0), loops.get("batches_stepped", step)
    if loops.get("epoch_finished"):
        epoch, batches = epoch + 1, 0

    def counts(current: int, total: int, keys=("ready", "started", "processed", "completed")) -> dict:
        return {"total": dict.fromkeys(keys, total), "current": dict.fromkeys(keys, current)}
    started = epoch + (1 if batches else 0)
    epoch_progress = {"total": {"ready": started, "started": started, "processed": epoch, "completed": epoch}}
    epoch_progress["current"] = dict(epoch_progress["total"])
    optimizer_steps = {"step": counts(0, step, ("ready", "completed")), "zero_grad": counts(0, step, ("ready", "started", "completed"))}
    fit_loop = {
        "state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": stepped},
        "epoch_loop.batch_progress": {**counts(batches, stepped), "is_last_batch": False},
        "epoch_loop.scheduler_progress": counts(0, 0, ("ready", "completed")),
        "epoch_loop.automatic_optimization.state_dict": {},
        "epoch_loop.automatic_optimization.optim_progress": {"optimizer": optimizer_steps},
        "epoch_loop.manual_optimization.state_dict": {},
        "epoch_loop.manual_optimization.optim_step_progress": counts(0, step, ("ready", "completed")),
        "epoch_loop.val_loop.state_dict": {}, "epoch_loop.val_loop.batch_progress": {**counts(0, 0), "is_last_batch": False},
        "epoch_progress": epoch_progress,
    }
    return {"fit_loop": fit_loop}


def write_ckpt(path: str, checkpoint: dict, storage_options: Mapping | None = None) -> str:
    """Write ``checkpoint`` to the file ``path``, atomically; returns ``path``."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    fs, fs_path = storage.filesystem(str(path), storage_options)
    parent = fs_path.rsplit("/", 1)[0] if "/" in fs_path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if storage.is_remote(str(path)):
        fs.pipe_file(fs_path, buffer.getvalue())  # one PUT: whole or absent
    else:
        tmp = f"{fs_path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(tmp, buffer.getvalue())
        fs.mv(tmp, fs_path)
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


def resumable_state(checkpoint: dict, path: str) -> dict:
    """A ``.ckpt`` as ``loop/state.restore`` takes it. One written by raytrainer carries its exact
    position. One written by Lightning carries its counters but not where the data stood inside
    an epoch: a checkpoint taken mid-epoch restarts that epoch from its first batch (said in a
    warning); one taken after the epoch's last batch continues with the epoch's end."""
    if "raytrainer_loops" in checkpoint:
        state = {k: v for k, v in checkpoint.items() if k not in ("loops", "raytrainer_loops")}
        state["loops"] = checkpoint["raytrainer_loops"]
        state.setdefault("rank_states", {})
        state.setdefault("optimizer_states", [])
        return state
    step = checkpoint["global_step"]
    fit_loop = (checkpoint.get("loops") or {}).get("fit_loop")
    if fit_loop is None:  # no loop state: taken at an epoch's end (Lightning's oldest format)
        epoch, finished, batches, stepped = checkpoint["epoch"], True, 0, step
    else:
        epochs = fit_loop["epoch_progress"]["current"]
        batch_progress = fit_loop["epoch_loop.batch_progress"]
        stepped = fit_loop.get("epoch_loop.state_dict", {}).get("_batches_that_stepped", step)
        epoch = epochs["completed"]
        finished = epochs["processed"] > epochs["completed"]  # saved in on_train_epoch_end
        inside = epochs["started"] > epochs["completed"] and not finished
        batches = batch_progress["current"]["processed"] if inside else 0  # (completed lags by the hooks)
        if inside and batches and not batch_progress.get("is_last_batch"):
            warnings.warn(f"{path} was saved by Lightning after {batches} batches of epoch {epoch}, without "
                          f"the position of its data loader: epoch {epoch} restarts from its first batch, and "
                          f"those {batches} batches are trained on again",
                          stacklevel=2)
            batches = 0
    return {**checkpoint, "epoch": epoch, "rank_states": {}, "metrics": {}, "callbacks": {}, "loggers": [],
            "loops": {"batches_done": batches, "epoch_finished": finished, "batches_stepped": stepped},
            "optimizer_states": checkpoint.get("optimizer_states", []),
            "lr_schedulers": checkpoint.get("lr_schedulers", [])}
