"""Profilers: where a fit's time goes. ``Trainer(profiler=None | "simple" | "pytorch")``, or an
instance of ``SimpleProfiler`` / ``PyTorchProfiler`` for their options.

Free when off: loop.py knows nothing about profiling. A profiler instruments one fit from the
outside, replacing what the loop reaches through the Run (``run.training_forward``,
``run.backward``, ``run.optimizer_step``, the hook dispatchers, ``run.log_to_loggers``,
``run.evaluate``, ``run.save_checkpoint``, ...) and the train iterator with timed versions, and
puts the originals back when the fit ends. Times are exclusive: a hook called inside backward
counts for the hook, not for backward, so the rows plus "other" sum to the fit's wall time.

simple   a table of every stage (Lightning's SimpleProfiler columns), printed on rank 0 at the end
         of fit and written to ``{run_dir}/profiler/simple.txt`` and ``simple.json``. On CUDA each
         timed region synchronizes the device before and after it (only while profiling), so GPU
         time is charged to the stage that queued the kernels, not to the next host sync.
pytorch  the same table (without device syncs: they would hide the overlap a trace is for), plus
         a torch.profiler trace of a window of optimizer steps (``wait``, ``warmup``, ``active``),
         one ``rank{k}.*.pt.trace.json`` per rank in ``{run_dir}/profiler/``; open it with
         TensorBoard's profiler plugin (``tensorboard --logdir {run_dir}``) or Perfetto. Stage
         names appear in the trace as ``record_function`` ranges.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Callable

import torch

from raytrainer import storage

PROFILERS = ("simple", "pytorch")
DATA_NEXT = "data fetch (next batch)"
DATA_START = "data fetch (epoch start)"
OTHER = "other (unaccounted)"
CONTROL = "pytorch profiler (start, step, export)"  # the profiler's own cost: never "slowest"
_MISSING = object()


@contextmanager
def profiling(run, train):
    """Profile the fit run inside the block when ``Trainer(profiler=...)`` is set. Yields a dict
    that holds ``{"profile": report}`` once the block succeeded; with ``profiler=None`` nothing is
    wrapped and the dict stays empty."""
    out: dict[str, Any] = {}
    spec = run.cfg.profiler
    if spec is None:
        yield out
        return
    prof = copy.copy(spec) if isinstance(spec, SimpleProfiler) else _BY_NAME[spec]()
    prof._start(run, train)
    try:
        yield out
    except BaseException:
        prof._stop(success=False)
        raise
    out["profile"] = prof._finish()


class SimpleProfiler:
    """Times every stage of a fit (see the module docstring). ``sync_cuda``: synchronize the
    device around every timed region on CUDA, so GPU time lands in the right row."""

    name = "simple"

    def __init__(self, sync_cuda: bool = True):
        self.sync_cuda = sync_cuda

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    # ------------------------------------------------------------------ one fit
    def _start(self, run, train) -> None:
        self._run = run
        self._records: dict[str, list] = {}  # action -> [calls, exclusive seconds]
        self._stack: list[float] = []        # time spent in children, per open region
        self._patched: list[tuple] = []
        self._sync = torch.cuda.synchronize if self.sync_cuda and run.device.type == "cuda" else None
        self._instrument(run, train)
        self._t0 = time.perf_counter()

    def _timed(self, action: str, fn: Callable) -> Callable:
        rec = self._records.setdefault(action, [0, 0.0])
        stack, sync, clock = self._stack, self._sync, time.perf_counter

        def timed(*args, **kwargs):
            if sync is not None:
                sync()  # work queued before this region is not this region's
            stack.append(0.0)
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                if sync is not None:
                    sync()
                dt = clock() - t0
                rec[0] += 1
                rec[1] += dt - stack.pop()  # exclusive: nested regions count for themselves
                if stack:
                    stack[-1] += dt
        return timed

    def _patch(self, obj: Any, attr: str, value: Any) -> None:
        self._patched.append((obj, attr, obj.__dict__.get(attr, _MISSING)))
        setattr(obj, attr, value)

    def _instrument(self, run, train) -> None:
        t = self._timed
        wrap = {  # (object, attribute) -> row
            (run, "training_forward"): "forward (training_step)",
            (run, "backward"): "backward",
            (run, "optimizer_step"): "optimizer step",  # unscale, clip, step, zero_grad
            (run, "manual_optimizer_step"): "optimizer step",
            (run.precision, "update"): "optimizer step",  # GradScaler.update
            (run, "step_schedulers"): "lr schedulers",
            (run, "check_finite_losses"): "logging",  # the loss read-back: a host sync
            (run.metrics, "step_metrics"): "logging",
            (run, "log_to_loggers"): "logging",
            (run, "evaluate"): "validation",
            (run, "save_checkpoint"): "checkpoint save (snapshot)",
            (run.writer, "wait"): "checkpoint commit (waiting for uploads)",
        }
        for (obj, attr), action in wrap.items():
            self._patch(obj, attr, t(action, getattr(obj, attr)))

        # Hooks: run.hooks.on_x and run.call("on_x") resolve through run._dispatcher (None when
        # nobody implements on_x: stays None, never timed); a fresh run.hooks drops the ones
        # resolved before the profiler started.
        dispatcher = run._dispatcher

        def timed_dispatcher(hook: str):
            fn = dispatcher(hook)
            return None if fn is None else t(f"hook: {hook}", fn)
        self._patch(run, "_dispatcher", timed_dispatcher)
        self._patch(run, "hooks", type(run.hooks)(run))
        for attr, which in (("call_module", 0), ("call_callbacks", 1)):
            self._patch(run, attr, self._timed_by_hook(getattr(run, attr), which))

        start_epoch = t(DATA_START, train.epoch_iterator)

        def epoch_iterator(*args, **kwargs):
            it, state = start_epoch(*args, **kwargs)
            return _TimedIterator(t(DATA_NEXT, it.__next__)), state
        self._patch(train, "epoch_iterator", epoch_iterator)

    def _timed_by_hook(self, call: Callable, which: int) -> Callable:
        """``run.call_module(hook, ...)`` / ``run.call_callbacks(hook, ...)``, timed per hook;
        not timed when nothing implements the hook (no empty rows)."""
        run, cache = self._run, {}

        def by_hook(hook: str, *args):
            fn = cache.get(hook)
            if fn is None:
                fn = cache[hook] = self._timed(f"hook: {hook}", call) if run._implementations(hook)[which] else call
            return fn(hook, *args)
        return by_hook

    def _stop(self, success: bool) -> float:
        """Stop the clock and put every original back (also when the fit failed)."""
        elapsed = time.perf_counter() - self._t0
        for obj, attr, previous in reversed(self._patched):
            if previous is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, previous)
        self._patched = []
        return elapsed

    def _finish(self) -> dict:
        fit_s = self._stop(success=True)
        run, ctx = self._run, self._run.ctx
        rows = [{"action": a, "mean_s": total / calls, "calls": calls, "total_s": total,
                 "percent": 100.0 * total / fit_s} for a, (calls, total) in self._records.items() if calls]
        rows.sort(key=lambda r: -r["total_s"])
        other = fit_s - sum(r["total_s"] for r in rows)
        report = {"profiler": self.name, "rank": ctx.global_rank, "fit_s": fit_s,
                  "slowest": next((r["action"] for r in rows if r["action"] != CONTROL), None),
                  "slowest_rank_data_wait": None,
                  "rows": rows + [{"action": OTHER, "mean_s": None, "calls": None, "total_s": other,
                                   "percent": 100.0 * other / fit_s}]}
        if ctx.world_size > 1:  # a collective: every rank gets here, after the same fit
            wait = sum(self._records.get(a, (0, 0.0))[1] for a in (DATA_NEXT, DATA_START))
            waits = ctx.all_gather_object(wait)
            k = max(range(len(waits)), key=waits.__getitem__)
            report["slowest_rank_data_wait"] = {"rank": k, "seconds": waits[k]}
        if ctx.global_rank == 0:
            report["table"] = format_table(report)
            print(report["table"], flush=True)
            uri = storage.join(run.cfg.run_dir, "profiler", f"{self.name}.txt")
            _write(uri, report["table"] + "\n", run.cfg.storage_options)
            _write(uri[:-4] + ".json", json.dumps({k: v for k, v in report.items() if k != "table"},
                                                  indent=1), run.cfg.storage_options)
            report["path"] = uri
        return report


class PyTorchProfiler(SimpleProfiler):
    """The stage table plus a torch.profiler trace of optimizer steps ``wait`` (skipped), then
    ``warmup`` (traced, discarded), then ``active`` (kept); ``repeat`` such windows (0: until
    the fit ends). The trace is stepped once per optimizer step."""

    name = "pytorch"

    def __init__(self, wait: int = 1, warmup: int = 1, active: int = 3, repeat: int = 1,
                 record_shapes: bool = False, profile_memory: bool = False, with_stack: bool = False):
        from raytrainer.config import ConfigError
        for arg, value, low in (("wait", wait, 0), ("warmup", warmup, 0), ("active", active, 1),
                                ("repeat", repeat, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"PyTorchProfiler({arg}={value!r}) is invalid: expected an int >= {low}")
        super().__init__(sync_cuda=False)
        self.wait, self.warmup, self.active, self.repeat = wait, warmup, active, repeat
        self.record_shapes, self.profile_memory, self.with_stack = record_shapes, profile_memory, with_stack

    def _timed(self, action: str, fn: Callable) -> Callable:
        record_function = torch.profiler.record_function

        def labelled(*args, **kwargs):
            with record_function(action):  # the stage's name as a range in the trace
                return fn(*args, **kwargs)
        return super()._timed(action, labelled)

    def _control(self, fn: Callable) -> Callable:
        """The torch profiler's own start/step/stop (a step may export a trace), timed."""
        return SimpleProfiler._timed(self, CONTROL, fn)

    def _start(self, run, train) -> None:
        run_dir = run.cfg.run_dir
        remote = storage.is_remote(run_dir)
        self._trace_dir = tempfile.mkdtemp(prefix="raytrainer-trace-") if remote else \
            os.path.join(run_dir.removeprefix("file://"), "profiler")
        os.makedirs(self._trace_dir, exist_ok=True)
        self._old_files = set(os.listdir(self._trace_dir))  # a resumed run's earlier traces
        activities = [torch.profiler.ProfilerActivity.CPU]
        if run.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._torch = torch.profiler.profile(
            activities=activities, record_shapes=self.record_shapes, profile_memory=self.profile_memory,
            with_stack=self.with_stack,
            schedule=torch.profiler.schedule(wait=self.wait, warmup=self.warmup, active=self.active,
                                             repeat=self.repeat),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(
                self._trace_dir, worker_name=f"rank{run.ctx.global_rank}"))
        super()._start(run, train)
        self._control(self._torch.start)()

    def _instrument(self, run, train) -> None:
        super()._instrument(run, train)
        step = self._control(lambda: self._torch.step())
        for attr in ("optimizer_step", "manual_optimizer_step"):
            self._patch(run, attr, _then(getattr(run, attr), step))

    def _stop(self, success: bool) -> float:
        try:
            self._control(self._torch.stop)()
        finally:
            elapsed = super()._stop(success)
        if success and self._run.ctx.global_rank == 0 and \
                not any(n.endswith(".pt.trace.json") for n in set(os.listdir(self._trace_dir)) - self._old_files):
            print(f"[raytrainer] profiler='pytorch' wrote no trace: the fit took fewer optimizer steps "
                  f"than wait + warmup + 1 = {self.wait + self.warmup + 1}", flush=True)
        if storage.is_remote(self._run.cfg.run_dir):
            try:
                if success:  # traces are written locally, then uploaded next to the run's files
                    fs, path = storage.filesystem(storage.join(self._run.cfg.run_dir, "profiler"),
                                                  self._run.cfg.storage_options)
                    fs.makedirs(path, exist_ok=True)
                    for name in os.listdir(self._trace_dir):
                        fs.put_file(os.path.join(self._trace_dir, name), f"{path}/{name}")
            finally:
                shutil.rmtree(self._trace_dir, ignore_errors=True)
        return elapsed


