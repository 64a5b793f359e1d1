"""What a Trainer refuses before anything starts: Lightning arguments and hooks raytrainer does
not implement (named, with the way to go, never ignored) and a module that cannot run the stage."""
from __future__ import annotations

from raytrainer.errors import ConfigError
from raytrainer.module import Module


# Lightning hooks raytrainer does not call: a module defining one is refused before anything starts
# (never silently skipped).
LIGHTNING_HOOKS_NOT_CALLED = ("configure_sharded_model",)


# Lightning Trainer arguments raytrainer does not implement: refused by name, with the way to go.
_NOT_SUPPORTED = {
    "plugins": "precision= selects the precision; storage_path/storage_options the checkpoint storage; "
               "Ray sets up the cluster",
    "model_registry": "upload the checkpoint from storage_path after fit",
}


def refuse_unsupported(kwargs: dict) -> None:
    for name in kwargs:
        if name in _NOT_SUPPORTED:
            raise ConfigError(f"Trainer({name}=...) is a Lightning argument raytrainer does not support: "
                              f"{_NOT_SUPPORTED[name]}")
    if kwargs:
        raise TypeError(f"Trainer() got unexpected keyword arguments {sorted(kwargs)}")


def check_module(model, stage: str) -> None:
    if not isinstance(model, Module):
        raise TypeError(f"expected an rt.Module (a raytrainer.Module subclass), got {type(model).__name__}. "
                        "A LightningModule only needs its import changed: `import raytrainer as rt; "
                        "class Lit(rt.Module)`")
    overridden = [hook for hook in LIGHTNING_HOOKS_NOT_CALLED if callable(getattr(type(model), hook, None))]
    if overridden:
        raise TypeError(f"{type(model).__name__} overrides {', '.join(overridden)}: Lightning hooks raytrainer does "
                        "not call (configure_sharded_model is Lightning's deprecated name: rename it "
                        "configure_model). Never silently skipped")
    if stage == "fit" and type(model).training_step is Module.training_step:
        raise TypeError(f"{type(model).__name__} does not define training_step(self, batch, batch_idx)")
    if stage == "fit" and model.automatic_optimization and \
            type(model).configure_optimizers is Module.configure_optimizers:
        raise TypeError(f"{type(model).__name__} does not define configure_optimizers()")
