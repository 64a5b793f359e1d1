"""Signal handlers that turn SIGTERM and Ctrl-C into a committed checkpoint (the loop's side of it,
acting on an agreed request, is loop/preemption.py; the whole story is told there).

* ``stop_on_signals``: in the process that called ``fit`` (local runs, and the driver of a Ray
  run), SIGTERM/SIGINT set a ``StopFlag`` for the duration of the fit; a second signal gets the
  previous handler (abort now).
* ``WorkerSigterm``: in a Ray Train worker process, SIGTERM asks for a committed checkpoint at the
  next agreed step instead of Ray's immediate exit. The handler object itself holds the request
  (a signal's disposition is process-wide already; nothing else is): the training thread finds it
  with ``worker_sigterm()``.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from raytrainer.loop.preemption import StopFlag

log = logging.getLogger(__name__)


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
            restore_handlers(previous)
            old = previous[signum]
            if callable(old):
                return old(signum, frame)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        flag.request(name)
        log.warning("%s: stopping at the next step boundary with a committed checkpoint (send it again "
                    "to abort now)", name)
        if on_first is not None:
            on_first(name)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        restore_handlers(previous)


def restore_handlers(previous: dict) -> None:
    for s, h in previous.items():
        signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextmanager
def handlers_restored(*signums: int) -> Iterator[None]:
    """Put back the handlers of ``signums`` after the block: Ray Tune installs SIGINT/SIGUSR1
    handlers for its run and leaves them installed (after a sweep, Ctrl-C in the same process
    would only log "ending Ray Tune run")."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in signums}
    try:
        yield
    finally:
        restore_handlers(saved)


class WorkerSigterm:
    """The SIGTERM handler of one Ray Train worker process, and the state it shares with that
    worker's training thread.

    ``training`` is set while a fit's training loop runs; outside it (setup, the end of the fit,
    Ray stopping its workers) a SIGTERM gets Ray's handler at once. ``driver_alive`` tells whether
    the process that called fit is still there: Ray also sends SIGTERM to workers whose owner
    died (a sweep trial that ASHA stopped, a killed driver), and those must go at once, not
    commit a checkpoint nobody will read. ``flag`` holds the request the loop polls."""

    def __init__(self, previous) -> None:
        self.flag = StopFlag()
        self.training = threading.Event()
        self.driver_alive: Callable[[], bool] = lambda: True
        self._previous = previous

    def __call__(self, signum, frame):
        if self.flag.reason is not None or not self.training.is_set():  # Ray's handler
            previous = self._previous
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            if callable(previous):
                return previous(signum, frame)
            raise SystemExit(128 + signum)
        # The answer needs a Ray call, which a signal handler must not make: a thread gives it.
        threading.Thread(target=self._answer, daemon=True, name="raytrainer-sigterm").start()

    def _answer(self) -> None:
        if not self.driver_alive():
            os._exit(1)  # orphaned: Ray is tearing this worker down (what its own handler does, at once)
        self.flag.request("SIGTERM")
        log.warning("worker pid %d got SIGTERM: committing a checkpoint at the next agreed step (send it "
                    "again to exit now)", os.getpid())


def install_worker_sigterm_handler() -> int:
    """Runs on a Ray Train worker actor's main thread (WorkerGroup.execute, before the training
    thread starts): SIGTERM asks for a committed checkpoint instead of Ray's immediate exit.
    Returns the process id (the tests signal it)."""
    if threading.current_thread() is threading.main_thread() and worker_sigterm() is None:
        signal.signal(signal.SIGTERM, WorkerSigterm(signal.getsignal(signal.SIGTERM)))
    return os.getpid()


def worker_sigterm() -> WorkerSigterm | None:
    """This process's worker SIGTERM handler, if one is installed."""
    handler = signal.getsignal(signal.SIGTERM)
    return handler if isinstance(handler, WorkerSigterm) else None
