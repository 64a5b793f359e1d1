"""TrainerConfig: every Trainer argument, validated once, frozen.

Errors name the argument, the value given, and what is allowed, and are raised in
``Trainer.__init__`` — before any data is loaded or any cluster is started.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

from raytrainer.checkpoint_writer import RetryPolicy
from raytrainer.precision import normalize_precision

ACCELERATORS = ("cpu", "gpu", "auto")
STRATEGIES = ("ddp", "fsdp", "fsdp_sharded", "auto")
LAUNCHERS = ("ray", "local")
CLIP_ALGORITHMS = ("norm", "value")
DEFAULT_STORAGE_PATH = "./raytrainer_runs"
DEFAULT_MAX_EPOCHS = 1000  # Lightning's default when neither max_epochs nor max_steps is set


class ConfigError(ValueError):
    """A Trainer/sweep argument is invalid. The message names the argument and the fix."""


@dataclass(frozen=True)
class TrainerConfig:
    max_epochs: int = -1
    max_steps: int = -1
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "ddp"  # "ddp" | "fsdp" | "fsdp_sharded" (an rt.FSDPStrategy arrives as its name)
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    val_check_interval: float | int = 1.0
    check_val_every_n_epoch: int | None = 1
    log_every_n_steps: int = 50
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    limit_test_batches: int | float | None = None
    limit_predict_batches: int | float | None = None
    fast_dev_run: int = 0
    enable_progress_bar: bool = True
    enable_checkpointing: bool = True
    async_checkpoint: bool = True
    checkpoint_retry: RetryPolicy = RetryPolicy()
    seed: int | None = None
    deterministic: bool = False
    storage_path: str = DEFAULT_STORAGE_PATH
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""
    launcher: str = "ray"
    max_failures: int = 0
    resources_per_worker: Mapping[str, float] | None = None
    profiler: Any = None  # None | "simple" | "pytorch" | a raytrainer.profiler.SimpleProfiler

    @property
    def run_dir(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    def replace(self, **changes: Any) -> "TrainerConfig":
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        """The resolved values, for the start-of-run printout (never storage_options: secrets)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.pop("storage_options")
        return d


def _fail(arg: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"Trainer({arg}={value!r}) is invalid: {allowed}")


