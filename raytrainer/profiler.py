"""Profilers: where a fit's time goes. ``Trainer(profiler=None | "simple" | "pytorch")``, or an
instance of ``SimpleProfiler`` / ``PyTorchProfiler`` for their options.

The loop calls the profiler explicitly at its few stage boundaries (``with profiler.region(...)``
around data fetches, forward, backward, the optimizer step, logging, validation, checkpoint saves
and waits), and the hook dispatcher wraps each hook it resolves (``profiler.wrap``). With
``profiler=None`` the loop holds a ``NoProfiler``, whose calls return at once: a region is a
shared ``nullcontext``, a wrapped function is the function itself. Times are exclusive: a hook
called inside backward counts for the hook, not for backward, so the rows plus "other" sum to the
fit's wall time.

simple   a table of every stage (Lightning's SimpleProfiler columns), logged on rank 0 at the end
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
import logging
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch

from raytrainer import storage
from raytrainer.errors import ConfigError

log = logging.getLogger(__name__)

PROFILERS = ("simple", "pytorch")
# The rows of the table: one per stage the loop marks.
DATA_NEXT = "data fetch (next batch)"
DATA_START = "data fetch (epoch start)"
FORWARD = "forward (training_step)"
BACKWARD = "backward"         # also zero_grad, at a window's first batch just before it (Lightning's place)
OPTIMIZER = "optimizer step"  # unscale, hooks, clip, step, GradScaler.update
SCHEDULERS = "lr schedulers"
LOGGING = "logging"           # the loss read-back (a host sync), metrics, loggers
VALIDATION = "validation"
CHECKPOINT_SAVE = "checkpoint save (snapshot)"
CHECKPOINT_WAIT = "checkpoint commit (waiting for uploads)"
OTHER = "other (unaccounted)"
CONTROL = "pytorch profiler (start, step, export)"  # the profiler's own cost: never "slowest"


class NoProfiler:
    """Profiling off: what the loop holds when ``Trainer(profiler=None)``. Free: no timing, no
    wrapping, no allocation per call."""

    _NULL = nullcontext()

    def region(self, action: str) -> nullcontext:
        return self._NULL

    def wrap(self, action: str, fn: Callable) -> Callable:
        return fn

    def step(self) -> None:
        """An optimizer step was taken (PyTorchProfiler advances its trace schedule here)."""

    def start(self, ctx, device: torch.device, cfg) -> None:
        pass

    def finish(self) -> dict | None:
        return None

    def abort(self) -> None:
        pass


def build_profiler(spec: Any):
    """``Trainer(profiler=...)`` -> the object one run uses (a fresh copy: a run's records are
    its own, even when the user passed one instance to several Trainers)."""
    if spec is None:
        return NoProfiler()
    if isinstance(spec, SimpleProfiler):
        return copy.copy(spec)
    return _BY_NAME[spec]()


def check_profiler_spec(value: Any) -> Any:
    if value is None or isinstance(value, SimpleProfiler) or (isinstance(value, str) and value in PROFILERS):
        return value
    raise ConfigError(f"Trainer(profiler={value!r}) is invalid: expected None, one of {list(PROFILERS)}, or "
                      "a raytrainer.profiler.SimpleProfiler / PyTorchProfiler instance")


class _Region:
    """``with profiler.region(action):`` — one stage's time, exclusive of nested regions."""

    __slots__ = ("_open", "_close", "_record")

    def __init__(self, profiler: "SimpleProfiler", record: list):
        self._open, self._close, self._record = profiler._open, profiler._close, record

    def __enter__(self) -> None:
        self._open()

    def __exit__(self, *exc: Any) -> bool:
        self._close(self._record)
        return False


class SimpleProfiler:
    """Times every stage of a fit (see the module docstring). ``sync_cuda``: synchronize the
    device around every timed region on CUDA, so GPU time lands in the right row."""

    name = "simple"

    def __init__(self, sync_cuda: bool = True):
        self.sync_cuda = sync_cuda

    def __repr__(self) -> str:
        public = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in public.items())})"

    # ------------------------------------------------------------------ one fit
    def start(self, ctx, device: torch.device, cfg) -> None:
        self._ctx, self._cfg = ctx, cfg
        self._records: dict[str, list] = {}  # action -> [calls, exclusive seconds]
        self._regions: dict[str, _Region] = {}
        self._stack: list[list[float]] = []  # [start time, time spent in children] per open region
        self._sync = torch.cuda.synchronize if self.sync_cuda and device.type == "cuda" else None
        self._t0 = time.perf_counter()

    def region(self, action: str) -> _Region:
        region = self._regions.get(action)
        if region is None:
            region = self._regions[action] = _Region(self, self._records.setdefault(action, [0, 0.0]))
        return region

    def wrap(self, action: str, fn: Callable) -> Callable:
        region = self.region(action)

        def timed(*args, **kwargs):
            with region:
                return fn(*args, **kwargs)
        return timed

    def step(self) -> None:
        pass

    def _open(self) -> None:
        if self._sync is not None:
            self._sync()  # work queued before this region is not this region's
        self._stack.append([time.perf_counter(), 0.0])

    def _close(self, record: list) -> None:
        if self._sync is not None:
            self._sync()
        t0, children = self._stack.pop()
        dt = time.perf_counter() - t0
        record[0] += 1
        record[1] += dt - children  # exclusive: nested regions count for themselves
        if self._stack:
            self._stack[-1][1] += dt

    def abort(self) -> None:
        """The fit failed: stop (what a profiler holds of the process is released)."""

    def finish(self) -> dict:
        fit_s = time.perf_counter() - self._t0
        ctx = self._ctx
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
            log.info("%s", report["table"])
            uri = storage.join(self._cfg.run_dir, "profiler", f"{self.name}.txt")
            _write(uri, report["table"] + "\n", self._cfg.storage_options)
            _write(uri[:-4] + ".json", json.dumps({k: v for k, v in report.items() if k != "table"},
                                                  indent=1), self._cfg.storage_options)
            report["path"] = uri
        return report


