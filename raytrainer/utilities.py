"""Small helpers shared by the package (and Lightning's utilities users import): attribute dicts,
moving batches, seeding (``seed_everything``, DataLoader workers), RNG capture,
``rank_zero_only``/``rank_zero_info``/``rank_zero_warn``, and the default visibility of
raytrainer's log notices."""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import random
import sys
import warnings
from collections.abc import Mapping  # typing.Mapping's isinstance is ~3x slower (hot path)
from typing import Any

import numpy as np
import torch


class AttributeDict(dict):
    """A dict whose keys are also attributes (``hparams.lr``), like Lightning's."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(f"hparams has no {key!r}; it has {sorted(self)}") from e

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Recursively move tensors in (nested) lists, tuples, dicts and dataclasses to ``device``.

    A batch of plain containers whose tensors are all on ``device`` already (every batch on CPU,
    or a loader that yields device tensors) is returned as it is: the step loop calls this for
    every batch, and copying the containers would be per-step work a hand-written loop never does.
    """
    if type(batch) is list or type(batch) is tuple:  # the usual (x, y): no call per element
        for v in batch:
            if not (v.device == device if isinstance(v, torch.Tensor) else _on_device(v, device)):
                return _move(batch, device)
        return batch
    return batch if _on_device(batch, device) else _move(batch, device)


_LEAVES = (str, bytes, int, float, bool, type(None))


