"""Every public exception raytrainer raises on purpose. Imports nothing of ours, so any room can
raise them and users can catch them from one place (``rt.ConfigError``, ``rt.CheckpointError``...)."""
from __future__ import annotations

import signal


class ConfigError(ValueError):
    """A Trainer/sweep argument is invalid. The message names the argument and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, uncommitted, corrupted, or does not fit the model."""


class CheckpointUploadError(RuntimeError):
    """A checkpoint could not be written after every retry; earlier checkpoints are intact."""


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class Preempted(SystemExit):
    """``fit`` stopped on a signal after committing a checkpoint; re-run with ckpt_path="last".

    A ``SystemExit`` whose code is 128 + the signal's number, so an unhandled one ends the process
    the way the signal would have, without a traceback."""

    def __init__(self, reason: str, global_step: int, checkpoint: str | None):
        signum = getattr(signal, reason, None)
        super().__init__(128 + int(signum) if signum is not None else 1)
        self.reason = reason
        self.global_step = global_step
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        where = (f"checkpoint {self.checkpoint} committed" if self.checkpoint
                 else "no checkpoint (checkpointing is disabled)")
        return (f"training stopped on {self.reason} at step {self.global_step}; {where}. Run the same "
                "command with ckpt_path='last' (same storage_path and name) to resume exactly")


class WorkerTerminated(RuntimeError):
    """Raised in every Ray Train worker after a worker's SIGTERM was answered with a committed
    checkpoint: Ray restarts the worker group (``max_failures``) and it resumes from there."""
