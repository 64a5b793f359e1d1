"""Logger protocol.

Loggers run last in every event (after the module's hooks and the callbacks) and only on global
rank zero: the loop hands them to nobody else, so no logger needs an ``if rank == 0`` of its own.
Modules and callbacks on other ranks see each logger through ``off_rank_zero``: the same class and
names, every call a no-op (Lightning's rank-zero-only loggers).
"""
from __future__ import annotations

from typing import Any, Mapping


class Logger:
    """Base class with no-op defaults; subclasses override what they need.

    ``setup(run_dir)`` is called by the loop before anything is logged; a logger constructed without
    an explicit ``save_dir`` writes under ``run_dir`` (the run's ``{storage_path}/{name}``).
    """

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def log_dir(self) -> str | None:
        return None

    def setup(self, run_dir: str, storage_options=None) -> None:
        """Bind to the run directory (a local path or fsspec URI); ``storage_options`` are the
        Trainer's fsspec options for it (credentials, endpoint: never to be logged)."""

    def join_sweep(self, sweep_dir: str, trial_name: str) -> None:
        """Called in each sweep trial (on that trial's copy of the logger) before it runs: a
        logger with a run identity of its own gives the trial its own run, grouped under the
        sweep. Raise ``ValueError`` when that cannot be done (``rt.sweep`` calls this on a copy
        before Ray starts, so the mistake is reported up front). TensorBoard and CSV need nothing:
        they write under the trial's own run dir."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar ``metrics`` (plain floats) at ``step`` (optimizer steps done)."""

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """Record the run's hyperparameters (the module's hparams, flattened)."""

    def log_graph(self, model: Any, input_array: Any = None) -> None:
        """Record the model's graph (called at fit start, after ``log_hyperparams``)."""

    def save(self) -> None:
        """Flush buffered output to storage (called at checkpoints and epoch ends)."""

    def finalize(self, status: str) -> None:
        """Flush and close; ``status`` is ``"success"``, ``"failed"`` or ``"preempted"`` (stopped by a
        signal with a committed checkpoint; the run resumes later under the same identity)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Called on resume with this logger's ``state_dict()`` from the checkpoint — only when
        the checkpoint belongs to this run (its run dir): a checkpoint of another run (a PBT
        donor, a fine-tuning start) must not make this run write into the other run's logs."""


class _DummyExperiment:
    """Lightning's DummyExperiment: what ranks other than zero do with ``logger.experiment``
    (``add_image``, ``log``, ``experiment["key"]``...) does nothing."""

    def nop(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, _: str) -> Any:
        return self.nop

    def __getitem__(self, idx: Any) -> "_DummyExperiment":
        return self

    def __setitem__(self, *args: Any, **kwargs: Any) -> None:
        pass


# What a logger seen off rank zero still tells: where and under which name rank zero logs.
_IDENTITY = frozenset({"name", "version", "log_dir", "save_dir", "root_dir"})


class _OffRankZero:
    """Mixed in before a logger's own class (``isinstance`` checks keep working): every method
    is a no-op, ``experiment`` a ``_DummyExperiment``; attributes that are not methods read as
    rank zero's."""

    def __getattribute__(self, name: str) -> Any:
        if name == "experiment":
            return _DummyExperiment()
        value = object.__getattribute__(self, name)
        if name.startswith("__") or name in _IDENTITY or not callable(value):
            return value
        return _DummyExperiment.nop.__get__(_DummyExperiment())


def off_rank_zero(logger: Logger) -> Logger:
    """``logger`` as modules and callbacks on ranks other than zero see it, as in Lightning (whose
    logger methods are ``rank_zero_only`` and whose ``experiment`` is a dummy there): code written
    for Lightning that logs through ``self.logger.experiment`` on every rank runs unchanged and
    writes once. The loop itself hands such ranks no loggers at all."""
    cls = type(logger)
    view = object.__new__(type(cls.__name__, (_OffRankZero, cls), {"__module__": cls.__module__}))
    view.__dict__.update(logger.__dict__)
    return view
