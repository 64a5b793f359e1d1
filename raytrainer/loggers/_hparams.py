"""Hyperparameter helpers shared by the loggers: redacting, flattening, sanitising, ``hparams.yaml``."""
from __future__ import annotations

import os
from typing import Any, Mapping

from raytrainer import redaction

_SCALARS = (bool, int, float, str)


def redacted(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with credentials replaced by ``"<redacted>"`` (see raytrainer/redaction.py):
    the first thing every ``log_hyperparams`` does, so a direct call is covered too."""
    return redaction.redact(dict(params))


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"opt": {"lr": 1}}`` -> ``{"opt/lr": 1}``; leaves are kept as they are."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def scalar_or_str(value: Any) -> bool | int | float | str:
    """TensorBoard's hparams plugin only takes bool/number/str: anything else becomes ``str()``."""
    return value if isinstance(value, _SCALARS) else str(value)


def sanitize(value: Any) -> Any:
    """Make nested params ``yaml.safe_dump``-able, keeping structure; unknown leaves -> ``str``."""
    if isinstance(value, Mapping):
        return {str(k): sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [sanitize(v) for v in value]
    if value is None or isinstance(value, _SCALARS):
        return value
    return str(value)


def write_hparams_yaml(local_dir: str, params: Mapping[str, Any]) -> str:
    """Write ``hparams.yaml`` atomically (a reader never sees a half-written file)."""
    import yaml

    path = os.path.join(local_dir, "hparams.yaml")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(redacted(sanitize(params)), f, sort_keys=False)
    os.replace(tmp, path)
    return path
