"""Every use of Ray's private API, in one room (Ray 2.60; each pinned by a test that fails when a
Ray upgrade moves it). Everything else uses Ray's public API only.

- Ray Data's execution counter (``DataContext._execution_idx``), which per-execution shuffle
  seeds depend on: a restarted worker group must resume it (runtime/ray_data.py), and an
  in-process Ray Dataset is deep-copied (``Dataset.copy(_deep_copy=True)``) so each epoch's
  execution options are its own.
- Ray Train's worker-group callbacks (``WorkerGroupCallback``): code on every worker actor's main
  thread, where signal handlers live, after each (re)start of the group.
- ``TorchTrainer._register_sigint_handler``: Ray Train's Ctrl-C handler (abort, no checkpoint),
  which raytrainer replaces with its own (stop at an agreed step with a committed checkpoint).
- ``DataParallelTrainer._create_default_callbacks``, ``DatasetsCallback`` and
  ``PlacementGroupCleanerCallback``: a run without Ray Datasets starts no dataset actor; a fit
  whose driver removes its placement group itself starts no cleaner actor.
- ``DataParallelTrainer._initialize_and_run_controller``, ``TrainController.worker_group_cls`` and
  ``WorkerGroup._get_worker_runtime_env``: the environment variables Ray Train hands its
  controller and workers as a runtime_env, left out where the process inherits the same values.
- The names of loggers whose notices about a healthy run are noise to users.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

# Loggers whose messages about a healthy run raytrainer silences where it triggers them.
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"  # "Token authentication is enabled"
TUNE_STORAGE_LOGGER = "ray.train._internal.storage"  # one INFO line per (tiny) Tune checkpoint
TUNE_RESULT_LOGGER = "ray.tune.logger.logger"        # "Remote file not found" on PBT restores


def train_report_logger_name() -> str:
    """Ray Train 2.60 logs every report at INFO through a logger named by its file path, which
    ``LoggingConfig(log_level=...)`` does not reach."""
    from ray.train.v2._internal.execution import context
    return context.__file__


def copy_dataset(ds: Any) -> Any:
    """A copy of ``ds`` with its own DataContext (execution options, execution counter)."""
    from ray.data import Dataset
    return Dataset.copy(ds, _deep_copy=True)


def dataset_at_execution(ds: Any, index: int) -> Any:
    """A copy of ``ds`` whose next execution is Ray Data's execution number ``index`` (what a
    per-execution seed such as ``RandomSeedConfig(reseed_after_execution=True)`` depends on)."""
    ds = copy_dataset(ds)
    ds.context._execution_idx = index
    return ds


def execution_index(ds: Any) -> int:
    return ds.context._execution_idx


def worker_group_callback(on_start: Callable[[], Any] | None, on_placement_group: Callable[[Any], Any] | None = None):
    """A Ray Train callback that runs ``on_start`` on every worker actor's main thread after the
    worker group (re)starts, before the training function does; and, in the controller, hands
    ``on_placement_group`` the group's placement group."""
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class OnWorkerGroupStart(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group) -> None:
            if on_placement_group is not None:
                on_placement_group(worker_group.get_worker_group_state().placement_group_handle.placement_group)
            if on_start is not None:
                worker_group.execute(on_start)

    return OnWorkerGroupStart()


