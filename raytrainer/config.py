"""TrainerConfig: every Trainer argument and its default, in one place; validated once, frozen.

``Trainer.__init__`` spells the same arguments out (its signature is the documentation users
read, with these defaults; a test checks that the two agree). Errors name the argument, the
value given, and what is allowed, and are raised in ``Trainer.__init__`` — before any data is
loaded or any cluster is started. After validation every field holds its resolved value
(``max_epochs=None`` -> 1000 or -1, ``precision=16`` -> "16-mixed", ``name=None`` -> a timestamp);
``given`` keeps the arguments as they were passed (a sweep builds each trial's Trainer from them).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

from raytrainer import storage
from raytrainer.callbacks.timer import parse_duration
from raytrainer.checkpoint.writer import RetryPolicy
from raytrainer.errors import ConfigError
from raytrainer.loop.precision import normalize_precision
from raytrainer.loop.strategy import FSDPStrategy
from raytrainer.profiler import check_profiler_spec

ACCELERATORS = ("cpu", "gpu", "auto")
STRATEGIES = ("ddp", "fsdp", "fsdp_sharded", "auto")
LAUNCHERS = ("ray", "local")
CLIP_ALGORITHMS = ("norm", "value")
DEFAULT_STORAGE_PATH = "./raytrainer_runs"
DEFAULT_MAX_EPOCHS = 1000  # Lightning's default when neither max_epochs nor max_steps is set


@dataclass(frozen=True)
class TrainerConfig:
    max_epochs: int | None = None   # None: 1000, or unlimited when max_steps is set (Lightning)
    max_steps: int = -1
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: Any = "ddp"           # "ddp" | "fsdp" | "fsdp_sharded" | rt.FSDPStrategy (kept as its name)
    precision: Any = "32-true"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None  # None: "norm" (what configure_gradient_clipping gets)
    val_check_interval: float | int | None = 1.0
    check_val_every_n_epoch: int | None = 1
    log_every_n_steps: int = 50
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    limit_test_batches: int | float | None = None
    limit_predict_batches: int | float | None = None
    fast_dev_run: bool | int = False
    enable_progress_bar: bool = True
    enable_checkpointing: bool = True
    async_checkpoint: bool = True
    checkpoint_retry: Any = None    # None: RetryPolicy(); a RetryPolicy; or a dict of its fields
    seed: int | None = None
    deterministic: bool = False
    use_distributed_sampler: bool = True  # False: every loader is used as given (shard it yourself)
    storage_path: str | None = None  # None: ./raytrainer_runs
    storage_options: Mapping[str, Any] | None = None
    name: str | None = None          # None: run-<timestamp>
    launcher: str = "ray"
    max_failures: int = 0
    resources_per_worker: Mapping[str, float] | None = None
    profiler: Any = None             # None | "simple" | "pytorch" | a raytrainer.profiler.SimpleProfiler
    # Lightning's, with its defaults
    default_root_dir: str | None = None  # Lightning's name for storage_path (give one of the two)
    num_nodes: int = 1               # workers = devices x num_nodes
    num_sanity_val_steps: int = 2    # validation batches per loader before training; -1: all
    min_epochs: int | None = None    # should_stop (EarlyStopping) waits until both are reached
    min_steps: int | None = None
    enable_model_summary: bool = True
    benchmark: bool | None = None    # torch.backends.cudnn.benchmark for the run (None: as it is)
    detect_anomaly: bool = False     # torch.autograd.set_detect_anomaly during training
    inference_mode: bool = True      # validate/test/predict under torch.inference_mode (else no_grad)
    sync_batchnorm: bool = False     # BatchNorm -> SyncBatchNorm with several GPU workers
    overfit_batches: int | float = 0.0  # the same N (or fraction of) train batches every epoch, unshuffled
    barebones: bool = False          # no loggers, checkpoints, progress bar, summary, sanity check
    enable_autolog_hparams: bool = True  # the module's hparams to the loggers at fit start
    max_time: Any = None             # "DD:HH:MM:SS" | timedelta | dict: a Timer stops training then
    reload_dataloaders_every_n_epochs: int = 0  # call the loader hooks again every N epochs (0: once)
    given: Mapping[str, Any] = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        for key, value in _resolve(**given).items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "given", given)

    @property
    def run_dir(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    def describe(self) -> dict[str, Any]:
        """The resolved values, for the start-of-run printout (never storage_options: secrets)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.init and f.name != "storage_options"}


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
    allowed = ("expected None, a raytrainer.checkpoint.writer.RetryPolicy or a dict with keys attempts "
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
    if isinstance(value, FSDPStrategy):
        return value.name
    if not isinstance(value, str) or value not in STRATEGIES:
        raise _fail("strategy", value, f"expected one of {list(STRATEGIES)} or "
                                       "rt.FSDPStrategy(state_dict_type='full' | 'sharded')")
    return "ddp" if value == "auto" else value


def _resolve(**kw: Any) -> dict[str, Any]:
    """Validate raw Trainer arguments; their resolved values by name."""
    max_steps = _int("max_steps", kw["max_steps"], -1, "expected -1 (no limit) or an int >= 1")
    if max_steps == 0:
        raise _fail("max_steps", 0, "expected -1 (no limit) or an int >= 1")
    try:
        max_time = parse_duration(kw["max_time"])
    except (TypeError, ValueError) as e:
        raise _fail("max_time", kw["max_time"], str(e).split(" is invalid: ")[-1]) from None
    max_epochs = kw["max_epochs"]
    if max_epochs is None:  # Lightning's: unlimited epochs when steps or time bound the fit
        max_epochs = DEFAULT_MAX_EPOCHS if max_steps == -1 and max_time is None else -1
    max_epochs = _int("max_epochs", max_epochs, -1, "expected None, -1 (no limit) or an int >= 1")
    if max_epochs == 0:
        raise _fail("max_epochs", 0, "expected None, -1 (no limit) or an int >= 1")
    if max_epochs == -1 and max_steps == -1 and max_time is None:
        raise ConfigError("Trainer(max_epochs=-1, max_steps=-1) would train forever: set one of them")

    accelerator = _choice("accelerator", kw["accelerator"], ACCELERATORS)
    devices = kw["devices"]
    if devices != "auto":
        devices = _int("devices", devices, 1, "expected 'auto' or an int >= 1 (the number of training workers)")
    strategy = _strategy(kw["strategy"])
    try:
        precision = normalize_precision(kw["precision"])
    except ValueError as e:
        raise ConfigError(f"Trainer(precision=...): {e}") from None

    accumulate = _int("accumulate_grad_batches", kw["accumulate_grad_batches"], 1)
    clip_val = kw["gradient_clip_val"]
    if clip_val is not None:
        if isinstance(clip_val, bool) or not isinstance(clip_val, numbers.Real) or clip_val < 0:
            raise _fail("gradient_clip_val", clip_val, "expected None or a number >= 0")
        clip_val = float(clip_val) or None  # 0 means off, as in Lightning
    clip_alg = kw["gradient_clip_algorithm"]
    if clip_alg is not None:
        clip_alg = _choice("gradient_clip_algorithm", clip_alg, CLIP_ALGORITHMS)

    vci = kw["val_check_interval"]
    if vci is None:
        vci = 1.0
    if isinstance(vci, bool) or not (
            (isinstance(vci, numbers.Integral) and vci >= 1) or (isinstance(vci, float) and 0.0 < vci <= 1.0)):
        raise _fail("val_check_interval", vci, "expected a float in (0.0, 1.0] (fraction of an epoch) "
                                               "or an int >= 1 (every N training batches)")
    cve = kw["check_val_every_n_epoch"]
    if cve is not None:
        cve = _int("check_val_every_n_epoch", cve, 1, "expected None or an int >= 1")
    log_every = _int("log_every_n_steps", kw["log_every_n_steps"], 1)

    fdr = kw["fast_dev_run"]
    if isinstance(fdr, bool):
        fdr = 1 if fdr else 0
    else:
        fdr = _int("fast_dev_run", fdr, 0, "expected a bool or an int >= 0 (batches per stage)")

    for arg in ("enable_progress_bar", "enable_checkpointing", "async_checkpoint", "deterministic",
                "use_distributed_sampler", "enable_model_summary", "detect_anomaly", "inference_mode",
                "sync_batchnorm", "barebones", "enable_autolog_hparams"):
        if not isinstance(kw[arg], bool):
            raise _fail(arg, kw[arg], "expected True or False")
    checkpoint_retry = _retry_policy(kw["checkpoint_retry"])
    seed = kw["seed"]
    if seed is not None:
        seed = _int("seed", seed, 0, "expected None or an int >= 0")

    root = kw["default_root_dir"]
    if root is not None and kw["storage_path"] is not None and str(root) != str(kw["storage_path"]):
        raise ConfigError(f"Trainer(default_root_dir={root!r}, storage_path={kw['storage_path']!r}): "
                          "default_root_dir is Lightning's name for storage_path; give one of them")
    storage_path = kw["storage_path"] or root or DEFAULT_STORAGE_PATH
    if not isinstance(storage_path, str):
        storage_path = str(storage_path) if hasattr(storage_path, "__fspath__") else storage_path
    if not isinstance(storage_path, str) or not storage_path.strip():
        raise _fail("storage_path", kw["storage_path"], "expected a local path or an fsspec URI such as s3://bucket/prefix")
    storage_options = kw["storage_options"] or {}
    if not isinstance(storage_options, Mapping):
        raise ConfigError("Trainer(storage_options=...) is invalid: expected a dict of fsspec "
                          "filesystem options (e.g. {'endpoint_url': ...})")
    name = kw["name"]
    if name is None:
        name = _dt.datetime.now().strftime("run-%Y%m%d-%H%M%S-%f")
    if not isinstance(name, str) or not name or "/" in name or name.strip() != name or name in (".", ".."):
        raise _fail("name", name, "expected a non-empty run name without '/' or surrounding spaces")

    lightning = _lightning_args(kw)
    launcher = _choice("launcher", kw["launcher"], LAUNCHERS)
    max_failures = _int("max_failures", kw["max_failures"], -1, "expected -1 (unlimited) or an int >= 0")
    rpw = kw["resources_per_worker"]
    if rpw is not None:
        if not isinstance(rpw, Mapping) or not all(
                isinstance(k, str) and isinstance(v, numbers.Real) and not isinstance(v, bool) and v >= 0
                for k, v in rpw.items()):
            raise _fail("resources_per_worker", rpw, "expected None or a dict like {'CPU': 1, 'GPU': 0.5}")
        rpw = dict(rpw)

    if launcher == "local":
        if lightning["num_nodes"] != 1:
            raise ConfigError(f"Trainer(launcher='local', num_nodes={lightning['num_nodes']}): several nodes "
                              "need launcher='ray'")
        if devices not in (1, "auto"):
            raise ConfigError(f"Trainer(launcher='local', devices={devices!r}): the local launcher runs "
                              "one process on one device; use launcher='ray' for several workers")
        devices = 1
        if max_failures:
            raise ConfigError("Trainer(launcher='local', max_failures=...): worker restarts need "
                              "launcher='ray'; resume a local run with fit(..., ckpt_path='last')")

    resolved = dict(
        max_epochs=max_epochs, max_steps=max_steps, accelerator=accelerator, devices=devices,
        strategy=strategy, precision=precision, accumulate_grad_batches=accumulate,
        gradient_clip_val=clip_val, gradient_clip_algorithm=clip_alg, val_check_interval=vci,
        check_val_every_n_epoch=cve, log_every_n_steps=log_every,
        limit_train_batches=_limit("limit_train_batches", kw["limit_train_batches"]),
        limit_val_batches=_limit("limit_val_batches", kw["limit_val_batches"]),
        limit_test_batches=_limit("limit_test_batches", kw["limit_test_batches"]),
        limit_predict_batches=_limit("limit_predict_batches", kw["limit_predict_batches"]),
        fast_dev_run=fdr, enable_progress_bar=kw["enable_progress_bar"],
        enable_checkpointing=kw["enable_checkpointing"],
        async_checkpoint=kw["async_checkpoint"], checkpoint_retry=checkpoint_retry, seed=seed,
        deterministic=kw["deterministic"], use_distributed_sampler=kw["use_distributed_sampler"],
        storage_path=storage.normalize(storage_path),
        storage_options=dict(storage_options), name=name, launcher=launcher,
        max_failures=max_failures, resources_per_worker=rpw, profiler=check_profiler_spec(kw["profiler"]),
        default_root_dir=storage.normalize(storage_path), max_time=max_time, **lightning,
    )
    if lightning["barebones"]:
        _barebones(kw, resolved)
    if lightning["overfit_batches"]:
        # Lightning: the first N train batches every epoch (the train loader is not shuffled) and
        # N validation batches.
        resolved.update(limit_train_batches=lightning["overfit_batches"], limit_val_batches=lightning["overfit_batches"])
    if fdr:
        # Lightning's fast_dev_run: n batches of each stage, one epoch, nothing written.
        resolved.update(max_epochs=1, max_steps=fdr, limit_train_batches=fdr, limit_val_batches=fdr,
                        limit_test_batches=fdr, limit_predict_batches=fdr, val_check_interval=1.0,
                        check_val_every_n_epoch=1, enable_checkpointing=False, num_sanity_val_steps=0)
    return resolved


def _lightning_args(kw: dict) -> dict[str, Any]:
    num_nodes = _int("num_nodes", kw["num_nodes"], 1)
    sanity = _int("num_sanity_val_steps", kw["num_sanity_val_steps"], -1, "expected -1 (all batches) or an int >= 0")
    min_epochs, min_steps = kw["min_epochs"], kw["min_steps"]
    if min_epochs is not None:
        min_epochs = _int("min_epochs", min_epochs, 0, "expected None or an int >= 0")
    if min_steps is not None:
        min_steps = _int("min_steps", min_steps, 0, "expected None or an int >= 0")
    benchmark = kw["benchmark"]
    if benchmark is not None and not isinstance(benchmark, bool):
        raise _fail("benchmark", benchmark, "expected None, True or False")
    if benchmark and kw["deterministic"]:
        raise ConfigError("Trainer(benchmark=True, deterministic=True): cudnn's benchmark mode picks "
                          "algorithms by timing, which is not deterministic; choose one")
    overfit = kw["overfit_batches"]
    if isinstance(overfit, bool) or not isinstance(overfit, numbers.Real) or overfit < 0 or \
            (isinstance(overfit, float) and overfit > 1.0):
        raise _fail("overfit_batches", overfit, "expected an int >= 0 (batches) or a float in [0.0, 1.0]")
    reload = _int("reload_dataloaders_every_n_epochs", kw["reload_dataloaders_every_n_epochs"], 0)
    return dict(num_nodes=num_nodes, num_sanity_val_steps=sanity, min_epochs=min_epochs, min_steps=min_steps,
                reload_dataloaders_every_n_epochs=reload,
                enable_model_summary=kw["enable_model_summary"], benchmark=benchmark,
                detect_anomaly=kw["detect_anomaly"], inference_mode=kw["inference_mode"],
                sync_batchnorm=kw["sync_batchnorm"], overfit_batches=overfit, barebones=kw["barebones"],
                enable_autolog_hparams=kw["enable_autolog_hparams"])


def _barebones(kw: dict, resolved: dict) -> None:
    """Lightning's barebones: everything besides the loop that costs time is off (checkpoints,
    progress bar, model summary, sanity check, loggers); asking for one of the optional ones as
    well is a contradiction, refused as Lightning does."""
    conflicts = [arg for arg, off in (("detect_anomaly", False), ("profiler", None)) if kw[arg] != off]
    if kw["num_sanity_val_steps"] not in (0, 2):
        conflicts.append("num_sanity_val_steps")
    if conflicts:
        raise ConfigError(f"Trainer(barebones=True) turns off checkpoints, progress bar, model summary, "
                          f"sanity check, loggers, anomaly detection and profiling: drop {', '.join(conflicts)}")
    resolved.update(enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0)
