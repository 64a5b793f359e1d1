"""The ``sweep:`` section of a ``raytrainer sweep`` config -> keyword arguments of ``rt.sweep``.

    sweep:
      search_space:                  # model init_args, trainer.<argument> or data.<argument>
        lr: {type: loguniform, lower: 1e-4, upper: 0.1}
        channels: {type: choice, values: [16, 32, 64]}
        data.batch_size: {type: grid_search, values: [32, 64]}
      metric: val_loss
      mode: min
      num_samples: 8
      scheduler: asha                # asha | pbt | fifo | {class_path: ..., init_args: {...}}

Each search-space entry becomes the rt.tune (Ray Tune) domain of that name; every other key is an
argument of ``rt.sweep`` (checked against its signature). Errors name the key and the file, as in
``raytrainer.cli.main``.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any

import raytrainer as rt
from raytrainer.cli.config_files import Origins
from raytrainer.cli.objects import SCIENTIFIC, build_objects, trainer_arguments

# sweep.scheduler / sweep.search_alg may also be {class_path, init_args} of a Tune class.
TUNE_BASES = {"scheduler": ("ray.tune.schedulers", ("TrialScheduler",)),
              "search_alg": ("ray.tune.search", ("Searcher", "SearchAlgorithm"))}
SCHEDULERS = ("asha", "pbt", "fifo")
SEARCH_TYPES = ("uniform", "quniform", "loguniform", "qloguniform", "randn", "qrandn", "randint",
                "qrandint", "lograndint", "qlograndint", "choice", "grid_search")


def search_domain(spec: Any, path: tuple, origins: Origins) -> Any:
    """``{type: loguniform, lower: 1e-4, upper: 0.1}`` / ``{type: choice, values: [...]}`` -> an rt.tune domain."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise origins.error(path, "expected {type: loguniform, lower: ..., upper: ...} or "
                                  f"{{type: choice, values: [...]}}, got {spec!r}")
    kind, args = spec["type"], {k: v for k, v in spec.items() if k != "type"}
    if kind not in SEARCH_TYPES:
        raise origins.error(path + ("type",), f"unknown search-space type {kind!r}; valid: {', '.join(SEARCH_TYPES)}")
    builder = getattr(rt.tune, kind)  # Tune's own helpers; building a domain starts nothing
    if kind in ("choice", "grid_search"):
        if list(args) != ["values"] or not isinstance(args["values"], list) or not args["values"]:
            raise origins.error(path, f"type {kind} takes one key, values: a non-empty list")
        return builder(args["values"])
    accepted = list(inspect.signature(builder).parameters)
    for key, value in args.items():
        if key not in accepted:
            raise origins.error(path + (key,), f"type {kind} does not take {key!r}; it takes: {', '.join(accepted)}")
        if isinstance(value, str) and SCIENTIFIC.match(value):
            args[key] = spec[key] = float(value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise origins.error(path + (key,), f"expected a number, got {value!r}")
    try:
        return builder(**args)
    except Exception as e:
        raise origins.error(path, f"{kind}({', '.join(f'{k}={v!r}' for k, v in args.items())}) is invalid: "
                                  f"{type(e).__name__}: {e}") from None


def _check_search_key(name: str, path: tuple, origins: Origins, model_class: type, data_class: type | None) -> None:
    """A search-space key is a model init argument, ``trainer.<argument>`` or ``data.<argument>``
    (as rt.sweep routes a trial's config)."""
    section, _, arg = name.rpartition(".")
    if section == "trainer":
        owner, params = "Trainer", trainer_arguments()
    elif section == "data" and data_class is not None:
        owner, params = data_class.__qualname__, inspect.signature(data_class).parameters
    elif section:
        raise origins.error(path, "expected a model init argument, trainer.<argument> or data.<argument> "
                                  "(with a data: section)")
    else:
        owner, params = model_class.__qualname__, inspect.signature(model_class).parameters
    if arg not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise origins.error(path, f"{owner} has no init argument {arg!r}; it accepts: {', '.join(params)}")


def sweep_arguments() -> dict[str, Any]:
    """rt.sweep's arguments after (module, data, trainer) -> default (Parameter.empty if required)."""
    params = list(inspect.signature(rt.sweep).parameters.values())[3:]
    return {p.name: p.default for p in params}


def parse_sweep(section: Any, origins: Origins, model_class: type, data_class: type | None = None) -> dict:
    """The ``sweep:`` section -> rt.sweep keyword arguments (search-space entries become Tune domains)."""
    path = ("sweep",)
    if not isinstance(section, dict):
        raise origins.error(path, f"expected a mapping, got {section!r}")
    valid = sweep_arguments()
    for key in section:
        if key not in valid:
            raise origins.error(path + (key,), f"unknown sweep argument {key!r}; valid: {', '.join(valid)}")
    missing = [k for k, d in valid.items() if d is inspect.Parameter.empty and k not in section]
    if missing:
        raise origins.error(path, f"missing {', '.join(missing)}")
    kwargs, space = dict(section), section["search_space"]
    if not isinstance(space, dict) or not space:
        raise origins.error(path + ("search_space",), "expected a mapping of argument names to {type: ...} specs")
    for name, spec in space.items():
        _check_search_key(name, path + ("search_space", name), origins, model_class, data_class)
    kwargs["search_space"] = {n: search_domain(s, path + ("search_space", n), origins) for n, s in space.items()}
    if not isinstance(section["metric"], str) or not section["metric"]:
        raise origins.error(path + ("metric",), f"expected a logged metric name, got {section['metric']!r}")
    if section.get("mode", "min") not in ("min", "max"):
        raise origins.error(path + ("mode",), f"expected 'min' or 'max', got {section['mode']!r}")
    n = section.get("num_samples", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise origins.error(path + ("num_samples",), f"expected an int >= 1, got {n!r}")
    if isinstance(section.get("scheduler"), str) and section["scheduler"] not in SCHEDULERS:
        raise origins.error(path + ("scheduler",), f"expected one of {', '.join(SCHEDULERS)} or "
                                                   f"{{class_path, init_args}}, got {section['scheduler']!r}")
    for key, (module_name, base_names) in TUNE_BASES.items():
        if isinstance(kwargs.get(key), dict):
            bases = tuple(getattr(importlib.import_module(module_name), b) for b in base_names)
            kwargs[key] = build_objects(kwargs[key], path + (key,), origins, bases)[0]
    return kwargs


class ModuleFactory:
    """Builds one trial's model: the config's fixed init_args, then the trial's sampled values.
    Callable as ``factory(config)`` or ``factory(**config)``; picklable (Tune ships it to trials)."""

    def __init__(self, cls: type, fixed: dict):
        self.cls, self.fixed = cls, dict(fixed)
        self.__name__, self.__qualname__ = cls.__name__, cls.__qualname__

    def __call__(self, config: dict | None = None, /, **sampled: Any) -> Any:
        # a trial config's trainer.*/data.* keys are rt.sweep's, not the model's
        sampled = {k: v for k, v in {**(config or {}), **sampled}.items() if "." not in k}
        return self.cls(**{**self.fixed, **sampled})

    def __repr__(self) -> str:
        return f"ModuleFactory({self.cls.__qualname__}, {self.fixed!r})"
