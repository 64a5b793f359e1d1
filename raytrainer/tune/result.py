"""SweepResult: what ``rt.sweep`` returns — trials, the best one, a table, a plot, a summary."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from raytrainer.checkpoint.resume import best_checkpoint_recorded_in
from raytrainer.checkpoint.store import list_committed
from raytrainer.tune.trial import read_trial_summary


@dataclass
class TrialResult:
    trial_id: str
    config: dict
    status: str                      # "completed" | "early-stopped" | "errored"
    metric: str
    last: float | None               # the metric's last reported value
    best: float | None               # its best value over the trial
    iterations: int                  # validations reported
    checkpoint: str | None           # the trial's best (else newest) committed checkpoint
    run_dir: str
    metrics: dict = field(default_factory=dict)      # last reported metrics
    history: list[float] = field(default_factory=list)  # the metric at each report...
    history_iterations: list[int] = field(default_factory=list)  # ...and its training_iteration
    error: str | None = None
    restores: list[str] = field(default_factory=list)  # checkpoints it was restored from (PBT)


@dataclass
class SweepResult:
    trials: list[TrialResult]
    metric: str
    mode: str
    sweep_dir: str
    best: TrialResult | None = None

    def table(self):
        import pandas as pd
        rows = []
        for t in self.trials:
            row = {"trial_id": t.trial_id, "status": t.status, "iterations": t.iterations,
                   f"last_{self.metric}": t.last, f"best_{self.metric}": t.best}
            row.update({f"config/{k}": v for k, v in t.config.items()})
            row["checkpoint"] = t.checkpoint
            rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, path: str) -> str:
        """A PNG of every trial's metric per validation; early-stopped trials end in an x."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 5))
        for t in self.trials:
            if not t.history:
                continue
            # A PBT exploiter continues at the iteration of the donor's checkpoint: its curve
            # jumps there (ahead or back), as in Tune's own metrics_dataframe plots.
            xs = t.history_iterations or list(range(1, len(t.history) + 1))
            is_best = self.best is not None and t.trial_id == self.best.trial_id
            line, = ax.plot(xs, t.history, lw=2.5 if is_best else 1.2,
                            label=f"{t.trial_id} {_fmt_config(t.config)} ({t.status})" + (" best" if is_best else ""))
            if t.status == "early-stopped":
                ax.plot(xs[-1], t.history[-1], "x", color=line.get_color(), ms=9, mew=2)
        ax.set_xlabel("validation (Tune training_iteration)")
        ax.set_ylabel(self.metric)
        ax.set_title(f"sweep: {self.metric} ({self.mode}); x = stopped early")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for t in self.trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        lines = [f"sweep done: {len(self.trials)} trials ("
                 + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"); dir {self.sweep_dir}"]
        for t in sorted(self.trials, key=lambda t: _sort_key(t.best, self.mode)):
            cfg = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(t.config.items()))
            best = "-" if t.best is None else f"{t.best:.5g}"
            lines.append(f"  {t.trial_id:>14}  {t.status:<13} iters={t.iterations:<3} best {self.metric}={best:<9} {cfg}")
        if self.best is not None:
            lines.append(f"  best: {self.best.trial_id} {self.metric}={self.best.best:.5g} checkpoint={self.best.checkpoint}")
        lines.append(f"  every trial's logs: tensorboard --logdir {self.sweep_dir}")
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _sort_key(value: float | None, mode: str) -> float:
    if value is None or math.isnan(value):
        return math.inf
    return value if mode == "min" else -value


def build_sweep_result(grid, metric: str, mode: str, sweep_dir: str, storage_options,
                       completes_at: int | None = None) -> SweepResult:
    trials = []
    for r in grid:
        metrics = dict(r.metrics or {})
        trial_id = r.path.rstrip("/").rsplit("/", 1)[-1].removeprefix("trial_")  # see sweep._trial_dirname
        run_dir = f"{sweep_dir}/trial_{trial_id}"
        df = r.metrics_dataframe
        reported = df[df[metric].notna()] if df is not None and metric in df else None
        history = [] if reported is None else [float(x) for x in reported[metric]]
        history_iterations = ([] if reported is None or "training_iteration" not in reported
                              else [int(i) for i in reported["training_iteration"]])
        summary = read_trial_summary(run_dir, storage_options)
        iterations = int(metrics.get("training_iteration", len(history)))
        if r.error is not None:
            status = "errored"
        elif (summary and summary.get("completed")) or (completes_at and iterations >= completes_at):
            status = "completed"
        else:
            status = "early-stopped"
        checkpoint = (summary or {}).get("best_checkpoint") or None
        if checkpoint is None:  # stopped early: what its newest checkpoint recorded as best
            found = list_committed(f"{run_dir}/checkpoints", storage_options)
            latest = found[-1] if found else None
            checkpoint = (best_checkpoint_recorded_in(latest, storage_options) if latest else None) or latest
        best = (min(history) if mode == "min" else max(history)) if history else None
        trials.append(TrialResult(
            trial_id=trial_id, config=dict(r.config or {}), status=status, metric=metric,
            last=history[-1] if history else None, best=best, iterations=iterations,
            checkpoint=checkpoint, run_dir=run_dir, metrics=metrics, history=history,
            history_iterations=history_iterations,
            error=None if r.error is None else _error_text(r.error),
            restores=list((summary or {}).get("restores", []))))
    trials.sort(key=lambda t: t.trial_id)
    ranked = [t for t in trials if t.best is not None and not math.isnan(t.best)]
    best = min(ranked, key=lambda t: _sort_key(t.best, mode)) if ranked else None
    return SweepResult(trials=trials, metric=metric, mode=mode, sweep_dir=sweep_dir, best=best)


def _fmt_config(config: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(config.items()))


def _error_text(error: BaseException) -> str:
    """The root cause first (Ray wraps it in RayTaskError with the remote traceback above it)."""
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}"[-2000:]
