"""What ``self.log`` records, and how it is reduced.

Values are kept as detached device tensors and accumulated on the device; nothing is read back to
the host until someone asks (a logging step, an epoch end, a callback reading
``trainer.callback_metrics``). That keeps the step loop free of host-device syncs.

Naming follows Lightning: a metric logged with both ``on_step`` and ``on_epoch`` appears as
``{name}_step`` and ``{name}_epoch``, and ``{name}`` is the latest of the two.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from raytrainer.loop.sync import Logged, prime_empty_list_states, reduce_across_ranks

_STEP_NAMES = {"validate": "validation_step", "test": "test_step", "predict": "predict_step"}
REDUCE_FX = {"mean": "mean", "sum": "sum", "max": "max", "min": "min",
             torch.mean: "mean", torch.sum: "sum", torch.max: "max", torch.min: "min"}


@dataclass(frozen=True)
class MetricSpec:
    on_step: bool
    on_epoch: bool
    prog_bar: bool
    logger: bool
    reduce_fx: str                  # "mean" | "sum" | "max" | "min" | "metric" (a torchmetrics Metric)
    sync_dist: bool
    metric_path: str | None = None  # a Metric's attribute path in the module (every rank finds it)


class _MetricObject:
    """A torchmetrics ``Metric`` logged as the value, as Lightning allows: it accumulates itself
    (``self.acc(preds, y)`` or ``.update``); on step its value is the batch's (the metric's forward
    result); at the epoch's end its ``compute()`` — which syncs across ranks by itself — is the
    value, and it is reset."""

    reduce_fx = "metric"

    def __init__(self, metric):
        self.metric = metric

    def compute(self) -> torch.Tensor:
        value = self.metric.compute()
        self.metric.reset()
        return value

    def logged(self, name: str, spec: MetricSpec) -> Logged:
        return Logged(name, "metric", torch.zeros(()), 0.0, spec)

    # torchmetrics keeps its states out of the module's state_dict (persistent=False): a
    # checkpoint carries them here. Copies: torchmetrics updates its tensors in place.
    def state(self) -> dict:
        m = self.metric
        return {"states": {k: [t.clone() for t in v] if isinstance(v, list) else v.clone()
                           for k, v in ((k, getattr(m, k)) for k in m._defaults)},
                "update_count": m._update_count}

    def load_state(self, saved: dict, device: torch.device) -> None:
        for k, v in saved["states"].items():
            setattr(self.metric, k, [t.to(device) for t in v] if isinstance(v, list) else v.to(device))
        self.metric._update_count = saved["update_count"]


class _Accumulator:
    """Epoch reduction of one metric, on the value's device."""

    __slots__ = ("reduce_fx", "total", "weight")

    def __init__(self, reduce_fx: str):
        self.reduce_fx = reduce_fx
        self.total: torch.Tensor | None = None
        self.weight = 0.0

    def update(self, value: torch.Tensor, batch_size: int) -> None:
        v = value.float()
        if self.total is None:
            self.total = v * batch_size if self.reduce_fx == "mean" else v.clone()
        elif self.reduce_fx == "mean":
            self.total = self.total + v * batch_size
        elif self.reduce_fx == "sum":
            self.total = self.total + v
        elif self.reduce_fx == "max":
            self.total = torch.maximum(self.total, v)
        else:
            self.total = torch.minimum(self.total, v)
        self.weight += batch_size

    def compute(self) -> torch.Tensor:
        """This rank's value."""
        return self.total / self.weight if self.reduce_fx == "mean" else self.total

    def logged(self, name: str, spec) -> Logged:
        return Logged(name, self.reduce_fx, self.total, self.weight, spec)


