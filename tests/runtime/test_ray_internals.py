"""Ray's private API that raytrainer relies on (runtime/ray_internals.py), pinned: each test fails
when a Ray upgrade moves or renames what the adapter reaches, before anything else breaks."""
from __future__ import annotations

import inspect
import logging

import pytest

from raytrainer.runtime import ray_internals

pytestmark = pytest.mark.timeout(120)


def test_worker_group_callback_hook_and_execute_exist():
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup
    assert hasattr(WorkerGroupCallback, "after_worker_group_start")
    assert callable(getattr(WorkerGroup, "execute", None))
    callback = ray_internals.worker_group_callback(lambda: None)
    assert isinstance(callback, WorkerGroupCallback)
    # where the controller-side callback finds the workers' placement group
    from ray.train.v2._internal.execution.worker_group.placement_group_handle import PlacementGroupHandle
    from ray.train.v2._internal.execution.worker_group.state import WorkerGroupState
    assert callable(getattr(WorkerGroup, "get_worker_group_state", None))
    assert "placement_group_handle" in inspect.signature(WorkerGroupState).parameters
    assert isinstance(inspect.getattr_static(PlacementGroupHandle, "placement_group"), property)


def test_torch_trainer_sigint_handler_and_default_callbacks_are_the_methods_we_replace():
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    assert list(inspect.signature(TorchTrainer._register_sigint_handler).parameters) == ["self", "controller"]
    fit_trainer = ray_internals.trainer_class(keep_sigint_handler=False, keep_placement_group_cleaner=False)
    assert issubclass(fit_trainer, TorchTrainer) and fit_trainer._register_sigint_handler(None, None) is None
    assert ray_internals.trainer_class(True, True)._register_sigint_handler is TorchTrainer._register_sigint_handler

    def kinds(datasets, keep_cleaner=True):  # the callbacks a run is built with (no Ray needed to build them)
        trainer = ray_internals.trainer_class(True, keep_cleaner)(lambda: None, datasets=datasets)
        return {type(cb) for cb in trainer._create_default_callbacks()}
    assert DatasetsCallback not in kinds(None)  # no dataset: no DatasetManager actor
    assert DatasetsCallback in kinds({"train": lambda: None})  # a dataset factory: Ray not started
    assert PlacementGroupCleanerCallback in kinds(None)
    assert PlacementGroupCleanerCallback not in kinds(None, keep_cleaner=False)
    assert DatasetsCallback in kinds({"train": lambda: None}, keep_cleaner=False)


@pytest.mark.ray
def test_dataset_copies_carry_their_own_execution_counter(ray_cluster):  # a Dataset starts Ray
    import ray.data
    ds = ray.data.range(3)
    at_four = ray_internals.dataset_at_execution(ds, 4)
    assert ray_internals.execution_index(at_four) == 4 and ray_internals.execution_index(ds) != 4
    assert ray_internals.copy_dataset(ds).context is not ds.context


def test_the_loggers_we_quiet_exist_in_ray():
    import importlib
    for name in (ray_internals.TOKEN_AUTH_LOGGER, ray_internals.TUNE_STORAGE_LOGGER, ray_internals.TUNE_RESULT_LOGGER):
        module = importlib.import_module(name)  # each logs through logging.getLogger(__name__)
        assert module.logger is logging.getLogger(name)
    assert ray_internals.train_report_logger_name().endswith("context.py")


def test_runtime_envs_are_left_out_where_the_values_are_inherited(monkeypatch):
    """Ray Train hands its controller and workers its settings as a runtime_env (a second Python
    start per process); the lean classes hand on only what the process would not inherit."""
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE
    from ray.train.v2._internal.execution.controller import TrainController
    from ray.train.v2._internal.execution.worker_group import WorkerGroup
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    assert list(inspect.signature(DataParallelTrainer._initialize_and_run_controller).parameters) == \
        ["self", "controller_init_kwargs"]
    assert TrainController.worker_group_cls is WorkerGroup
    assert isinstance(inspect.getattr_static(WorkerGroup, "_get_worker_runtime_env"), staticmethod)
    assert {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC"} <= ENV_VARS_TO_PROPAGATE
    assert ray_internals.controller_env_keys() == sorted(ENV_VARS_TO_PROPAGATE)

    lean_group = ray_internals._lean_controller_class().worker_group_cls
    assert issubclass(lean_group, WorkerGroup)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # as the controller inherited it
    monkeypatch.setenv("RAY_TRAIN_COLLECTIVE_TIMEOUT_S", "30")
    # the controller's own values: nothing to hand on
    assert lean_group._get_worker_runtime_env({}) == {}
    # a user's worker runtime_env is kept; a value that differs from the controller's is handed on
    custom = {"env_vars": {"PYTHONPATH": "/x", "RAY_TRAIN_COLLECTIVE_TIMEOUT_S": "60"}, "pip": ["a"]}
    assert lean_group._get_worker_runtime_env(custom) == \
        {"pip": ["a"], "env_vars": {"PYTHONPATH": "/x", "RAY_TRAIN_COLLECTIVE_TIMEOUT_S": "60"}}
