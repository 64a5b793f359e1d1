"""LearningRateMonitor: log each optimizer's learning rate (and momentum, weight decay) to the
loggers, with Lightning's names, timing and steps (tests/callbacks/test_lr_monitor.py compares)."""
from __future__ import annotations

from collections import Counter

from raytrainer.callbacks.base import Callback


class LearningRateMonitor(Callback):
    """``logging_interval``: None (each optimizer when its scheduler steps: "step" schedulers at
    logging steps, "epoch" ones at epoch starts; optimizers without a scheduler at both), "step"
    or "epoch" (every optimizer then). Names: ``lr-{Optimizer}`` (or the scheduler config's
    ``name``), ``-1``, ``-2`` for further optimizers of a class, ``/pg1``… (or the group's
    ``name``) for several parameter groups, ``-momentum`` and ``-weight_decay`` suffixes."""

    def __init__(self, logging_interval: str | None = None, log_momentum: bool = False,
                 log_weight_decay: bool = False):
        if logging_interval not in (None, "step", "epoch"):
            raise ValueError(f"LearningRateMonitor(logging_interval={logging_interval!r}) is invalid: "
                             "expected None, 'step' or 'epoch'")
        self.logging_interval = logging_interval
        self.log_momentum = log_momentum
        self.log_weight_decay = log_weight_decay

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # before the step, on logging steps, at the loggers' step: the rate this step trains with
        if self.logging_interval != "epoch" and trainer.logs_this_step:
            self._emit(trainer, "step" if self.logging_interval is None else "any")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.logging_interval != "step":
            self._emit(trainer, "epoch" if self.logging_interval is None else "any")

    def _emit(self, trainer, interval: str) -> None:
        values: dict[str, float] = {}
        for optimizer, names, sched_interval in _named(trainer):
            if sched_interval is None or interval in ("any", sched_interval):
                values.update(self._stats(optimizer, names))
        if values:
            for lg in trainer.loggers:
                lg.log_metrics(values, trainer.logger_step)

    def _stats(self, optimizer, names: list[str]) -> dict[str, float]:
        out: dict[str, float] = {}
        use_betas = "betas" in optimizer.defaults
        for group, name in zip(optimizer.param_groups, names):
            out[name] = float(group["lr"])
            if self.log_momentum:
                out[f"{name}-momentum"] = float(group["betas"][0] if use_betas else group.get("momentum", 0))
            if self.log_weight_decay and "weight_decay" in group:
                out[f"{name}-weight_decay"] = float(group["weight_decay"])
        return out


def _named(trainer) -> list[tuple[object, list[str], str | None]]:
    """(optimizer, a name per parameter group, its scheduler's interval or None), schedulers'
    optimizers first: Lightning's naming order."""
    per_class: Counter = Counter()
    seen: set[int] = set()
    out = []
    for config in trainer.lr_scheduler_configs:
        optimizer = config.scheduler.optimizer
        if id(optimizer) in seen:
            continue
        seen.add(id(optimizer))
        if config.name is None:
            per_class[type(optimizer)] += 1
        out.append((optimizer, _group_names(config.name or f"lr-{type(optimizer).__name__}", optimizer, per_class),
                    config.interval))
    for optimizer in trainer.optimizers:
        if id(optimizer) not in seen:
            seen.add(id(optimizer))
            per_class[type(optimizer)] += 1
            out.append((optimizer, _group_names(f"lr-{type(optimizer).__name__}", optimizer, per_class), None))
    return out


def _group_names(name: str, optimizer, per_class: Counter) -> list[str]:
    count = per_class.get(type(optimizer), 0)
    if count > 1:
        name = f"{name}-{count - 1}"
    groups = optimizer.param_groups
    names = [f"{name}/{g.get('name', f'pg{i + 1}')}" if len(groups) > 1 else
             (f"{name}/{g['name']}" if g.get("name") else name) for i, g in enumerate(groups)]
    if len(set(names)) != len(names):
        raise ValueError(f"LearningRateMonitor: {type(optimizer).__name__} has parameter groups with the same "
                         f"name ({names}); give each group a unique 'name'")
    return names