_BY_NAME = {"simple": SimpleProfiler, "pytorch": PyTorchProfiler}


class _TimedIterator:
    """The epoch's train iterator, each ``next()`` timed."""

    __slots__ = ("_next",)

    def __init__(self, timed_next: Callable):
        self._next = timed_next

    def __iter__(self):
        return self

    def __next__(self):
        return self._next()


def _then(fn: Callable, after: Callable) -> Callable:
    def both(*args, **kwargs):
        out = fn(*args, **kwargs)
        after()
        return out
    return both


def format_table(report: dict) -> str:
    """Lightning SimpleProfiler-style columns: action, mean, calls, total, % of the fit."""
    rows, fit_s = report["rows"], report["fit_s"]
    width = max(len(r["action"]) for r in rows) + 2
    head = f"| {'Action':<{width}}| Mean duration (s) | Num calls | Total time (s) | Percentage % |"
    line = "-" * len(head)

    def fmt(action, mean, calls, total, pct):
        return f"| {action:<{width}}| {mean:>17} | {calls:>9} | {total:>14} | {pct:>12} |"
    out = [f"{report['profiler']} profiler: fit took {fit_s:.3f} s on rank {report['rank']}", line, head, line,
           fmt("Total", "-", sum(r["calls"] or 0 for r in rows), f"{fit_s:.5f}", "100.0"), line]
    for r in rows:
        mean = "-" if r["mean_s"] is None else f"{r['mean_s']:.6f}"
        calls = "-" if r["calls"] is None else r["calls"]
        out.append(fmt(r["action"], mean, calls, f"{r['total_s']:.5f}", f"{r['percent']:.1f}"))
    out.append(line)
    if report.get("slowest_rank_data_wait"):
        w = report["slowest_rank_data_wait"]
        out.append(f"slowest rank data wait: rank {w['rank']}, {w['seconds']:.3f} s")
    return "\n".join(out)


def _write(uri: str, text: str, storage_options) -> None:
    fs, path = storage.filesystem(uri, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, text.encode())
