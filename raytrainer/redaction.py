"""Credentials never leave the process through hyperparameters or configs (issue #8).

A run writes its module's hparams to every checkpoint (``hyper_parameters``), to each logger
(hparams.yaml, TensorBoard's hparams plugin, MLflow params, the W&B config) and, from the CLI, its
resolved config to ``config.yaml``. A secret passed as a hyperparameter (``Net(api_key=...)`` with
``self.save_hyperparameters()``) would land in all of them. Everything written goes through
``redact`` first, which replaces a value with ``MARKER`` (the key stays, so the reader sees the
hparam existed) when

- its key looks like a credential (``is_secret_key``: ``password``, ``api_key``,
  ``aws_secret_access_key``, ``hf_token``...; not ``max_tokens``, ``tokenizer``, ``pad_token``), or
- it is a string equal to, or containing, the value of an environment variable whose *name* looks
  like a credential (``WANDB_API_KEY``, ``HF_TOKEN``, ``DB_PASSWORD``...; values of 8+ characters,
  read at redaction time).

Only what is written is redacted: the module keeps its real ``self.hparams``. ``warn_if_redacted``
names the redacted keys (never values) once per fit.
"""
from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Any, Iterable, Mapping

MARKER = "<redacted>"
MIN_SECRET_LENGTH = 8  # shorter env values ("1", "true", "us-east-1"...) would redact ordinary hparams

# On the last component of a key, normalised to snake_case. `token` alone is a credential
# (HF_TOKEN, github_token, auth_token); the NLP vocabulary's special tokens are not.
_SECRET = re.compile(
    r"(^|_)(secrets?|passwords?|passwd|passphrase|credentials?|auth|authorization|cookies?|"
    r"access_keys?(_id)?|(secret|private|signing|encryption|master|account)_keys?|api_?keys?|token)$")
_NOT_SECRET = re.compile(
    r"(^|_)(pad|eos|bos|unk|sep|cls|mask|sos|eot|start|end|begin|stop|special|image|audio|video|"
    r"decoder_start|ignore|max|num|n)_token$")
# Environment variable names are matched more widely: FOO_KEY (STRIPE_KEY) and FOO_PAT are
# credentials there, while a hyperparameter `key` (a dict key, a sort key, a PRNG key) is not.
_SECRET_ENV = re.compile(r"(^|_)(key|pat)$")


def _last_component(name: str) -> str:
    """``model.init_args.apiKey`` -> ``api_key``; ``x-api-key`` -> ``x_api_key``."""
    last = re.split(r"[./]", str(name))[-1]
    last = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", last)  # camelCase -> camel_Case
    return re.sub(r"[^0-9a-z]+", "_", last.lower()).strip("_")


def is_secret_key(name: Any) -> bool:
    """Whether a hyperparameter or config key looks like it holds a credential (case-insensitive,
    on the last component of a dotted or ``/``-flattened key)."""
    key = _last_component(name)
    return bool(_SECRET.search(key)) and not _NOT_SECRET.search(key)


def is_secret_env_name(name: str) -> bool:
    """Whether an environment variable's name says its value is a credential."""
    return is_secret_key(name) or bool(_SECRET_ENV.search(_last_component(name)))


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of the secret-looking environment variables (8+ characters), longest first."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if len(v) >= MIN_SECRET_LENGTH and is_secret_env_name(k)}
    return sorted(values, key=len, reverse=True)


def _has_secret_value(value: str, secrets: Iterable[str]) -> bool:
    return any(s in value for s in secrets)


def _blank(value: Any) -> bool:
    """Nothing to hide: ``use_auth=True``, ``password=None``, ``token=""``."""
    return value is None or isinstance(value, bool) or (isinstance(value, str) and not value)


