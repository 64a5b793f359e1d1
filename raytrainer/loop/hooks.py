"""Hook dispatch, in Lightning's order (callbacks/base.py): each callback's hook, then the
module's (whose return value counts: ``on_train_batch_start`` returning -1). Who implements a hook is looked up once per run: the step loop fires six
hooks per batch, and calling every inherited no-op of the module and of each callback every step
would be most of the loop's own overhead.
"""
from __future__ import annotations

from typing import Any, Callable

from raytrainer.callbacks.base import Callback
from raytrainer.module import Module


class Hooks:
    """``hooks.on_x`` runs hook ``on_x`` (the callbacks' overrides, then the module's), or is None
    when nothing overrides it: resolved at first use, then a plain attribute, so the step loop
    skips a hook nobody implements without even a function call. With a profiler, each resolved
    hook is timed as ``hook: on_x`` (wrapped once, here; nothing when profiling is off)."""

    def __init__(self, trainer, module, callbacks: list[Callback], profiler):
        self._trainer = trainer
        self._module = module
        self._callbacks = callbacks
        self._profiler = profiler
        self._implemented: dict[str, tuple[Callable | None, list[tuple[Callback, Callable]]]] = {}
        self._parts: dict[tuple, Callable | None] = {}

    def __getattr__(self, hook: str) -> Callable | None:
        if hook.startswith("_"):
            raise AttributeError(hook)
        fn = self._timed(hook, self._dispatcher(hook))
        setattr(self, hook, fn)
        return fn

    def call(self, hook: str, *args: Any) -> Any:
        """Each callback's hook, then the module's; returns the module's result."""
        fn = getattr(self, hook)
        return fn(*args) if fn is not None else None

    def call_module(self, hook: str, *args: Any) -> Any:
        fn = self._part(hook, "module")
        return fn(*args) if fn is not None else None

    def call_callbacks(self, hook: str, *args: Any, monitoring: bool | None = None) -> None:
        """The callbacks' part of ``hook``; ``monitoring``: only those that do (True: ModelCheckpoint,
        EarlyStopping and subclasses, ``Callback.monitors_metrics``) or do not (False) decide on
        logged metrics — Lightning runs the module's on_train_epoch_end between the two groups."""
        fn = self._part(hook, "callbacks", monitoring)
        if fn is not None:
            fn(*args)

    def implemented_by_module(self, hook: str) -> bool:
        return self._implementations(hook)[0] is not None

    # ------------------------------------------------------------------ resolution
    def _implementations(self, hook: str) -> tuple[Callable | None, list[tuple[Callback, Callable]]]:
        """The module's method unless it is Module's no-op default, and the callbacks' methods
        that are not Callback's no-op."""
        entry = self._implemented.get(hook)
        if entry is None:
            module_fn = getattr(self._module, hook, None)
            if is_default(module_fn, Module, hook):
                module_fn = None
            callback_fns = [(cb, fn) for cb, fn in ((cb, getattr(cb, hook)) for cb in self._callbacks)
                            if not is_default(fn, Callback, hook)]
            self._implemented[hook] = entry = (module_fn, callback_fns)
        return entry

    def _dispatcher(self, hook: str) -> Callable | None:
        """One function running ``hook``'s implementations in order, or None when there are none."""
        module_fn, callback_fns = self._implementations(hook)
        if not callback_fns:
            return module_fn
        trainer, module = self._trainer, self._module
        fns = [fn for _, fn in callback_fns]

        def dispatch(*args: Any) -> Any:
            for fn in fns:
                fn(trainer, module, *args)
            return module_fn(*args) if module_fn is not None else None
        return dispatch

    def _part(self, hook: str, which: str, monitoring: bool | None = None) -> Callable | None:
        """The module's part or the callbacks' part of ``hook`` alone, resolved once."""
        key = (hook, which, monitoring)
        if key not in self._parts:
            module_fn, callback_fns = self._implementations(hook)
            fns = [fn for cb, fn in callback_fns
                   if monitoring is None or bool(getattr(cb, "monitors_metrics", False)) == monitoring]
            if which == "module":
                fn = module_fn
            elif fns:
                trainer, module = self._trainer, self._module

                def fn(*args: Any) -> None:
                    for cb_fn in fns:
                        cb_fn(trainer, module, *args)
            else:
                fn = None
            self._parts[key] = self._timed(hook, fn)
        return self._parts[key]

    def _timed(self, hook: str, fn: Callable | None) -> Callable | None:
        return None if fn is None else self._profiler.wrap(f"hook: {hook}", fn)


def is_default(fn: Any, base: type, hook: str) -> bool:
    """True when ``fn`` (a bound method or None) is ``base``'s no-op for ``hook`` (an override,
    or a function set on the instance, is not)."""
    return fn is None or getattr(fn, "__func__", None) is getattr(base, hook, None)


def merge_callbacks(given: list[Callback], from_module: Any) -> list[Callback]:
    """Trainer callbacks, with those from ``configure_callbacks`` replacing same-type ones (as in
    Lightning) and appended last."""
    extra = list(from_module or [])
    if not extra:
        return list(given)
    types = {type(cb) for cb in extra}
    return [cb for cb in given if type(cb) not in types] + extra