class MetricCollector:
    """Collects ``self.log`` calls for one run; ``stage`` and ``in_step`` are set by the loop."""

    def __init__(self, ctx, module=None):
        self._ctx = ctx  # collectives for sync_dist (loop/sync.py)
        self._module = module  # where a logged torchmetrics Metric is found by its path
        self._world_size = ctx.world_size
        self.stage = "train"
        self.in_step = False
        self.batch_size = 1
        self.dataloader_idx: int | None = None  # while one of several eval loaders runs: "/dataloader_idx_N"
        self._specs: dict[tuple[str, str], MetricSpec] = {}
        self._resolved: dict[tuple[str, str], tuple] = {}     # (stage, name) -> (log args, spec)
        self._logger_names: dict[str, tuple[int, set[str]]] = {}  # stage -> (len(_specs), names)
        self._step_values: dict[str, torch.Tensor] = {}       # train, current step
        self._epoch: dict[str, dict[str, _Accumulator]] = {}  # stage -> name -> acc
        self._finalized: dict[str, torch.Tensor] = {}         # completed epoch values, by shown name
        self._step_only_objects: dict[str, Any] = {}          # torchmetrics logged with on_epoch=False
        self._eval_step_values: dict[str, torch.Tensor] = {}  # this evaluation batch's on_step values
        self._epoch_value_newer: set[str] = set()  # train names whose epoch value followed their last step
        self._loader_of: dict[tuple[str, str], int] = {}  # (stage, name) -> the eval loader it was logged in
        self.logged_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ recording
    def log(self, name: str, value: Any, *, prog_bar: bool, logger: bool, on_step: bool | None,
            on_epoch: bool | None, reduce_fx: Any, sync_dist: bool, batch_size: int | None,
            add_dataloader_idx: bool = True) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"self.log: the metric name must be a non-empty string, got {name!r}")
        if self.dataloader_idx is not None and add_dataloader_idx:
            name = f"{name}{_LOADER}{self.dataloader_idx}"
        training_step = self.stage == "train" and self.in_step
        # A metric is logged with the same arguments every step: its spec is resolved (and
        # checked against the first call's) once, then found by the arguments as given.
        args = (prog_bar, logger, on_step, on_epoch, reduce_fx, sync_dist, training_step)
        resolved = self._resolved.get((self.stage, name))
        if resolved is not None and resolved[0] == args:
            spec = resolved[1]
            if spec.reduce_fx == "metric":
                return self._log_metric_object(name, value, spec)
            # A 0-d tensor (the usual loss) needs no check; anything else goes through them.
            tensor = value.detach() if type(value) is torch.Tensor and value.ndim == 0 \
                else _as_scalar_tensor(name, value)
        else:
            if reduce_fx not in REDUCE_FX:
                raise ValueError(f"self.log({name!r}): reduce_fx must be one of 'mean', 'sum', 'max', "
                                 f"'min' (or torch.mean/sum/max/min), got {reduce_fx!r}")
            metric_object = _is_torchmetric(value)
            tensor = None if metric_object else _as_scalar_tensor(name, value)
            on_step = training_step if on_step is None else bool(on_step)
            on_epoch = (not training_step) if on_epoch is None else bool(on_epoch)
            spec = MetricSpec(on_step, on_epoch, prog_bar, logger, "metric" if metric_object else REDUCE_FX[reduce_fx],
                              sync_dist, self._path_of(value) if metric_object else None)
            known = self._specs.setdefault((self.stage, name), spec)
            if known != spec:
                raise ValueError(f"self.log({name!r}) was called with different arguments in the same "
                                 f"{self.stage} run: {known} then {spec}")
            self._resolved[(self.stage, name)] = (args, spec)
            if self.dataloader_idx is not None:
                self._loader_of[(self.stage, name)] = self.dataloader_idx
            if metric_object:
                return self._log_metric_object(name, value, spec)
        if spec.on_step:
            if self.stage == "train":
                self._step_values[name] = tensor
            else:  # to the loggers after this evaluation batch (eval_step_metrics), this rank's value
                self._eval_step_values[name] = tensor
        if spec.on_epoch:
            accs = self._epoch.setdefault(self.stage, {})
            acc = accs.get(name)
            if acc is None:
                acc = accs[name] = _Accumulator(spec.reduce_fx)
            acc.update(tensor, self.batch_size if batch_size is None else int(batch_size))

    def _log_metric_object(self, name: str, metric, spec: MetricSpec) -> None:
        if not _is_torchmetric(metric):
            raise ValueError(f"self.log({name!r}) was first called with a torchmetrics Metric, then with "
                             f"a {type(metric).__name__}; log one kind of value under one name")
        if spec.on_step:
            batch_value = getattr(metric, "_forward_cache", None)
            if not isinstance(batch_value, torch.Tensor):
                raise ValueError(f"self.log({name!r}, <{type(metric).__name__}>, on_step=True): call the metric on "
                                 "the batch first (self.metric(preds, target)), which computes the batch's value; "
                                 "update() alone has none")
            values = self._step_values if self.stage == "train" else self._eval_step_values
            values[name] = _as_scalar_tensor(name, batch_value)
        if spec.on_epoch:
            self._epoch.setdefault(self.stage, {})[name] = _MetricObject(metric)
        else:
            self._step_only_objects[name] = metric

    def _metric_at(self, name: str, spec: MetricSpec):
        if spec.metric_path is None:
            raise ValueError(f"self.log({name!r}, <Metric>): this rank evaluated no batch and cannot find the "
                             "metric to compute it with the others; make it an attribute of the module "
                             "(self.acc = Accuracy(...) in __init__)")
        return self._module.get_submodule(spec.metric_path)

    def _path_of(self, metric) -> str | None:
        modules = self._module.named_modules() if self._module is not None else ()
        return next((path for path, m in modules if m is metric), None)

    def start_epoch(self, stage: str) -> None:
        self._epoch[stage] = {}
        if stage == "train":
            self._step_values = {}
            self._epoch_value_newer = set()
            for metric in self._step_only_objects.values():  # logged on step only: one epoch's worth
                metric.reset()

    def clear_results(self) -> None:
        """After the sanity check: nothing of it stays (Lightning resets callback_metrics,
        logged_metrics and the progress bar's)."""
        self._finalized, self._step_values, self._eval_step_values = {}, {}, {}
        self._epoch_value_newer = set()
        self.logged_metrics = {}

    # ------------------------------------------------------------------ reading (host syncs)
    def step_metrics(self) -> dict[str, float]:
        """Current per-step training values for the loggers: one host sync for all of them.
        Every rank calls this at the same steps (sync_dist reductions are collectives)."""
        synced = {}
        if self._world_size > 1:  # always, when distributed: a rank may hold no synced value
            synced = reduce_across_ranks(self._ctx, [
                Logged(name, self._specs[("train", name)].reduce_fx, value, 1.0, self._specs[("train", name)])
                for name, value in self._step_values.items()
                if self._specs[("train", name)].sync_dist and self._specs[("train", name)].reduce_fx != "metric"],
                "in training_step")
        names, tensors = [], []
        for name, value in self._step_values.items():
            spec = self._specs[("train", name)]
            names.append(f"{name}_step" if spec.on_epoch else name)
            tensors.append(synced[name][0].float() if name in synced else value.float())
        if len(tensors) == 1:  # the usual single loss: .item() is the same sync, without a stack
            values = [tensors[0].item()]
        else:
            values = torch.stack(tensors).tolist() if tensors else []
        return dict(zip(names, values))

    def eval_step_metrics(self) -> dict[str, float]:
        """An evaluation batch's ``on_step`` values, as ``{name}_step`` for the loggers (Lightning
        logs them per batch; this rank's own values: a per-batch collective could not run with
        ranks evaluating different numbers of batches). Empty, and free, when none were logged."""
        if not self._eval_step_values:
            return {}
        names = [_shown(n, "_step") if self._specs[(self.stage, n)].on_epoch else n for n in self._eval_step_values]
        values = torch.stack([v.float() for v in self._eval_step_values.values()]).tolist()
        self._eval_step_values = {}
        return self.logger_filter(dict(zip(names, values)), self.stage)

    def end_epoch(self, stage: str) -> dict[str, float]:
        """Reduce ``stage``'s epoch accumulators (across ranks where ``sync_dist``, weighted by
        what each rank saw) and keep them as the latest values. Every rank must call this: with
        several ranks it is a collective, also on a rank that logged nothing."""
        accs = self._epoch.get(stage, {})
        synced = {}
        if self._world_size > 1:
            # Metric objects join the agreement (their names), not the reduction: they sync
            # themselves in compute(), which every rank must then call, in the same order.
            where = "in training" if stage == "train" else f"in {_STEP_NAMES.get(stage, stage)}"
            synced = reduce_across_ranks(self._ctx, [
                acc.logged(name, self._specs[(stage, name)]) for name, acc in accs.items()
                if self._specs[(stage, name)].sync_dist or acc.reduce_fx == "metric"], where)
            for name, (_, spec) in synced.items():  # a rank that saw no batch learns how they were logged
                self._specs.setdefault((stage, name), spec)
                if spec.reduce_fx == "metric" and name not in accs:
                    accs[name] = _MetricObject(self._metric_at(name, spec))
            prime_empty_list_states(self._ctx, [accs[name].metric for name in sorted(synced)
                                                if isinstance(accs.get(name), _MetricObject)])
        out_names, tensors = [], []
        for name in sorted(set(accs) | set(synced)):
            spec = self._specs[(stage, name)]
            out_names.append((name, _shown(name, "_epoch") if spec.on_step else name))
            value = synced[name][0] if synced.get(name, (None,))[0] is not None else accs[name].compute()
            tensors.append(_as_scalar_tensor(name, value).float().reshape(()).cpu())
        values = torch.stack(tensors) if tensors else torch.empty(0)
        result = {}
        for (name, shown), v in zip(out_names, values):
            self._finalized[shown] = v
            self._finalized[name] = v
            result[shown] = float(v)
            if stage == "train":
                self._epoch_value_newer.add(name)
        self._epoch[stage] = {}
        return result

    def per_loader(self, values: dict[str, float], stage: str, num_loaders: int) -> list[dict[str, float]]:
        """``validate()``/``test()``'s result: one dict per loader, each with the values logged
        while that loader ran and those logged outside the steps (Lightning)."""
        if num_loaders == 1:
            return [values]
        out: list[dict[str, float]] = [{} for _ in range(num_loaders)]
        for shown, value in values.items():
            loader = self._loader_of.get((stage, _logged_name(shown)))
            for i in range(num_loaders) if loader is None else (loader,):
                out[i][shown] = value
        return out

    def callback_metrics(self) -> dict[str, torch.Tensor]:
        """Latest value of every metric (as CPU tensors, as Lightning's callback_metrics)."""
        out = dict(self._finalized)
        for name, value in self._step_values.items():
            spec = self._specs[("train", name)]
            v = value.detach().float().cpu()
            out[f"{name}_step" if spec.on_epoch else name] = v
            if name not in self._epoch_value_newer:  # ``name`` is whichever of the two came last
                out[name] = v
        return out

    def progress_bar_metrics(self) -> dict[str, float]:
        shown = {n for (_, n), s in self._specs.items() if s.prog_bar}
        cm = self.callback_metrics()
        return {k: float(v) for k, v in cm.items() if k in shown or k.rsplit("_", 1)[0] in shown}

    def logger_names(self, stage: str) -> set[str]:
        # Read on every logging step; specs are only ever added, so their count says when the
        # set is stale (load_state_dict, which may replace specs, clears it).
        cached = self._logger_names.get(stage)
        if cached is None or cached[0] != len(self._specs):
            names = {n for (st, n), s in self._specs.items() if st == stage and s.logger}
            self._logger_names[stage] = cached = (len(self._specs), names)
        return cached[1]

    def logger_filter(self, values: dict[str, float], stage: str) -> dict[str, float]:
        """Drop metrics logged with ``logger=False``."""
        allowed = self.logger_names(stage)
        return {k: v for k, v in values.items()
                if k in allowed or _logged_name(k) in allowed}

    # ------------------------------------------------------------------ exact resume
    def state_dict(self) -> dict:
        """The training epoch's running aggregates (and logged torchmetrics objects' states), so a
        mid-epoch resume reports the same epoch values as an uninterrupted run."""
        train = self._epoch.get("train", {})
        return {"train": {n: {"total": a.total, "weight": a.weight, "reduce_fx": a.reduce_fx}
                          for n, a in train.items() if isinstance(a, _Accumulator) and a.total is not None},
                "objects": {n: a.state() for n, a in train.items() if isinstance(a, _MetricObject)},
                "specs": {f"{st}/{n}": [s.on_step, s.on_epoch, s.prog_bar, s.logger, s.reduce_fx, s.sync_dist,
                                        s.metric_path]
                          for (st, n), s in self._specs.items()},
                "finalized": dict(self._finalized)}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        accs = {}
        for n, d in state.get("train", {}).items():
            acc = _Accumulator(d["reduce_fx"])
            acc.total, acc.weight = d["total"].to(device), d["weight"]
            accs[n] = acc
        for key, fields in state.get("specs", {}).items():
            stage, name = key.split("/", 1)
            self._specs[(stage, name)] = MetricSpec(*fields)
        for n, saved in state.get("objects", {}).items():
            accs[n] = _MetricObject(self._metric_at(n, self._specs[("train", n)]))
            accs[n].load_state(saved, device)
        self._epoch["train"] = accs
        self._resolved.clear()
        self._logger_names.clear()
        self._finalized.update(state.get("finalized", {}))


