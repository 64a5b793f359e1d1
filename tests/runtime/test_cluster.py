"""Ray's settings are set only around the calls that start Ray's processes, and put back after:
the caller's environment keeps what it had (runtime/cluster.py)."""
from __future__ import annotations

import os

from raytrainer.runtime.cluster import FAST_DEFAULTS, driver_pythonpath, environment, ray_settings, run_environment


def test_environment_sets_for_the_block_and_puts_everything_back(monkeypatch):
    monkeypatch.setenv("RT_TEST_KEPT", "before")
    monkeypatch.delenv("RT_TEST_NEW", raising=False)
    with environment({"RT_TEST_KEPT": "during", "RT_TEST_NEW": "1"}):
        assert os.environ["RT_TEST_KEPT"] == "during" and os.environ["RT_TEST_NEW"] == "1"
    assert os.environ["RT_TEST_KEPT"] == "before" and "RT_TEST_NEW" not in os.environ
    try:
        with environment({"RT_TEST_NEW": "1"}):
            raise RuntimeError("a failed start")
    except RuntimeError:
        pass
    assert "RT_TEST_NEW" not in os.environ


def test_fast_defaults_yield_to_the_users_values(monkeypatch):
    for key in FAST_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    settings = ray_settings()
    assert settings["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.1"
    assert settings["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"  # an embedded Ray: one node
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    settings = ray_settings()
    assert settings["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "2.0"  # the user's own wins
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in settings   # a cluster: Ray's default
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" in os.environ and os.environ["RAY_ADDRESS"] == "10.0.0.1:6379"


def test_a_run_adds_only_what_the_cluster_lacks(monkeypatch, tmp_path):
    """An embedded cluster started with the settings and the driver's path gives a Ray Train run
    nothing to add: no environment variable to propagate, no runtime_env (each one costs its
    processes a second Python start). A cluster without them gets both; under `ray job submit`
    the job's working_dir provides the modules."""
    for key in (*FAST_DEFAULTS, "RAY_ADDRESS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):
        monkeypatch.delenv(key, raising=False)
    embedded = {**ray_settings(), "PYTHONPATH": driver_pythonpath() + os.pathsep + "/elsewhere"}
    assert run_environment(embedded) == ({}, None)
    settings, worker_env = run_environment({"PYTHONPATH": "/elsewhere"})
    assert settings == ray_settings()
    assert worker_env == {"env_vars": {"PYTHONPATH": driver_pythonpath()}}
    monkeypatch.syspath_prepend(str(tmp_path))  # the driver's path grew since Ray started
    assert run_environment({**embedded, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}) == (
        {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}, {"env_vars": {"PYTHONPATH": driver_pythonpath()}})
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert run_environment({})[1] is None
