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

import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

STOP = "stop"              # commit a checkpoint and end the fit (raise Preempted)
CHECKPOINT = "checkpoint"  # commit a checkpoint and train on (Ray's drain notice)
RESTART = "restart"        # commit a checkpoint, then end the workers so Ray restarts them


class Preempted(SystemExit):
    """``fit`` stopped on a signal after committing a checkpoint; re-run with ckpt_path="last"."""

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


@contextmanager
def stop_on_signals(flag: StopFlag, on_first: Callable[[str], None] | None = None) -> Iterator[None]:
    """SIGTERM and SIGINT set ``flag`` instead of killing the process, while the block runs; a
    second one of either gets the previous handler (Ctrl-C twice aborts). Signal handlers belong
    to the main thread: elsewhere (a worker thread, a notebook's background run) this does
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if flag.reason is not None:  # the second signal: do what the first would have done
            _restore(previous)
            old = previous[signum]
            if callable(old):
                return old(signum, frame)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        flag.request(name)
        print(f"[raytrainer] {name}: stopping at the next step boundary with a committed checkpoint "
              "(send it again to abort now)", flush=True)
        if on_first is not None:
            on_first(name)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        _restore(previous)


def _restore(previous: dict) -> None:
    for s, h in previous.items():
        signal.signal(s, h if h is not None else signal.SIG_DFL)


# Set by a SIGTERM to this Ray Train worker process (install_worker_sigterm_handler); read by
# RayTrainContext.poll_stop. One per process: a restarted worker group is new processes.
WORKER_SIGTERM = StopFlag()
# Set while a fit's training loop runs in this worker process. Outside it (setup, the end of the
# fit, when Ray itself stops its workers with SIGTERM) a SIGTERM gets Ray's handler at once.
WORKER_TRAINING = threading.Event()
# While a fit runs in this worker: whether the process that called fit is still there. Ray also
# sends SIGTERM to workers whose owner died (a sweep trial that ASHA stopped, a killed driver);
# those must go at once, not commit a checkpoint nobody will read.
_driver_alive: Callable[[], bool] = lambda: True


def set_driver_probe(probe: Callable[[], bool]) -> None:
    global _driver_alive
    _driver_alive = probe


def install_worker_sigterm_handler() -> int:
    """Runs on a Ray Train worker actor's main thread (WorkerGroup.execute, before the training
    thread starts): SIGTERM asks for a committed checkpoint instead of Ray's immediate exit.
    Returns the process id (the tests signal it)."""
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        if WORKER_SIGTERM.reason is not None or not WORKER_TRAINING.is_set():  # Ray's handler
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            if callable(previous):
                return previous(signum, frame)
            raise SystemExit(128 + signum)
        # The answer needs a Ray call, which a signal handler must not make: a thread gives it.
        threading.Thread(target=_answer_worker_sigterm, daemon=True, name="raytrainer-sigterm").start()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
    return os.getpid()


def _answer_worker_sigterm() -> None:
    if not _driver_alive():
        os._exit(1)  # orphaned: Ray is tearing this worker down (what its own handler does, at once)
    WORKER_SIGTERM.request("SIGTERM")
    print(f"[raytrainer] worker pid {os.getpid()} got SIGTERM: committing a checkpoint at the "
          "next agreed step (send it again to exit now)", flush=True)


def handle_stop_request(run, request: tuple[str, str]) -> None:
    """At a checkpoint boundary, after the callbacks: act on an agreed stop/checkpoint request."""
    action, reason = request
    if action in (CHECKPOINT, RESTART):
        if run.cfg.enable_checkpointing and (action == RESTART or run.last_saved_position != run.position()):
            uri = run.save_checkpoint()  # (the one already saved at this position, if any)
            if action == RESTART:
                run.writer.wait()  # committed, not only submitted, before the workers go
            if run.ctx.global_rank == 0:
                print(f"[raytrainer] {reason}: committed a just-in-time checkpoint {uri}", flush=True)
        if action == RESTART:  # RayTrainContext asks for it only with checkpointing on
            raise WorkerTerminated(f"{reason}: checkpoint of step {run.global_step} committed; Ray "
                                   "restarts the workers from it (max_failures)")
        return
    run.preempted = reason
    run.should_stop = True


def commit_preemption_checkpoint(run) -> str | None:
    """After the loop ended on a stop request: the checkpoint of where it stopped (ModelCheckpoint
    may already have saved it as `last` in on_train_end)."""
    if not run.cfg.enable_checkpointing:
        return None
    if run.last_saved_position != run.position():
        run.save_checkpoint()
    return run.checkpoint_uri()
