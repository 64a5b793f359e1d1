"""A Ray worker's own output (prints, warnings) on the driver, prefixed by the worker's rank.

Ray forwards a worker's output from its log files, behind ``(RayTrainWorker pid=...)`` and colour
codes, and folds repeated lines across workers. During a raytrainer run the worker's Python
``sys.stdout``/``sys.stderr`` are replaced by line writers that send whole lines to the fit's
mailbox instead (fire and forget); the driver prints them as ``(rank N) ...`` on its own stdout or
stderr, above its progress bar (callbacks/progress.py). Output written to the file descriptors
directly (C extensions, subprocesses) still takes Ray's way.
"""
from __future__ import annotations

import contextlib
import io
import sys
from typing import Callable, Iterator


class LineSender(io.TextIOBase):
    """A text stream sending each complete line (and, on flush, any partial one) to ``send``."""

    def __init__(self, send: Callable[[dict], None], rank: int, err: bool, original):
        self._send, self._rank, self._err, self._original = send, rank, err, original
        self._buffer = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._buffer += text
        if "\n" in self._buffer:
            complete, self._buffer = self._buffer.rsplit("\n", 1)
            self._send({"out": complete + "\n", "rank": self._rank, "err": self._err})
        return len(text)

    def flush(self) -> None:
        if self._buffer:
            text, self._buffer = self._buffer, ""
            self._send({"out": text, "rank": self._rank, "err": self._err})

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:  # what writes to the descriptor itself gets: Ray's forwarding
        return self._original.fileno()


@contextlib.contextmanager
def sent_to_driver(send: Callable[[dict], None], rank: int) -> Iterator[None]:
    """This process's ``sys.stdout``/``sys.stderr`` go to ``send`` for the duration."""
    saved = sys.stdout, sys.stderr
    sys.stdout = LineSender(send, rank, False, saved[0])
    sys.stderr = LineSender(send, rank, True, saved[1])
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        sys.stdout, sys.stderr = saved