def _not_inherited(env_vars: dict[str, str], inherited: dict[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in env_vars.items() if inherited.get(k) != v}


def controller_env_keys() -> list[str]:
    """The environment variables Ray Train may hand its controller (and it its workers)."""
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE
    return sorted(ENV_VARS_TO_PROPAGATE)


@functools.lru_cache(maxsize=None)
def _lean_controller_class():
    """Ray Train's controller with a worker group that hands its workers only the environment
    variables they would not inherit from the controller anyway."""
    import os

    from ray.train.v2._internal.execution.controller import TrainController
    from ray.train.v2._internal.execution.worker_group import WorkerGroup

    class LeanWorkerGroup(WorkerGroup):
        @staticmethod
        def _get_worker_runtime_env(custom_runtime_env):
            runtime_env = dict(WorkerGroup._get_worker_runtime_env(custom_runtime_env))
            # A child actor inherits its parent's environment (the raylet's plus the parent's
            # runtime_env), so a value equal to the controller's own is passed on anyway.
            env_vars = _not_inherited(runtime_env.pop("env_vars", {}), dict(os.environ))
            return {**runtime_env, "env_vars": env_vars} if env_vars else runtime_env

    class LeanController(TrainController):
        worker_group_cls = LeanWorkerGroup

    # Ray names the actor and its process after the class: `ray list actors`, the dashboard and
    # process listings keep showing Ray Train's controller by its own name.
    LeanController.__name__ = LeanController.__qualname__ = TrainController.__name__
    return LeanController


@functools.lru_cache(maxsize=None)
def trainer_class(keep_sigint_handler: bool, keep_placement_group_cleaner: bool):
    """``TorchTrainer`` without a dataset actor when it is given no Ray Dataset (Ray Train 2.60
    starts a ``DatasetManager`` actor for every run: a process, ~1.8 CPU-seconds per fit measured
    here, for nothing). With ``keep_sigint_handler=False`` its ``fit()`` also leaves the caller's
    SIGINT handler in place. With ``keep_placement_group_cleaner=False`` it starts no
    ``PlacementGroupCleaner`` (a detached actor per run, ~2 CPU-seconds per fit here, that removes
    the workers' placement group if the controller dies): for a caller that removes it itself
    (runtime/ray_train.py), which a Tune trial cannot, since Tune kills it with its controller.

    Its controller, synchronization actor and workers get a runtime_env only for what they would
    not inherit from the cluster (``cluster_environment``: the values of ``controller_env_keys()``
    that an actor without a runtime_env sees). Ray Train 2.60 always gives its controller one (and
    through it every actor of the run): each such process starts through Ray's setup_worker.py, a
    second Python start that imports ray, ~0.5 s and ~1 CPU-second per process here."""
    import threading

    import ray
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.constants import DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE as QUIET
    from ray.train.v2._internal.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR as WARN_BLOCKING_GET
    from ray.train.v2._internal.constants import get_env_vars_to_propagate
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    dropped = () if keep_placement_group_cleaner else (PlacementGroupCleanerCallback,)

    class LeanTrainer(TorchTrainer):
        def __init__(self, *args, cluster_environment: dict[str, str | None] | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.cluster_environment = cluster_environment or {}

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            # As Ray's (DataParallelTrainer._initialize_and_run_controller), with the runtime_env
            # left out where it would only repeat what the controller inherits.
            env_vars = {WARN_BLOCKING_GET: QUIET, **get_env_vars_to_propagate()}
            env_vars = _not_inherited(env_vars, self.cluster_environment)
            controller = ray.remote(
                num_cpus=0,
                label_selector={ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()},
                runtime_env={"env_vars": env_vars} if env_vars else None,
            )(_lean_controller_class()).remote(**controller_init_kwargs)
            if threading.current_thread() is threading.main_thread():  # not in a Tune trial
                self._register_sigint_handler(controller)
            ray.get(controller.run.remote())
            return ray.get(controller.get_result.remote())

        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            unwanted = dropped if self.datasets else (*dropped, DatasetsCallback)
            return [cb for cb in callbacks if not isinstance(cb, unwanted)]

        if not keep_sigint_handler:
            def _register_sigint_handler(self, controller) -> None:
                pass

    return LeanTrainer


def remove_placement_group_left(placement_group) -> bool:
    """Remove ``placement_group`` unless Ray has already; True if it was still there (its
    controller died without removing it)."""
    from ray.util.placement_group import placement_group_table, remove_placement_group
    if placement_group_table(placement_group).get("state") in (None, "REMOVED"):  # None: unknown to Ray
        return False
    remove_placement_group(placement_group)
    return True