def _on_device(batch: Any, device: torch.device) -> bool:
    """True when moving ``batch`` would change nothing: plain containers of tensors on ``device``
    and of plain values. Anything else (dataclasses, objects with ``.to``) takes ``_move``."""
    if isinstance(batch, torch.Tensor):
        return batch.device == device
    cls = type(batch)
    if cls is list or cls is tuple or cls is dict:
        for v in (batch.values() if cls is dict else batch):
            if isinstance(v, torch.Tensor):  # the usual leaf, checked without recursing
                if v.device != device:
                    return False
            elif not _on_device(v, device):
                return False
        return True
    return isinstance(batch, _LEAVES)


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        if batch.device == device:
            return batch  # what .to() would return, without its cost
        # non_blocking only helps from pinned memory to CUDA; it is a no-op otherwise.
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, Mapping):
        return type(batch)((k, _move(v, device)) for k, v in batch.items()) \
            if type(batch) is not dict else {k: _move(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_move(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: _move(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch) if f.init})
    if hasattr(batch, "to") and callable(batch.to):
        return batch.to(device)
    return batch


def infer_batch_size(batch: Any) -> int:
    """Leading dimension of the first tensor found in ``batch`` (1 if none): the weight of a
    step's value in an epoch mean, as Lightning infers it. Called every step: a loop, not
    recursion, and the common container types checked first."""
    while True:
        if isinstance(batch, torch.Tensor):
            return batch.shape[0] if batch.ndim > 0 else 1
        cls = type(batch)
        if cls is not list and cls is not tuple and isinstance(batch, Mapping):
            if not batch:
                return 1
            batch = next(iter(batch.values()))
        elif (cls is list or cls is tuple or isinstance(batch, (list, tuple))) and batch:
            batch = batch[0]
        else:
            return 1


def describe_batch(batch: Any, depth: int = 0) -> str:
    """A short description of a batch's structure for error messages:
    ``list[Tensor(4, 2), Tensor(4, 1)]``, ``dict{'x': Tensor(4, 2)}``, ``Tensor(4, 2)``."""
    if isinstance(batch, torch.Tensor):
        return f"Tensor{tuple(batch.shape)}"
    if depth >= 2:
        return type(batch).__name__
    if isinstance(batch, Mapping):
        items = [f"{k!r}: {describe_batch(v, depth + 1)}" for k, v in list(batch.items())[:6]]
        return f"{type(batch).__name__}{{{', '.join(items)}{', ...' if len(batch) > 6 else ''}}}"
    if isinstance(batch, (list, tuple)):
        items = [describe_batch(v, depth + 1) for v in batch[:6]]
        return f"{type(batch).__name__}[{', '.join(items)}{', ...' if len(batch) > 6 else ''}]"
    return type(batch).__name__


def seed_everything(seed: int | None = None, workers: bool = False) -> int:
    """Seed python, numpy and torch (all devices); returns the seed. ``workers=True`` (Lightning's):
    a Trainer created afterwards also seeds python's and numpy's RNG in every DataLoader worker
    process, differently per worker and rank (torch already seeds its own there), where they would
    otherwise repeat the parent's draws. The flag travels in ``PL_SEED_WORKERS``, as in Lightning."""
    if seed is None:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    seed_rngs(seed)
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    os.environ["PL_SEED_WORKERS"] = "1" if workers else "0"
    return seed


def seed_rngs(seed: int) -> None:
    """Seed python, numpy and torch (what ``Trainer(seed=...)`` does in every worker)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def seed_dataloader_worker(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: python's and numpy's RNG from the seed torch gave this
    worker (the loader's base seed + worker id), mixed with the rank."""
    rank = global_rank()
    seed = (torch.initial_seed() + 1_000_003 * rank) % 2**32
    random.seed(seed)
    np.random.seed(seed)


def global_rank() -> int:
    """This process's rank: torch.distributed's when initialized, else RANK (Ray Train sets it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def rank_zero_only(fn):
    """Call ``fn`` on global rank 0 only (Lightning's decorator); elsewhere it returns None."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return fn(*args, **kwargs) if global_rank() == 0 else None
    return wrapped


@rank_zero_only
def rank_zero_info(message: str, *args, **kwargs) -> None:
    logging.getLogger("raytrainer").info(message, *args, **kwargs)


@rank_zero_only
def rank_zero_warn(message: str, category=UserWarning, stacklevel: int = 4) -> None:
    warnings.warn(message, category, stacklevel=stacklevel)


def capture_rng_state() -> dict:
    """Every RNG the loop or user code may draw from, as tensors/plain values (loadable with
    ``torch.load(weights_only=True)``)."""
    state = {
        "torch": torch.get_rng_state(),
        "python": _python_rng_to_plain(random.getstate()),
        "numpy": _numpy_rng_to_plain(np.random.get_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_python_rng_from_plain(state["python"]))
    np.random.set_state(_numpy_rng_from_plain(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_rng_to_plain(st: tuple) -> dict:
    version, internal, gauss = st
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_rng_from_plain(d: dict) -> tuple:
    return (d["version"], tuple(int(x) for x in d["internal"].tolist()), d["gauss"])


def _numpy_rng_to_plain(st: tuple) -> dict:
    name, keys, pos, has_gauss, cached = st
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_rng_from_plain(d: dict) -> tuple:
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


class _NoticeFormatter(logging.Formatter):
    """``[raytrainer] message``, whatever the level: each notice says what happened in words
    (a retry, a stop); a level name would read as Ray's own alarms, which are noise to users."""

    def format(self, record: logging.LogRecord) -> str:
        # every line of a multi-line notice (the model summary's table) carries the prefix
        text = "\n".join(f"[raytrainer] {line}" for line in record.getMessage().split("\n"))
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (a notebook or a test may
    replace it after the handler was installed), as logging's own last-resort handler does."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


def show_info_logs() -> None:
    """Make raytrainer's INFO notices (the resolved configuration, checkpoints, the run summary)
    visible by default: a handler on the ``raytrainer`` logger, written to stderr beside the
    progress bar, installed only when this process has configured no logging of its own (no
    handler on that logger or the root logger), as Lightning does. A user's own configuration
    decides otherwise; ``logging.getLogger("raytrainer").setLevel(logging.WARNING)`` silences the
    notices."""
    logger = logging.getLogger("raytrainer")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = _StderrHandler()
    handler.setFormatter(_NoticeFormatter())
    logger.addHandler(handler)
    logger.propagate = False  # a root handler the user adds later would print every line twice
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
