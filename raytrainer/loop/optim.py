"""Parse every return form of ``configure_optimizers`` into optimizers + scheduler configs.

Accepted, as in Lightning: an optimizer; a list/tuple of optimizers; ``(optimizers, schedulers)``
(two lists); a dict ``{"optimizer": opt, "lr_scheduler": sched | {...}, "monitor": ...}``; or a
list/tuple of such dicts. A scheduler config dict holds ``scheduler``, ``interval`` ("step" |
"epoch"), ``frequency``, ``monitor`` (required for ReduceLROnPlateau), ``strict``, ``name``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer

try:  # torch >= 2.0 names it LRScheduler; ReduceLROnPlateau subclasses it from 2.2 on
    from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
except ImportError:  # pragma: no cover
    from torch.optim.lr_scheduler import _LRScheduler as LRScheduler, ReduceLROnPlateau

_SCHED_KEYS = {"scheduler", "interval", "frequency", "monitor", "strict", "name"}
_HELP = ("configure_optimizers() must return an optimizer, a list of optimizers, "
         "(optimizers, schedulers), a dict {'optimizer': ..., 'lr_scheduler': ...}, or a list of such dicts")


@dataclass
class SchedulerConfig:
    scheduler: Any
    interval: str = "epoch"
    frequency: int = 1
    monitor: str | None = None
    strict: bool = True
    name: str | None = None

    @property
    def is_plateau(self) -> bool:
        return isinstance(self.scheduler, ReduceLROnPlateau)


def parse_optimizers(returned: Any) -> tuple[list[Optimizer], list[SchedulerConfig]]:
    if returned is None:
        raise TypeError(f"configure_optimizers() returned None. {_HELP}")
    if isinstance(returned, Optimizer):
        return [returned], []
    if isinstance(returned, dict):
        return _parse_dicts([returned])
    if isinstance(returned, (list, tuple)):
        items = list(returned)
        if not items:
            raise TypeError(f"configure_optimizers() returned an empty {type(returned).__name__}. {_HELP}")
        if all(isinstance(o, Optimizer) for o in items):
            return items, []
        if all(isinstance(o, dict) for o in items):
            return _parse_dicts(items)
        if len(items) == 2 and isinstance(items[0], (list, tuple)):
            opts = list(items[0])
            scheds = items[1] if isinstance(items[1], (list, tuple)) else [items[1]]
            _check_optimizers(opts)
            return opts, [_sched_config(s, None) for s in scheds]
    raise TypeError(f"configure_optimizers() returned {type(returned).__name__}: {returned!r:.200}. {_HELP}")


def _parse_dicts(dicts: list[dict]) -> tuple[list[Optimizer], list[SchedulerConfig]]:
    opts, scheds = [], []
    for d in dicts:
        unknown = set(d) - {"optimizer", "lr_scheduler", "monitor"}
        if unknown:
            raise TypeError(f"configure_optimizers() dict has unknown keys {sorted(unknown)}; "
                            "allowed: 'optimizer', 'lr_scheduler', 'monitor'")
        if "optimizer" not in d:
            raise TypeError(f"configure_optimizers() dict has no 'optimizer' key. {_HELP}")
        _check_optimizers([d["optimizer"]])
        opts.append(d["optimizer"])
        if d.get("lr_scheduler") is not None:
            scheds.append(_sched_config(d["lr_scheduler"], d.get("monitor")))
    return opts, scheds


def _check_optimizers(opts: list) -> None:
    for o in opts:
        if not isinstance(o, Optimizer):
            raise TypeError(f"configure_optimizers() returned {type(o).__name__} where a "
                            f"torch.optim.Optimizer was expected. {_HELP}")


def _sched_config(s: Any, monitor: str | None) -> SchedulerConfig:
    if isinstance(s, dict):
        unknown = set(s) - _SCHED_KEYS
        if unknown:
            raise TypeError(f"lr_scheduler config has unknown keys {sorted(unknown)}; allowed: {sorted(_SCHED_KEYS)}")
        if "scheduler" not in s:
            raise TypeError("lr_scheduler config dict needs a 'scheduler' key")
        cfg = SchedulerConfig(**{"monitor": monitor, **s})
    else:
        cfg = SchedulerConfig(scheduler=s, monitor=monitor)
    if not isinstance(cfg.scheduler, (LRScheduler, ReduceLROnPlateau)):
        raise TypeError(f"lr_scheduler {type(cfg.scheduler).__name__} is not a torch LR scheduler")
    if cfg.interval not in ("step", "epoch"):
        raise ValueError(f"lr_scheduler interval={cfg.interval!r} is invalid: expected 'step' or 'epoch'")
    if isinstance(cfg.frequency, bool) or not isinstance(cfg.frequency, int) or cfg.frequency < 1:
        raise ValueError(f"lr_scheduler frequency={cfg.frequency!r} is invalid: expected an int >= 1")
    if cfg.is_plateau and not cfg.monitor:
        raise ValueError("ReduceLROnPlateau needs a metric: return {'optimizer': opt, 'lr_scheduler': "
                         "{'scheduler': sched, 'monitor': 'val_loss'}} from configure_optimizers()")
    return cfg


class OptimizerHandle:
    """What ``self.optimizers()`` returns and ``optimizer_step`` receives (Lightning's
    LightningOptimizer): an instance of the optimizer's own class (``isinstance(opt, torch.optim.SGD)``
    holds) sharing its state, whose ``step(closure)`` goes through the run: the precision plugin
    (GradScaler), ``on_before_optimizer_step``, gradient clipping, and in manual optimization one
    global step per call."""

    def __init__(self, optimizer: Optimizer, run):
        # The same __dict__ entries (param_groups, state, defaults, hooks) as the optimizer: what
        # the user reads or changes through the handle (an LR warm-up) is the optimizer's.
        self.__dict__.update({k: v for k, v in optimizer.__dict__.items() if k not in ("step", "__del__")})
        self._optimizer = optimizer
        self._run = run
        self.__class__ = type(f"Lightning{type(optimizer).__name__}", (OptimizerHandle, type(optimizer)), {})

    @property
    def optimizer(self) -> Optimizer:
        return self._optimizer

    def step(self, closure=None, **kwargs: Any) -> Any:
        if closure is not None and not callable(closure):
            raise TypeError(f"optimizer.step(closure=...) expects a callable, got {type(closure).__name__}")
        return self._run.step_optimizer(self._optimizer, closure, **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self._optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._optimizer.load_state_dict(state_dict)