def _walk(value: Any, path: tuple, secrets: list[str], extra: frozenset, found: list[tuple]) -> Any:
    """``value`` with secrets replaced by MARKER; each replaced path is appended to ``found``."""
    if path and (path in extra or (is_secret_key(path[-1]) and not _blank(value))):
        if not (isinstance(value, str) and value == MARKER):
            found.append(path)
        return MARKER
    if isinstance(value, Mapping):
        return {k: _walk(v, (*path, k), secrets, extra, found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        out = [_walk(v, (*path, i), secrets, extra, found) for i, v in enumerate(value)]
        return out if isinstance(value, list) else tuple(out)
    if value is None or isinstance(value, (bool, int, float)) or not secrets:
        return value
    # Strings, and other objects by the text a writer would use (loggers str(), checkpoints repr()):
    # a dataclass config repr()s its fields, token included.
    try:
        texts = (value,) if isinstance(value, str) else (str(value), repr(value))
    except Exception:  # an object that cannot print itself cannot be written with a secret either
        return value
    if any(_has_secret_value(t, secrets) for t in texts):
        found.append(path)
        return MARKER
    return value


def redact_with_paths(value: Any, also: Iterable[tuple] = (), environ: Mapping[str, str] | None = None
                      ) -> tuple[Any, list[tuple]]:
    """(redacted copy, the key paths that were replaced). ``also``: paths to replace regardless
    (secrets found by the driver, whose environment a Ray worker may not share)."""
    found: list[tuple] = []
    out = _walk(value, (), secret_values(environ), frozenset(tuple(p) for p in also), found)
    return out, found


def redact(value: Any, also: Iterable[tuple] = (), environ: Mapping[str, str] | None = None) -> Any:
    """A copy of ``value`` (dicts, lists and tuples, recursively) with every secret-looking entry
    replaced by ``MARKER``; keys are kept. Other leaves are returned as they are."""
    return redact_with_paths(value, also, environ)[0]


def dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def module_hparams(module) -> dict:
    """The module's hparams as they may be written: redacted, including the paths the driver
    marked in ``mark_secret_hparams`` (the module's own ``hparams`` are left untouched)."""
    return redact(dict(module.hparams), also=getattr(module, "_rt_secret_hparams", ()))


def datamodule_hparams(datamodule) -> dict:
    """The datamodule's hparams as they may be written (see ``module_hparams``)."""
    hparams = getattr(datamodule, "hparams", None)
    return redact(dict(hparams), also=getattr(datamodule, "_rt_secret_hparams", ())) if hparams else {}


def run_hparams(module, datamodule=None) -> dict:
    """What a fit logs as its hyperparameters, as Lightning does: the module's and the
    datamodule's merged (a key in both with different values is an error), redacted, with the
    secret paths the driver marked on each (``mark_secret_hparams``)."""
    hparams = module_hparams(module)
    extra = datamodule_hparams(datamodule) if datamodule is not None else {}
    conflicting = [k for k in hparams.keys() & extra.keys()
                   if type(hparams[k]) is not type(extra[k]) or hparams[k] != extra[k]]
    if conflicting:
        raise RuntimeError(f"Error while merging hparams: the keys {conflicting} are present in both the "
                           "LightningModule's and LightningDataModule's hparams but have different values.")
    return {**hparams, **extra}


def mark_secret_hparams(module) -> list[tuple]:
    """In the launching process: find the module's secret hparams, remember their paths on the
    module (so workers, whose environment may lack the driver's variables, redact them too) and
    warn once, naming the keys, never the values. Returns the paths."""
    _, found = redact_with_paths(dict(module.hparams))
    object.__setattr__(module, "_rt_secret_hparams", tuple(found))
    if found:
        keys = ", ".join(repr(dotted(p)) for p in found)
        warnings.warn(
            f"{type(module).__name__} hyperparameter(s) {keys} look like credentials (a secret-looking "
            f"name, or the value of a secret-looking environment variable); they are written as "
            f"{MARKER!r} to checkpoints, loggers and configs. Pass secrets through the environment "
            f"instead (read os.environ where they are used), or leave them out of the hparams with "
            f"self.save_hyperparameters(ignore=[...]).", UserWarning, stacklevel=_caller_outside_raytrainer())
    return found


def _caller_outside_raytrainer() -> int:
    """The warnings stacklevel of the first caller outside this package (the user's fit() line)."""
    package, level, frame = os.path.dirname(os.path.abspath(__file__)), 2, sys._getframe(2)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def find_markers(value: Any, path: tuple = ()) -> list[tuple]:
    """Paths whose value is MARKER: a config written by raytrainer, with a secret left out."""
    if isinstance(value, str) and value == MARKER:
        return [path]
    if isinstance(value, Mapping):
        return [p for k, v in value.items() for p in find_markers(v, (*path, k))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in find_markers(v, (*path, i))]
    return []