_LOADER = "/dataloader_idx_"


def _shown(name: str, kind: str) -> str:
    """``name`` with ``_step``/``_epoch``, before a loader suffix: ``v_epoch/dataloader_idx_0``."""
    base, sep, idx = name.partition(_LOADER)
    return f"{base}{kind}{sep}{idx}"


def _logged_name(shown: str) -> str:
    """The name ``self.log`` was given (with its loader suffix) of a shown name."""
    base, sep, idx = shown.partition(_LOADER)
    return base.removesuffix("_step").removesuffix("_epoch") + sep + idx


def _is_torchmetric(value: Any) -> bool:
    """A torchmetrics ``Metric`` (duck-typed: torchmetrics is not a dependency)."""
    return isinstance(value, torch.nn.Module) and all(
        callable(getattr(value, attr, None)) for attr in ("update", "compute", "reset", "sync"))


def _as_scalar_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"self.log({name!r}): expected a scalar, got a tensor of shape "
                             f"{tuple(value.shape)}; reduce it first (e.g. .mean())")
        value = value.detach()
        return value if value.ndim == 0 else value.reshape(())  # a 0-d loss needs no new view
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if hasattr(value, "item") and callable(value.item):  # numpy scalars
            return torch.tensor(float(value.item()))
        raise ValueError(f"self.log({name!r}): expected a number or a scalar tensor, got "
                         f"{type(value).__name__}")
    return torch.tensor(float(value))