def _int(arg: str, value: Any, minimum: int, allowed: str | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise _fail(arg, value, allowed or f"expected an int >= {minimum}")
    return int(value)


def _choice(arg: str, value: Any, choices: tuple) -> str:
    if value not in choices:
        raise _fail(arg, value, f"expected one of {list(choices)}")
    return value


def _limit(arg: str, value: Any) -> int | float | None:
    """None (all batches), an int count >= 0, or a float fraction in [0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise _fail(arg, value, "expected None, an int number of batches >= 0, or a float in [0.0, 1.0]")
    if isinstance(value, numbers.Integral) and value >= 0:
        return int(value)
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return 1.0 if value == 1.0 else value
    raise _fail(arg, value, "expected None, an int number of batches >= 0, or a float in [0.0, 1.0]")


def _retry_policy(value: Any) -> RetryPolicy:
    """How often a checkpoint write is retried: None (the default RetryPolicy), a RetryPolicy, or
    a dict of its fields (what a YAML config gives), e.g. {'attempts': 3, 'base_delay_s': 0.1}."""
    if value is None:
        return RetryPolicy()
    allowed = ("expected None, a raytrainer.checkpoint_writer.RetryPolicy or a dict with keys attempts "
               "(int >= 1), base_delay_s and max_delay_s (numbers >= 0)")
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"attempts", "base_delay_s", "max_delay_s"})
        if unknown:
            raise _fail("checkpoint_retry", value, f"unknown keys {unknown}; " + allowed)
        value = RetryPolicy(**value)
    if not isinstance(value, RetryPolicy):
        raise _fail("checkpoint_retry", value, allowed)
    delays = (value.base_delay_s, value.max_delay_s)
    if isinstance(value.attempts, bool) or not isinstance(value.attempts, numbers.Integral) or value.attempts < 1 \
            or any(isinstance(d, bool) or not isinstance(d, numbers.Real) or d < 0 for d in delays):
        raise _fail("checkpoint_retry", value, allowed)
    return value


def _strategy(value: Any) -> str:
    """A strategy name; ``rt.FSDPStrategy(state_dict_type=...)`` becomes "fsdp" or "fsdp_sharded"
    (plain strings pickle to Ray workers and print in the resolved config)."""
    from raytrainer.strategy import FSDPStrategy
    if isinstance(value, FSDPStrategy):
        return value.name
    if not isinstance(value, str) or value not in STRATEGIES:
        raise _fail("strategy", value, f"expected one of {list(STRATEGIES)} or "
                                       "rt.FSDPStrategy(state_dict_type='full' | 'sharded')")
    return "ddp" if value == "auto" else value


def _profiler(value: Any) -> Any:
    from raytrainer.profiler import PROFILERS, SimpleProfiler
    if value is None or isinstance(value, SimpleProfiler) or (isinstance(value, str) and value in PROFILERS):
        return value
    raise _fail("profiler", value, f"expected None, one of {list(PROFILERS)}, or a "
                                   "raytrainer.profiler.SimpleProfiler / PyTorchProfiler instance")


def build_config(**kw: Any) -> TrainerConfig:
    """Validate raw Trainer arguments into a TrainerConfig."""
    max_steps = _int("max_steps", kw.get("max_steps", -1), -1, "expected -1 (no limit) or an int >= 1")
    if max_steps == 0:
        raise _fail("max_steps", 0, "expected -1 (no limit) or an int >= 1")
    max_epochs = kw.get("max_epochs")
    if max_epochs is None:
        max_epochs = DEFAULT_MAX_EPOCHS if max_steps == -1 else -1
    max_epochs = _int("max_epochs", max_epochs, -1, "expected None, -1 (no limit) or an int >= 1")
    if max_epochs == 0:
        raise _fail("max_epochs", 0, "expected None, -1 (no limit) or an int >= 1")
    if max_epochs == -1 and max_steps == -1:
        raise ConfigError("Trainer(max_epochs=-1, max_steps=-1) would train forever: set one of them")

    accelerator = _choice("accelerator", kw.get("accelerator", "auto"), ACCELERATORS)
    devices = kw.get("devices", 1)
    if devices != "auto":
        devices = _int("devices", devices, 1, "expected 'auto' or an int >= 1 (the number of training workers)")
    strategy = _strategy(kw.get("strategy", "ddp"))
    try:
        precision = normalize_precision(kw.get("precision", "32-true"))
    except ValueError as e:
        raise ConfigError(f"Trainer(precision=...): {e}") from None

    accumulate = _int("accumulate_grad_batches", kw.get("accumulate_grad_batches", 1), 1)
    clip_val = kw.get("gradient_clip_val")
    if clip_val is not None:
        if isinstance(clip_val, bool) or not isinstance(clip_val, numbers.Real) or clip_val < 0:
            raise _fail("gradient_clip_val", clip_val, "expected None or a number >= 0")
        clip_val = float(clip_val) or None  # 0 means off, as in Lightning
    clip_alg = _choice("gradient_clip_algorithm", kw.get("gradient_clip_algorithm", "norm"), CLIP_ALGORITHMS)

    vci = kw.get("val_check_interval", 1.0)
    if vci is None:
        vci = 1.0
    if isinstance(vci, bool) or not (
            (isinstance(vci, numbers.Integral) and vci >= 1) or (isinstance(vci, float) and 0.0 < vci <= 1.0)):
        raise _fail("val_check_interval", vci, "expected a float in (0.0, 1.0] (fraction of an epoch) "
                                               "or an int >= 1 (every N training batches)")
    cve = kw.get("check_val_every_n_epoch", 1)
    if cve is not None:
        cve = _int("check_val_every_n_epoch", cve, 1, "expected None or an int >= 1")
    log_every = _int("log_every_n_steps", kw.get("log_every_n_steps", 50), 1)

    fdr = kw.get("fast_dev_run", False)
    if isinstance(fdr, bool):
        fdr = 1 if fdr else 0
    else:
        fdr = _int("fast_dev_run", fdr, 0, "expected a bool or an int >= 0 (batches per stage)")

    for arg in ("enable_progress_bar", "enable_checkpointing", "async_checkpoint", "deterministic"):
        if not isinstance(kw.get(arg, True), bool):
            raise _fail(arg, kw[arg], "expected True or False")
    checkpoint_retry = _retry_policy(kw.get("checkpoint_retry"))
    seed = kw.get("seed")
    if seed is not None:
        seed = _int("seed", seed, 0, "expected None or an int >= 0")

    storage_path = kw.get("storage_path") or DEFAULT_STORAGE_PATH
    if not isinstance(storage_path, str):
        storage_path = str(storage_path) if hasattr(storage_path, "__fspath__") else storage_path
    if not isinstance(storage_path, str) or not storage_path.strip():
        raise _fail("storage_path", kw.get("storage_path"), "expected a local path or an fsspec URI such as s3://bucket/prefix")
    storage_options = kw.get("storage_options") or {}
    if not isinstance(storage_options, Mapping):
        raise ConfigError("Trainer(storage_options=...) is invalid: expected a dict of fsspec "
                          "filesystem options (e.g. {'endpoint_url': ...})")
    name = kw.get("name")
    if name is None:
        name = _dt.datetime.now().strftime("run-%Y%m%d-%H%M%S-%f")
    if not isinstance(name, str) or not name or "/" in name or name.strip() != name or name in (".", ".."):
        raise _fail("name", name, "expected a non-empty run name without '/' or surrounding spaces")

    launcher = _choice("launcher", kw.get("launcher", "ray"), LAUNCHERS)
    max_failures = _int("max_failures", kw.get("max_failures", 0), -1, "expected -1 (unlimited) or an int >= 0")
    rpw = kw.get("resources_per_worker")
    if rpw is not None:
        if not isinstance(rpw, Mapping) or not all(
                isinstance(k, str) and isinstance(v, numbers.Real) and not isinstance(v, bool) and v >= 0
                for k, v in rpw.items()):
            raise _fail("resources_per_worker", rpw, "expected None or a dict like {'CPU': 1, 'GPU': 0.5}")
        rpw = dict(rpw)

    if launcher == "local":
        if devices not in (1, "auto"):
            raise ConfigError(f"Trainer(launcher='local', devices={devices!r}): the local launcher runs "
                              "one process on one device; use launcher='ray' for several workers")
        devices = 1
        if max_failures:
            raise ConfigError("Trainer(launcher='local', max_failures=...): worker restarts need "
                              "launcher='ray'; resume a local run with fit(..., ckpt_path='last')")

    return TrainerConfig(
        max_epochs=max_epochs, max_steps=max_steps, accelerator=accelerator, devices=devices,
        strategy=strategy, precision=precision, accumulate_grad_batches=accumulate,
        gradient_clip_val=clip_val, gradient_clip_algorithm=clip_alg, val_check_interval=vci,
        check_val_every_n_epoch=cve, log_every_n_steps=log_every,
        limit_train_batches=_limit("limit_train_batches", kw.get("limit_train_batches")),
        limit_val_batches=_limit("limit_val_batches", kw.get("limit_val_batches")),
        limit_test_batches=_limit("limit_test_batches", kw.get("limit_test_batches")),
        limit_predict_batches=_limit("limit_predict_batches", kw.get("limit_predict_batches")),
        fast_dev_run=fdr, enable_progress_bar=kw.get("enable_progress_bar", True),
        enable_checkpointing=kw.get("enable_checkpointing", True),
        async_checkpoint=kw.get("async_checkpoint", True), checkpoint_retry=checkpoint_retry, seed=seed,
        deterministic=kw.get("deterministic", False), storage_path=storage_path,
        storage_options=dict(storage_options), name=name, launcher=launcher,
        max_failures=max_failures, resources_per_worker=rpw, profiler=_profiler(kw.get("profiler")),
    )
