"""ProgressBar (tqdm): one bar per training epoch, on global rank 0 only.

Metrics shown on the bar are read from the device only on logging steps and at epoch ends, so the
bar adds no host sync to the other steps.

Where the bar goes (chosen when each epoch starts, from where this process writes):
- a Jupyter kernel: tqdm's widget when ipywidgets is installed, else tqdm's text bar, whose
  carriage-return redraws the notebook renders in place;
- a terminal: tqdm's text bar;
- anything else (CI, a redirected file, ``ray job submit``'s log): whole lines, one every
  ``line_every_s`` seconds and one when the epoch ends.

On Ray workers (``launcher="ray"``) rank 0 draws nothing: it sends the bar's state to the driver
(``trainer.progress_sink``: a fire-and-forget call to the fit's mailbox, at most every
``SEND_EVERY_S`` and at the epoch's end, never waiting on it), and the driver's ProgressBar draws it
there (``follow``), by the rules above: one live bar where the user looks, instead of a worker's
log lines behind Ray's ``(RayTrainWorker pid=...)`` prefix.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time

from raytrainer.callbacks.base import Callback


SEND_EVERY_S = 0.25  # a worker's updates to the driver's bar, at most this often
DRAW_EVERY_S = 0.2   # how often the driver looks for them


class ProgressBar(Callback):
    rank_zero_only = True  # the Run drops it on other ranks

    def __init__(self, leave: bool = True, line_every_s: float = 30.0):
        self.leave = leave
        self.line_every_s = line_every_s
        self._bar = None
        self._every = 1
        self._shown_step = -1

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._close(trainer)  # (an epoch that ended early left its bar open)
        self._every = trainer.log_every_n_steps  # read here, not through properties every batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._bar is None:  # the epoch's first batch: a resumed epoch starts at batch_idx
            self._open(trainer, initial=batch_idx)

    def _open(self, trainer, initial: int) -> None:
        n = trainer.num_training_batches
        total = None if math.isinf(n) else int(n)
        desc = f"Epoch {trainer.current_epoch}"
        sink = trainer.progress_sink
        if sink is not None:  # drawn by the driver (see the module docstring)
            self._bar = _SentBar(sink, total=total, initial=initial, desc=desc)
        else:
            self._bar = self._local_bar(total, initial, desc)
        self._shown_step = trainer.global_step

    def _local_bar(self, total: int | None, initial: int, desc: str):
        bar_class = _bar_class(sys.stderr)
        if bar_class is None:
            return _LineBar(total=total, initial=initial, desc=desc, file=sys.stderr, every_s=self.line_every_s)
        return bar_class(total=total, initial=initial, desc=desc, leave=self.leave, file=sys.stderr,
                         dynamic_ncols=True, mininterval=0.2)

    def follow(self, take):
        """On the driver of a Ray fit: draw the bars rank 0 sends (see ``follow``)."""
        return follow(take, self)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._bar is None:
            return
        self._bar.update(1)
        # The loop's logging steps only: a step that just became a multiple of log_every_n_steps
        # (not every micro-batch of an accumulation window that leaves global_step there).
        step = trainer.global_step
        if step != self._shown_step and step % self._every == 0:
            self._shown_step = step
            self._bar.set_postfix(_fmt(trainer.progress_bar_metrics), refresh=False)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._bar is not None:
            self._bar.set_postfix(_fmt(trainer.progress_bar_metrics), refresh=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._close(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._close(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close(trainer)

    def _close(self, trainer) -> None:
        if self._bar is not None:
            self._bar.set_postfix(_fmt(trainer.progress_bar_metrics), refresh=False)
            self._bar.close()
            self._bar = None

    def __getstate__(self):
        return {**self.__dict__, "_bar": None}


def _bar_class(stream):
    """tqdm's widget bar in a Jupyter kernel with ipywidgets, its text bar in other kernels and in
    terminals, None (whole lines) elsewhere.

    What ``tqdm.auto`` decides, without its warnings: it warns "IProgress not found" in a kernel
    without ipywidgets (the widget is optional here, so the text bar is the intended fallback, not
    a problem to report) and "TqdmExperimentalWarning" whenever it picks the widget.
    """
    if _in_jupyter_kernel():
        try:
            import ipywidgets  # noqa: F401
        except ImportError:
            pass
        else:
            from tqdm.notebook import tqdm
            return tqdm
        from tqdm.std import tqdm
        return tqdm
    try:
        interactive = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        interactive = False
    if interactive:
        from tqdm.std import tqdm
        return tqdm
    return None


def _in_jupyter_kernel() -> bool:
    # IPython not imported: not in a kernel (and not worth importing to find out).
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if type(shell).__name__ != "ZMQInteractiveShell":  # Jupyter, JupyterLab, VS Code, Colab
        return False
    # qtconsole and Spyder run the same shell but draw no widgets (tqdm.autonotebook's test).
    return not any(k == "QT_API" or k.startswith("SPYDER") for k in os.environ)


class _LineBar:
    """The part of tqdm's interface the callback uses, printing whole lines formatted as tqdm's
    bar: one every ``every_s`` seconds of the epoch, one at its end."""

    def __init__(self, total: int | None, initial: int, desc: str, file, every_s: float):
        self.total, self.n, self.initial, self.desc, self.file = total, initial, initial, desc, file
        self.every_s = every_s
        self.postfix = ""
        self.start = self.printed = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.printed >= self.every_s:
            self._print(now)

    def set_postfix(self, ordered_dict: dict, refresh: bool = False) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in ordered_dict.items())

    def close(self) -> None:
        self._print(time.monotonic())

    def _print(self, now: float) -> None:
        from tqdm.std import tqdm
        self.printed = now
        line = tqdm.format_meter(self.n, self.total, now - self.start, prefix=self.desc,
                                 postfix=self.postfix or None, initial=self.initial, ascii=True)
        self.file.write(line + "\n")
        self.file.flush()


@contextlib.contextmanager
def follow(take, bar: ProgressBar | None = None):
    """On the driver of a Ray run, while it runs: draw what the workers send. ``take()`` returns
    what arrived since the last call, oldest first: rank 0's bar states (``desc``, ``total``,
    ``initial``, ``n``, ``postfix``, ``closed``; drawn with ``bar``'s rules, ignored without a
    ``bar``), its notices (``log``), the workers' output lines (``out``, runtime/worker_output.py)."""
    stop = threading.Event()
    drawer = _DriverBars(bar)

    def poll() -> None:
        while not stop.wait(DRAW_EVERY_S):
            try:
                drawer.draw(take())
            except Exception:  # the bar never takes the run down (a mailbox gone at the end)
                return
    thread = threading.Thread(target=poll, name="raytrainer-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            drawer.draw(take())  # what arrived after the last poll: the last epoch's end
        drawer.close()


class _SentBar:
    """On a Ray worker: the bar's state sent to the driver instead of drawn (see the module
    docstring); the part of tqdm's interface the callback uses."""

    def __init__(self, sink, total: int | None, initial: int, desc: str):
        self.sink, self.n = sink, initial
        self.state = {"desc": desc, "total": total, "initial": initial, "n": initial, "postfix": {}, "closed": False}
        self.start = time.monotonic()
        self.sent = 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        self._send(force=False)

    def set_postfix(self, ordered_dict: dict, refresh: bool = False) -> None:
        self.state["postfix"] = dict(ordered_dict)

    def close(self) -> None:
        self.state["closed"] = True
        self._send(force=True)

    def _send(self, force: bool) -> None:
        now = time.monotonic()
        if force or now - self.sent >= SEND_EVERY_S:
            self.sent = now
            self.sink({**self.state, "n": self.n, "elapsed": now - self.start})


class _DriverBars:
    """The driver's side of ``_SentBar``: one local bar per epoch, moved to each state received."""

    def __init__(self, callback: ProgressBar | None):
        self.callback, self.bar, self.desc = callback, None, None

    def draw(self, states: list[dict]) -> None:
        for state in states:
            if "log" in state:  # a notice of rank 0's (the model summary), logged here
                logging.getLogger(state["logger"]).info("%s", state["log"])
            elif "out" in state:  # a worker's print, above the bar
                self._print(state)
            elif self.callback is not None:
                self._move(state)

    def _print(self, state: dict) -> None:
        stream = sys.stderr if state["err"] else sys.stdout
        text = "".join(f"(rank {state['rank']}) {line}" for line in state["out"].splitlines(keepends=True))
        if self.bar is not None and not isinstance(self.bar, _LineBar):
            from tqdm.std import tqdm
            tqdm.write(text, file=stream, end="")  # clears the bar, writes, redraws it
        else:
            stream.write(text)
            stream.flush()

    def _move(self, state: dict) -> None:
        if self.bar is None or state["desc"] != self.desc:
            self.close()
            self.bar, self.desc = self.callback._local_bar(state["total"], state["initial"], state["desc"]), \
                state["desc"]
        # the rate is the worker's: its time, not when the state arrived here
        if isinstance(self.bar, _LineBar):
            self.bar.start = time.monotonic() - state["elapsed"]
        else:
            self.bar.start_t = self.bar._time() - state["elapsed"]
        if state["n"] > self.bar.n:
            self.bar.update(state["n"] - self.bar.n)
        self.bar.set_postfix(state["postfix"], refresh=False)
        if state["closed"]:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = self.desc = None


def _fmt(metrics: dict[str, float]) -> dict[str, str]:
    return {k: f"{v:.4g}" for k, v in metrics.items()}
