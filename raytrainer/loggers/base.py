"""Logger protocol.

Loggers run last in every event (after the module's hooks and the callbacks) and only on global
rank zero: the loop hands them to nobody else, so no logger needs an ``if rank == 0`` of its own.
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

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar ``metrics`` (plain floats) at ``step`` (optimizer steps done)."""

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """Record the run's hyperparameters (the module's hparams, flattened)."""

    def save(self) -> None:
        """Flush buffered output to storage (called at checkpoints and epoch ends)."""

    def finalize(self, status: str) -> None:
        """Flush and close; ``status`` is ``"success"``, ``"failed"`` or ``"preempted"`` (stopped by a
        signal with a committed checkpoint; the run resumes later under the same identity)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