class _LabelledRegion(_Region):
    """A region that is also a ``record_function`` range, so the stage names show in the trace."""

    __slots__ = ("_action", "_ranges")

    def __init__(self, profiler: "SimpleProfiler", record: list, action: str):
        super().__init__(profiler, record)
        self._action, self._ranges = action, []

    def __enter__(self) -> None:
        rf = torch.profiler.record_function(self._action)
        rf.__enter__()
        self._ranges.append(rf)
        self._open()

    def __exit__(self, *exc: Any) -> bool:
        self._close(self._record)
        self._ranges.pop().__exit__(*exc)
        return False


class PyTorchProfiler(SimpleProfiler):
    """The stage table plus a torch.profiler trace of optimizer steps ``wait`` (skipped), then
    ``warmup`` (traced, discarded), then ``active`` (kept); ``repeat`` such windows (0: until
    the fit ends). The trace is stepped once per optimizer step."""

    name = "pytorch"

    def __init__(self, wait: int = 1, warmup: int = 1, active: int = 3, repeat: int = 1,
                 record_shapes: bool = False, profile_memory: bool = False, with_stack: bool = False):
        for arg, value, low in (("wait", wait, 0), ("warmup", warmup, 0), ("active", active, 1),
                                ("repeat", repeat, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"PyTorchProfiler({arg}={value!r}) is invalid: expected an int >= {low}")
        super().__init__(sync_cuda=False)
        self._torch = None  # torch's profiler, while one fit runs
        self.wait, self.warmup, self.active, self.repeat = wait, warmup, active, repeat
        self.record_shapes, self.profile_memory, self.with_stack = record_shapes, profile_memory, with_stack

    def region(self, action: str) -> _Region:
        region = self._regions.get(action)
        if region is None:
            record = self._records.setdefault(action, [0, 0.0])
            region = self._regions[action] = _LabelledRegion(self, record, action)
        return region

    def start(self, ctx, device: torch.device, cfg) -> None:
        run_dir = cfg.run_dir
        remote = storage.is_remote(run_dir)
        self._trace_dir = tempfile.mkdtemp(prefix="raytrainer-trace-") if remote else \
            os.path.join(run_dir.removeprefix("file://"), "profiler")
        os.makedirs(self._trace_dir, exist_ok=True)
        self._old_files = set(os.listdir(self._trace_dir))  # a resumed run's earlier traces
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._torch = torch.profiler.profile(
            activities=activities, record_shapes=self.record_shapes, profile_memory=self.profile_memory,
            with_stack=self.with_stack,
            schedule=torch.profiler.schedule(wait=self.wait, warmup=self.warmup, active=self.active,
                                             repeat=self.repeat),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(
                self._trace_dir, worker_name=f"rank{ctx.global_rank}"))
        super().start(ctx, device, cfg)
        self._control = SimpleProfiler.region(self, CONTROL)  # timed, never a trace range
        with self._control:
            self._torch.start()

    def step(self) -> None:
        with self._control:
            self._torch.step()  # may export a trace

    def abort(self) -> None:
        if self._torch is not None:  # (a fit can fail before the profiler started)
            self._stop_torch(success=False)

    def finish(self) -> dict:
        self._stop_torch(success=True)
        return super().finish()

    def _stop_torch(self, success: bool) -> None:
        try:
            with self._control:
                self._torch.stop()
        finally:
            self._upload_traces(success)

    def _upload_traces(self, success: bool) -> None:
        new = set(os.listdir(self._trace_dir)) - self._old_files
        if success and self._ctx.global_rank == 0 and not any(n.endswith(".pt.trace.json") for n in new):
            log.warning("profiler='pytorch' wrote no trace: the fit took fewer optimizer steps than "
                        "wait + warmup + 1 = %d", self.wait + self.warmup + 1)
        if not storage.is_remote(self._cfg.run_dir):
            return
        try:
            if success:  # traces are written locally, then uploaded next to the run's files
                fs, path = storage.filesystem(storage.join(self._cfg.run_dir, "profiler"),
                                              self._cfg.storage_options)
                fs.makedirs(path, exist_ok=True)
                for name in os.listdir(self._trace_dir):
                    fs.put_file(os.path.join(self._trace_dir, name), f"{path}/{name}")
        finally:
            shutil.rmtree(self._trace_dir, ignore_errors=True)


_BY_NAME = {"simple": SimpleProfiler, "pytorch": PyTorchProfiler}


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
