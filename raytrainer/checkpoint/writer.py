"""Background checkpoint commits.

Training blocks only while the state is snapshotted (serialized to bytes). A single background
thread then writes the files, retrying with exponential backoff, writes the commit marker last,
and only then runs the after-commit actions (retention deletes older checkpoints). One commit is in
flight at a time, so commits land in order and at most two snapshots are in memory. A commit that
still fails after its retries is never dropped: the next ``submit`` or ``wait`` (at the latest, the
end of ``fit``) raises it.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from raytrainer.errors import CheckpointUploadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def delays(self):
        for attempt in range(1, self.attempts):
            yield min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))


def with_retries(fn: Callable[[], None], policy: RetryPolicy, what: str) -> None:
    """Run ``fn``; on failure wait and try again, up to ``policy.attempts`` times in all."""
    delays = policy.delays()
    while True:
        try:
            fn()
            return
        except Exception as e:
            delay = next(delays, None)
            if delay is None:
                raise CheckpointUploadError(f"{what} failed after {policy.attempts} attempts: "
                                            f"{type(e).__name__}: {e}") from e
            log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(e).__name__, e, delay)
            time.sleep(delay)


class CheckpointWriter:
    def __init__(self, asynchronous: bool = True, policy: RetryPolicy = RetryPolicy()):
        self.asynchronous = asynchronous
        self.policy = policy
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.blocked_s = 0.0  # time training spent waiting for a previous commit

    def submit(self, commit: Callable[[], None], after_commit: list[Callable[[], None]], what: str) -> None:
        self.wait()  # one commit in flight: ordered, bounded memory
        if not self.asynchronous:
            self._commit(commit, after_commit, what)
            self._raise_pending()
            return
        self._thread = threading.Thread(target=self._commit, args=(commit, after_commit, what),
                                        name="raytrainer-checkpoint", daemon=True)
        self._thread.start()

    def _commit(self, commit, after_commit, what) -> None:
        try:
            with_retries(commit, self.policy, what)
            for fn in after_commit:
                fn()
        except BaseException as e:  # kept for the training thread to raise
            self._error = e

    def wait(self) -> None:
        """Block until the commit in flight is done; raise its failure, if any."""
        if self._thread is not None:
            start = time.perf_counter()
            self._thread.join()
            self.blocked_s += time.perf_counter() - start
            self._thread = None
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
