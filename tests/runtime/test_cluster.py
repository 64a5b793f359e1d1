"""Ray's settings are set only around the calls that start Ray's processes, and put back after:
the caller's environment keeps what it had (runtime/cluster.py)."""
from __future__ import annotations

import os

from raytrainer.runtime.cluster import FAST_DEFAULTS, environment, ray_settings


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
