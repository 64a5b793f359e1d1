"""Classes named in a config (``class_path`` + ``init_args``) -> checked arguments -> objects.
Every error names the key and where it was set (config_files.Origins)."""
from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

import raytrainer as rt
from raytrainer.cli.config_files import CLASS_KEYS, Origins

# Where short class names (`ModelCheckpoint`) resolve, by the key that holds them.
SHORT_NAMES = {"callbacks": "raytrainer.callbacks", "logger": "raytrainer.loggers",
               "scheduler": "ray.tune.schedulers", "search_alg": "ray.tune.search"}
SCIENTIFIC = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+$")  # 1e-3: a string to PyYAML


def coerce(value: Any, param: inspect.Parameter | None) -> Any:
    """'1e-3' -> 0.001 where ``param`` takes a float (by annotation, else by its default)."""
    if not (isinstance(value, str) and SCIENTIFIC.match(value)) or param is None:
        return value
    ann = param.annotation
    text = "" if ann is param.empty else ann if isinstance(ann, str) else getattr(ann, "__name__", repr(ann))
    takes_float = ("float" in text and "str" not in text) if text else isinstance(param.default, float)
    return float(value) if takes_float else value


def resolve_class(class_path: Any, path: tuple, origins: Origins, base: type | tuple,
                  short_module: str | None = None) -> type:
    """Import ``pkg.mod.Class`` (or a short name from ``short_module``); it must subclass ``base``."""
    where = path + ("class_path",)
    if not isinstance(class_path, str) or not class_path:
        raise origins.error(where, f"expected a dotted class path such as pkg.module.Class, got {class_path!r}")
    if "." not in class_path and not short_module:
        raise origins.error(where, f"{class_path!r} needs its module: write pkg.module.{class_path}")
    module_name, attr = class_path.rsplit(".", 1) if "." in class_path else (short_module, class_path)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise origins.error(where, f"cannot import module {module_name!r} for class_path {class_path!r}: "
                                   f"{type(e).__name__}: {e}") from None
    except Exception as e:
        raise origins.error(where, f"importing module {module_name!r} raised {type(e).__name__}: {e}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        known = getattr(module, "__all__", None)
        raise origins.error(where, f"module {module_name!r} has no attribute {attr!r}"
                                   + (f" (it has: {', '.join(known)})" if known else ""))
    if not (isinstance(cls, type) and issubclass(cls, base)):
        names = " or ".join(f"{b.__module__}.{b.__qualname__}" for b in (base if isinstance(base, tuple) else (base,)))
        raise origins.error(where, f"{class_path} is not a subclass of {names}")
    return cls


def class_spec(value: Any, path: tuple, origins: Origins) -> tuple[Any, dict]:
    """(class_path, init_args) of ``{class_path, init_args}`` or of a bare class-path string."""
    if isinstance(value, str):
        return value, {}
    if not isinstance(value, dict):
        raise origins.error(path, f"expected {{class_path: ..., init_args: {{...}}}}, got {value!r}")
    unknown = [k for k in value if k not in CLASS_KEYS]
    if unknown:
        raise origins.error(path + (unknown[0],), f"unknown key(s) {unknown}: expected class_path and init_args")
    if "class_path" not in value:
        raise origins.error(path, "missing class_path")
    args = {} if value.get("init_args") is None else value["init_args"]
    if not isinstance(args, dict):
        raise origins.error(path + ("init_args",), f"expected a mapping of argument names to values, got {args!r}")
    return value["class_path"], args


def check_init_args(cls: type, args: dict, path: tuple, origins: Origins, later: tuple = ()) -> dict:
    """Check ``args`` against ``cls.__init__``: unknown names and missing required ones are errors
    (``later``: arguments supplied later, by a sweep). Returns the args, coerced."""
    params = inspect.signature(cls).parameters
    named = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = [k for k in args if k not in named]
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise origins.error(path + ("init_args", unknown[0]),
                            f"{cls.__qualname__} does not accept {', '.join(map(repr, unknown))}; "
                            f"it accepts: {', '.join(named) or 'no arguments'}")
    missing = [n for n, p in named.items() if p.default is p.empty and n not in args and n not in later]
    if missing:
        raise origins.error(path + ("init_args",), f"{cls.__qualname__} requires {', '.join(missing)}: "
                                                   "set them in init_args")
    return {k: coerce(v, named.get(k)) for k, v in args.items()}


def instantiate(cls: type, args: dict, path: tuple, origins: Origins) -> Any:
    try:
        return cls(**args)
    except Exception as e:
        raise origins.error(path, f"{cls.__qualname__}(**init_args) raised {type(e).__name__}: {e}") from e


def build_objects(value: Any, path: tuple, origins: Origins, base: type | tuple) -> list:
    """Callbacks, loggers, a Tune scheduler: a list of {class_path, init_args} (or one of them)."""
    out = []
    for i, item in enumerate(value if isinstance(value, list) else [value]):
        p = path + (i,) if isinstance(value, list) else path
        class_path, args = class_spec(item, p, origins)
        cls = resolve_class(class_path, p, origins, base, SHORT_NAMES[path[-1]])
        out.append(instantiate(cls, check_init_args(cls, args, p, origins), p, origins))
    return out


def trainer_arguments() -> dict[str, inspect.Parameter]:
    """The Trainer's arguments (not its ``**not_supported``: Lightning's refused ones)."""
    return {n: p for n, p in inspect.signature(rt.Trainer.__init__).parameters.items()
            if n != "self" and p.kind is not p.VAR_KEYWORD}
