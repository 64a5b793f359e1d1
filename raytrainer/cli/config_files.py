"""Reading a CLI's YAML configs: safe loading, deep merging, dotted overrides, and where each
value came from (so every error can name the file or flag that set it). Used by cli.py."""
from __future__ import annotations

import copy
from typing import Any

import yaml

from raytrainer.errors import ConfigError

TOP_LEVEL = ("model", "data", "trainer", "ckpt_path", "sweep")
CLASS_KEYS = ("class_path", "init_args")


class CLIError(ConfigError):
    """A config problem; the message names the key and where it was set."""


# ----------------------------------------------------------------------- where values came from

def _dotted(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else ("." if i else "") + p for i, p in enumerate(path))


class Origins:
    """The file (or command-line flag) that last set each dotted path of the merged config."""

    def __init__(self) -> None:
        self._src: dict[tuple, str] = {}

    def record(self, path: tuple, value: Any, src: str) -> None:
        self._src = {p: s for p, s in self._src.items() if p[:len(path)] != path}  # subtree replaced
        stack = [(path, value)]
        while stack:
            p, v = stack.pop()
            self._src[p] = src
            if isinstance(v, dict):
                stack.extend((p + (k,), child) for k, child in v.items())

    def of(self, path: tuple) -> str:
        for n in range(len(path), 0, -1):
            if path[:n] in self._src:
                return self._src[path[:n]]
        return "defaults"

    def error(self, path: tuple, msg: str) -> CLIError:
        return CLIError(f"{self.of(path)}: {_dotted(path)}: {msg}")


# ----------------------------------------------------------------------- loading and merging

def _read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise CLIError(f"--config {path}: no such file") from None
    except OSError as e:
        raise CLIError(f"--config {path}: cannot read it ({e})") from None
    except yaml.YAMLError as e:
        raise CLIError(f"{path}: {_yaml_problem(e)}") from None
    if data is not None and not isinstance(data, dict):
        raise CLIError(f"{path}: expected a mapping with keys {', '.join(TOP_LEVEL)}, got {type(data).__name__}")
    return data or {}


def _yaml_problem(e: yaml.YAMLError) -> str:
    tag = getattr(e, "problem", None) or ""
    if isinstance(e, yaml.constructor.ConstructorError) and "tag" in tag:
        # e.g. !!python/object/apply:os.system -- yaml.safe_load never runs or builds objects.
        where = f" ({str(e.problem_mark).strip()})" if e.problem_mark else ""
        return (f"{tag}{where}: tags that build Python objects are refused "
                "(configs are read with yaml.safe_load); write the value in plain YAML, and a class "
                "as {class_path: pkg.module.Class, init_args: {...}}")
    return f"not valid YAML: {e}"


def _merge(base: dict, new: dict, origins: Origins, src: str, path: tuple = ()) -> None:
    """Deep-merge ``new`` into ``base``: mappings merge, anything else (lists included) is replaced,
    and so is a mapping whose class_path changed (the old init_args belong to the old class)."""
    for key, value in new.items():
        old = base.get(key)
        if isinstance(old, dict) and isinstance(value, dict) and \
                old.get("class_path", value.get("class_path")) == value.get("class_path", old.get("class_path")):
            _merge(old, value, origins, src, path + (key,))
        else:
            base[key] = copy.deepcopy(value)
            origins.record(path + (key,), value, src)


def _set(config: dict, path: tuple, value: Any, origins: Origins, src: str) -> None:
    node = config
    for i, key in enumerate(path[:-1]):
        if node.get(key) is None:
            node[key] = {}
            origins.record(path[:i + 1], {}, src)
        if not isinstance(node[key], dict):
            raise origins.error(path[:i + 1], f"is {node[key]!r}, so {src} cannot set a key inside it")
        node = node[key]
    if path[-1] == "class_path" and node.get("class_path") not in (None, value):
        node.pop("init_args", None)  # init_args of the previous class don't apply to the new one
    node[path[-1]] = value
    origins.record(path, value, src)


def load_config(files: list[str], overrides: list[tuple[str, str]] = ()) -> tuple[dict, Origins]:
    """Merge the ``files`` in order, then apply the dotted ``overrides`` [(key, raw value)]."""
    config: dict = {}
    origins = Origins()
    for path in files:
        _merge(config, _read_yaml(path), origins, path)
    for key, raw in overrides:
        src = f"command line (--{key})"
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise CLIError(f"{src}: value {raw!r}: {_yaml_problem(e)}") from None
        path = tuple(key.split("."))
        if path[0] in ("model", "data") and len(path) > 1 and path[1] not in CLASS_KEYS:
            path = (path[0], "init_args") + path[1:]  # --model.lr 0.1 means --model.init_args.lr 0.1
        _set(config, path, value, origins, src)
    return config, origins
