"""``LambdaCallback``: a callback made of functions, one per hook (Lightning's)."""
from __future__ import annotations

from typing import Callable

from raytrainer.callbacks.base import Callback

# Every event hook of Callback (not its state methods): what a LambdaCallback may be given.
HOOKS = tuple(name for name in vars(Callback) if name.startswith("on_") or name in ("setup", "teardown"))


class LambdaCallback(Callback):
    """``LambdaCallback(on_train_epoch_end=lambda trainer, pl_module: ...)``: each function is
    called where the hook of that name is, with the hook's arguments."""

    def __init__(self, **hooks: Callable):
        unknown = sorted(set(hooks) - set(HOOKS))
        if unknown:
            raise TypeError(f"LambdaCallback got {unknown}, which are not callback hooks; hooks: {list(HOOKS)}")
        for name, fn in hooks.items():
            if fn is not None:
                if not callable(fn):
                    raise TypeError(f"LambdaCallback({name}={fn!r}): expected a function")
                setattr(self, name, fn)
