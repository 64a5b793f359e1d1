"""Preemption and interruption: stop with a committed checkpoint, resume exactly.

What clusters send and what happens:

* **SIGTERM** (spot reclaim, Kubernetes pod deletion, ``ray job stop``) or **Ctrl-C** (a notebook's
  interrupt) to the process that called ``fit``: training stops at the next step boundary, a
  checkpoint of that position is committed, and ``fit`` raises :class:`Preempted` (a
  ``SystemExit`` with code 128 + signal number, so an unhandled one exits the process the way the
  signal would have, without a traceback). Re-running the same command with ``ckpt_path="last"``
  resumes exactly. A second signal while the checkpoint is written aborts at once.
* **Ray's node-drain notice** (a node about to be preempted, seen by Ray Train's preemption
  watcher on a cluster): a just-in-time checkpoint is committed and training goes on; when the
  node goes, Ray restarts the workers and they resume from that checkpoint (Ray's documented
  reaction; restarts for preemption are counted apart from ``max_failures``).

* **SIGTERM to one Ray Train worker process** (its pod evicted, an OOM-killer's polite first
  step, ``kill`` by an operator): that rank asks the others, and at the next agreement point every
  rank commits a checkpoint of that step. With restarts left (``max_failures != 0``) the workers
  then end with :class:`WorkerTerminated`, Ray restarts the group, and it resumes from that
  checkpoint: no step is lost. With ``max_failures=0`` the fit stops as for the driver's SIGTERM
  (``Preempted``). A second SIGTERM to the worker gets Ray's handler (exit at once), and so does
  one to a worker whose driver is gone (Ray's own cleanup of a stopped sweep trial).

With several workers, every rank must stop at the same step (stopping is collective: DDP and the
checkpoint both are), so ranks agree on a stop only every ``log_every_n_steps`` steps and at epoch
ends (one small all-reduce there); one process alone checks at every step, for free.
"""
from __future__ import annotations

import logging
import threading

from raytrainer.errors import WorkerTerminated

log = logging.getLogger(__name__)

STOP = "stop"              # commit a checkpoint and end the fit (raise Preempted)
CHECKPOINT = "checkpoint"  # commit a checkpoint and train on (Ray's drain notice)
RESTART = "restart"        # commit a checkpoint, then end the workers so Ray restarts them


class StopFlag:
    """A stop request, set from a signal handler or a message from the driver, read by the loop.
    Plain attribute writes and reads: safe from signal handlers and threads alike."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.event = threading.Event()

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.event.set()


def handle_stop_request(run, request: tuple[str, str]) -> None:
    """At a checkpoint boundary, after the callbacks: act on an agreed stop/checkpoint request."""
    action, reason = request
    if action in (CHECKPOINT, RESTART):
        if run.cfg.enable_checkpointing and (action == RESTART or not run.saved_current_position()):
            uri = run.save_checkpoint()  # (the one already saved at this position, if any)
            if action == RESTART:
                run.writer.wait()  # committed, not only submitted, before the workers go
            if run.ctx.global_rank == 0:
                log.info("%s: committed a just-in-time checkpoint %s", reason, uri)
        if action == RESTART:  # RayTrainContext asks for it only with checkpointing on
            raise WorkerTerminated(f"{reason}: checkpoint of step {run.progress.global_step} committed; Ray "
                                   "restarts the workers from it (max_failures)")
        return
    run.set_should_stop(True, preempted_by=reason)


def commit_preemption_checkpoint(run) -> str | None:
    """After the loop ended on a stop request: the checkpoint of where it stopped (ModelCheckpoint
    may already have saved it as `last` in on_train_end)."""
    if not run.cfg.enable_checkpointing:
        return None
    return run.save_checkpoint()  # saved once per position: no second copy
