"""Sweeps on Ray Tune: ``rt.sweep`` (sweep.py), what one trial runs (trial.py), what a sweep
returns (result.py). Also Tune's search-space helpers, imported from Ray only when used:
``rt.tune.loguniform(1e-4, 1e-1)``, ``rt.tune.choice([32, 64])``, ..."""
from __future__ import annotations

from raytrainer.runtime.cluster import import_ray

SEARCH_HELPERS = ("uniform", "quniform", "loguniform", "qloguniform", "randn", "qrandn", "randint",
                  "qrandint", "lograndint", "qlograndint", "choice", "grid_search", "sample_from")


def __getattr__(name: str):
    if name in SEARCH_HELPERS:
        return getattr(import_ray("ray.tune").tune, name)  # imports ray (seconds): only when used
    raise AttributeError(f"module 'raytrainer.tune' has no attribute {name!r}")
