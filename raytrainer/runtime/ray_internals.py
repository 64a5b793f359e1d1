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


@functools.lru_cache(maxsize=None)
def trainer_class(keep_sigint_handler: bool, keep_placement_group_cleaner: bool):
    """``TorchTrainer`` without a dataset actor when it is given no Ray Dataset (Ray Train 2.60
    starts a ``DatasetManager`` actor for every run: a process, ~1.8 CPU-seconds per fit measured
    here, for nothing). With ``keep_sigint_handler=False`` its ``fit()`` also leaves the caller's
    SIGINT handler in place. With ``keep_placement_group_cleaner=False`` it starts no
    ``PlacementGroupCleaner`` (a detached actor per run, ~2 CPU-seconds per fit here, that removes
    the workers' placement group if the controller dies): for a caller that removes it itself
    (runtime/ray_train.py), which a Tune trial cannot, since Tune kills it with its controller."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    dropped = () if keep_placement_group_cleaner else (PlacementGroupCleanerCallback,)

    class LeanTrainer(TorchTrainer):
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
