"""Which Ray a run uses, and the settings it runs with.

Embedded local Ray when none is running and ``RAY_ADDRESS`` is unset; the cluster otherwise (as
under ``ray job submit``). Fast defaults (RAY_NOTES.md): the controller polls workers every 0.1 s
instead of 2 s, Ray's print patch (each worker line twice) is off, and a driver blocked in
``ray.get`` sees a signal within 0.1 s. They are environment variables that Ray reads when it
starts processes, so they are set only around the calls that start them (``ray.init`` of an
embedded cluster, whose processes then all inherit them; a Ray Train run on a cluster that lacks
them) and put back after: the caller's environment keeps what it had. A value the user set wins.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

from raytrainer.runtime.ray_internals import TOKEN_AUTH_LOGGER

WARN_BLOCKING_GET = "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC"

FAST_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                 # A driver blocked in ray.get checks for signals this often (Ray: 1000 ms). A
                 # signal landing on another thread, as a Jupyter kernel's interrupt does, waited up
                 # to a second for the check; measured 1.0 s -> 0.1 s from press to handler.
                 "RAY_get_check_signal_interval_milliseconds": "100"}


def ray_settings() -> dict[str, str]:
    """The environment a Ray start or a Ray Train run gets: the fast defaults (unless set), and
    on an embedded cluster (one node, nothing to preempt) no preemption watcher, which would only
    add an alarming log line."""
    settings = {k: os.environ.get(k, v) for k, v in FAST_DEFAULTS.items()}
    # Ray Train gives its controller this value (no warning about the controller's own blocking
    # calls) through a runtime_env, which costs a second Python start for the controller and
    # every actor it starts; a cluster that has it in its environment spares them that
    # (runtime/ray_internals.py). Users' own async actors on an embedded Ray do not warn either.
    settings[WARN_BLOCKING_GET] = os.environ.get(WARN_BLOCKING_GET, "0")
    if not os.environ.get("RAY_ADDRESS"):
        settings["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    return settings


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` for the duration; what was there before comes back after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def log_notice_dropped(logger_name: str, prefix: str) -> Iterator[None]:
    """Drop the records of ``logger_name`` that start with ``prefix`` for the duration: a notice
    of Ray's that is noise to our users, silenced around the one call that emits it (a user's
    own Ray calls keep it)."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    log = logging.getLogger(logger_name)
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


def import_ray(*submodules: str):
    """``import ray`` and its ``submodules`` (e.g. "ray.tune"), without the notices Ray gives in a
    Jupyter kernel that lacks ipywidgets: a warning (tqdm.auto, through Ray's tqdm_ray) and an
    INFO line from each module whose rich repr wants ipywidgets (ray.widgets.util), which
    raytrainer never displays. Ray Train and Ray Data come with it: every Ray run imports them."""
    import importlib
    wanted = ("ray", "ray.data", "ray.train", "ray.train.torch", *submodules)
    if all(name in sys.modules for name in wanted):
        return sys.modules["ray"]
    with warnings.catch_warnings(), log_notice_dropped("ray.widgets.util", ""):
        warnings.filterwarnings("ignore", message="IProgress not found")
        for name in wanted:
            importlib.import_module(name)
    return sys.modules["ray"]


def ensure_ray() -> bool:
    """Connect to a running Ray (RAY_ADDRESS) or start an embedded one; True if we started it."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    # The dashboard hosts the state API, which Tune's placement-group cleaner (Ray Train's, in a
    # sweep) needs to release the resources of a trial whose controller died.
    # An embedded cluster's processes inherit the fast settings and the driver's import path from
    # its raylet (actors import the driver's modules: scripts, tests, notebooks), through the
    # environment rather than a runtime_env: Ray starts a process that has a runtime_env through
    # its setup_worker.py, a second Python start that imports ray (~1 CPU-second per actor here).
    started_with = ray_settings() if address else {**ray_settings(), "PYTHONPATH": driver_pythonpath()}
    # A new local Ray (2.60) turns token authentication on and logs a WARNING saying so on every
    # start: good news, not a problem. Dropped; auth stays on. (RAY_AUTH_MODE=token instead is not
    # the same: Ray then writes no token for its own processes and they cannot connect.)
    with environment(started_with), \
            log_notice_dropped(TOKEN_AUTH_LOGGER, "Token authentication is enabled for this Ray cluster"):
        ray.init(address=address, include_dashboard=None if address else True,
                 logging_level=logging.WARNING, log_to_driver=True)
    try:
        from ray.data import DataContext
        DataContext.get_current().enable_progress_bars = False
    except Exception:  # pragma: no cover - ray.data is optional for Train
        pass
    return address is None


def run_environment(cluster_env: dict[str, str | None]) -> tuple[dict[str, str], dict | None]:
    """What a Ray Train run adds to the environment its processes get from the cluster
    (``cluster_env``: the values of ``ray_settings()``'s keys and PYTHONPATH in an actor without a
    runtime_env): the settings the cluster lacks, to be set in the driver for the run (Ray Train
    propagates them to its controller and workers); and a runtime_env for the workers when the
    cluster's PYTHONPATH does not cover the driver's (``None`` otherwise, and under ``ray job
    submit``, whose working_dir provides the modules). Each runtime_env costs a Python start."""
    settings = {k: v for k, v in ray_settings().items() if cluster_env.get(k) != v}
    if os.environ.get("RAY_ADDRESS"):
        return settings, None
    wanted = driver_pythonpath()
    have = (cluster_env.get("PYTHONPATH") or "").split(os.pathsep)
    covered = set(filter(None, wanted.split(os.pathsep))) <= set(have)
    return settings, None if covered else {"env_vars": {"PYTHONPATH": wanted}}


def driver_pythonpath() -> str:
    """The driver's import path for embedded-Ray workers, so modules defined in scripts, tests or
    notebooks next to the driver import there too."""
    paths = [p for p in sys.path if p and os.path.isdir(p) and "site-packages" not in p
             and not p.startswith(sys.base_prefix)]
    cwd = os.getcwd()
    if cwd not in paths:
        paths.insert(0, cwd)
    extra = os.environ.get("PYTHONPATH")
    return os.pathsep.join(paths + ([extra] if extra else []))
