"""``Module``: the LightningModule-style base class users subclass.

A Module is a plain ``torch.nn.Module`` plus hooks with no-op defaults. It holds no loop logic:
the loop attaches the run in progress (``_attach``) and everything a module asks of it
(``self.log``, ``self.optimizers()``, ``self.manual_backward``) goes there; ``self.global_step``
and the other counters are read from the Trainer, as in Lightning.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any, Mapping

import torch
from torch import nn

from raytrainer.checkpoint.lightning_file import read_any
from raytrainer.utilities import AttributeDict, move_to_device


class Module(nn.Module):
    """Subclass and implement ``training_step`` and ``configure_optimizers``."""

    # Lightning's: an input for forward() (a tensor, or a tuple of its positional arguments) that
    # TensorBoardLogger(log_graph=True) traces the graph with.
    example_input_array: Any = None

    def __init__(self) -> None:
        super().__init__()
        # Plain attributes set through object.__setattr__ so nn.Module does not register them.
        object.__setattr__(self, "_rt_trainer", None)
        object.__setattr__(self, "_rt_run", None)  # the run in progress (loop/run.py), while one is
        object.__setattr__(self, "_rt_hparams", AttributeDict())
        object.__setattr__(self, "_rt_automatic_optimization", True)

    # ------------------------------------------------------------------ hyperparameters
    def save_hyperparameters(self, *args: Any, ignore: str | list[str] | None = None) -> None:
        """Store ``__init__`` arguments in ``self.hparams`` (and so in every checkpoint).

        With no arguments, takes every argument of the calling ``__init__`` from its frame, as
        Lightning does; with names, only those; with one dict, that dict.
        """
        self._rt_hparams.update(collect_init_args(self, args, ignore))

    @property
    def hparams(self) -> AttributeDict:
        return self._rt_hparams

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str, map_location: Any = None, strict: bool = True,
                             weights_only: bool | None = None, storage_options: Mapping | None = None,
                             **kwargs: Any) -> "Module":
        """A new module from a checkpoint, as Lightning's ``load_from_checkpoint``: ``cls`` built
        from the saved hyperparameters (``kwargs`` override them; names ``__init__`` does not
        take are dropped unless it takes ``**kwargs``), ``configure_model()``, then
        ``on_load_checkpoint(checkpoint)`` (it may rename keys), then the weights. Reads a
        raytrainer checkpoint folder or a ``.ckpt`` file (raytrainer's or Lightning's), from any
        fsspec URI; ``weights_only`` as ``torch.load``'s (default True)."""
        checkpoint = read_any(checkpoint_path, map_location, weights_only, storage_options)
        model = construct_from_hparams(cls, checkpoint.get("hyper_parameters"), kwargs)
        if is_overridden("configure_model", model, Module):
            model.configure_model()
        model.on_load_checkpoint(checkpoint)
        keys = model.load_state_dict(checkpoint["state_dict"], strict=strict)
        if not strict and (keys.missing_keys or keys.unexpected_keys):
            warnings.warn(f"{cls.__name__}.load_from_checkpoint(strict=False): keys missing from the checkpoint "
                          f"{keys.missing_keys}, keys the model does not have {keys.unexpected_keys}")
        device = next((t.device for t in checkpoint["state_dict"].values() if isinstance(t, torch.Tensor)), None)
        return model.to(device) if device is not None else model

    # ------------------------------------------------------------------ run state views
    @property
    def trainer(self):
        if self._rt_trainer is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a Trainer")
        return self._rt_trainer

    @trainer.setter
    def trainer(self, trainer) -> None:
        object.__setattr__(self, "_rt_trainer", trainer)

    def _attach(self, trainer, run) -> None:
        """Called by the loop when a run starts (``run``) and ends (None): ``self.log``,
        ``self.optimizers()`` and manual optimization go to the run in progress."""
        object.__setattr__(self, "_rt_trainer", trainer)
        object.__setattr__(self, "_rt_run", run)

    def _current_run(self, what: str):
        run = self._rt_run
        if run is None:
            raise RuntimeError(f"{what} was called outside of a Trainer run")
        return run

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the module's first floating-point parameter (float32 without any)."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    @property
    def logger(self):
        """The Trainer's first logger (None without one), as Lightning's ``self.logger``; on
        ranks other than 0 there are none."""
        return self._rt_trainer.logger if self._rt_trainer is not None else None

    @property
    def loggers(self) -> list:
        return self._rt_trainer.loggers if self._rt_trainer is not None else []

    def freeze(self) -> None:
        """No gradients for any parameter, and eval mode (Lightning's ``freeze``)."""
        for p in self.parameters():
            p.requires_grad = False
        self.eval()

    def unfreeze(self) -> None:
        for p in self.parameters():
            p.requires_grad = True
        self.train()

    def all_gather(self, data: Any, group: Any = None, sync_grads: bool = False) -> Any:
        """Every rank's ``data`` (tensors, or dicts/lists of them) stacked on a new first dim of
        size world_size; unchanged in one process (Lightning's). A collective: every rank calls
        it, so not from an evaluation step (ranks may run different numbers of batches there)."""
        if group is not None:
            raise ValueError("self.all_gather(group=...) is not supported: it gathers over all ranks")
        strategy = self._rt_trainer.strategy if self._rt_trainer is not None else None
        if strategy is None or strategy.world_size == 1:
            return data
        return strategy.all_gather(data, sync_grads=sync_grads)

    @property
    def global_step(self) -> int:
        return self._rt_trainer.global_step if self._rt_trainer is not None else 0

    @property
    def current_epoch(self) -> int:
        return self._rt_trainer.current_epoch if self._rt_trainer is not None else 0

    @property
    def global_rank(self) -> int:
        return self._rt_trainer.global_rank if self._rt_trainer is not None else 0

    @property
    def local_rank(self) -> int:
        return self._rt_trainer.local_rank if self._rt_trainer is not None else 0

    @property
    def automatic_optimization(self) -> bool:
        return self._rt_automatic_optimization

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        object.__setattr__(self, "_rt_automatic_optimization", bool(value))

    # ------------------------------------------------------------------ logging
    def log(self, name: str, value: Any, prog_bar: bool = False, logger: bool = True,
            on_step: bool | None = None, on_epoch: bool | None = None, reduce_fx: Any = "mean",
            enable_graph: bool = False, sync_dist: bool = False, sync_dist_group: Any = None,
            add_dataloader_idx: bool = True, batch_size: int | None = None, metric_attribute: str | None = None,
            rank_zero_only: bool = False) -> None:
        """Record a scalar (or a torchmetrics Metric). Lightning's arguments and defaults: per step
        in training_step, per epoch in validation/test steps and epoch-end hooks. Values stay on
        the device; they are read back to the host only on logging steps and epoch ends.
        ``metric_attribute`` is accepted and not needed (a logged Metric is found by identity)."""
        run = self._rt_run  # (called every step: no helper call, no message built unless it fails)
        if run is None:
            raise RuntimeError(f"self.log({name!r}) was called outside of a Trainer run")
        if enable_graph or sync_dist_group is not None or rank_zero_only:
            _check_log_options(name, enable_graph, sync_dist, sync_dist_group, rank_zero_only)
        run.metrics.log(name, value, prog_bar=prog_bar, logger=logger, on_step=on_step, on_epoch=on_epoch,
                        reduce_fx=reduce_fx, sync_dist=sync_dist, batch_size=batch_size,
                        add_dataloader_idx=add_dataloader_idx)

    def log_dict(self, dictionary: Mapping[str, Any], **kwargs: Any) -> None:
        for k, v in dictionary.items():
            self.log(k, v, **kwargs)

    def print(self, *args: Any, **kwargs: Any) -> None:
        """print() on global rank zero only."""
        if self.global_rank == 0:
            print(*args, **kwargs)

    # ------------------------------------------------------------------ manual optimization
    def optimizers(self):
        """The optimizer(s) from configure_optimizers, wrapped so ``step()`` goes through the
        precision plugin (GradScaler) and advances ``global_step``."""
        opts = self._current_run("self.optimizers()").optimizer_handles
        return opts[0] if len(opts) == 1 else opts

    def lr_schedulers(self):
        scheds = [c.scheduler for c in self._current_run("self.lr_schedulers()").scheduler_configs]
        if not scheds:
            return None
        return scheds[0] if len(scheds) == 1 else scheds

    def toggle_optimizer(self, optimizer) -> None:
        """Only ``optimizer``'s parameters require grad (the others' flags are kept and restored
        by ``untoggle_optimizer``): a GAN's generator step leaves the discriminator's alone."""
        saved: dict = {}
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                for param in group["params"]:
                    if param not in saved:
                        saved[param] = param.requires_grad
                        param.requires_grad = False
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.requires_grad = saved[param]
        object.__setattr__(self, "_rt_requires_grad", saved)

    def untoggle_optimizer(self, optimizer) -> None:
        optimizer = getattr(optimizer, "optimizer", optimizer)  # the handle or the optimizer
        saved = getattr(self, "_rt_requires_grad", {})
        for opt in self.trainer.optimizers:
            if opt is not optimizer:
                for group in opt.param_groups:
                    for param in group["params"]:
                        if param in saved:
                            param.requires_grad = saved[param]
        object.__setattr__(self, "_rt_requires_grad", {})

    @contextlib.contextmanager
    def toggled_optimizer(self, optimizer):
        self.toggle_optimizer(optimizer)
        try:
            yield
        finally:
            self.untoggle_optimizer(optimizer)

    def manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        self._current_run("self.manual_backward()").backward(loss, *args, **kwargs)

    def clip_gradients(self, optimizer, gradient_clip_val: float | None = None,
                       gradient_clip_algorithm: str | None = None) -> None:
        self._current_run("self.clip_gradients()").clip_gradients(optimizer, gradient_clip_val,
                                                                  gradient_clip_algorithm)

    # ------------------------------------------------------------------ user-facing steps
    def training_step(self, batch: Any, batch_idx: int):  # pragma: no cover - must override
        raise NotImplementedError(f"{type(self).__name__} must implement training_step(batch, batch_idx)")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0):
        return self(batch)

    def configure_optimizers(self):  # pragma: no cover - must override
        raise NotImplementedError(f"{type(self).__name__} must implement configure_optimizers()")

    def configure_callbacks(self):
        return []

    # ------------------------------------------------------------------ hooks (no-op defaults)
    def prepare_data(self) -> None: ...
    def setup(self, stage: str) -> None: ...
    def teardown(self, stage: str) -> None: ...
    def on_fit_start(self) -> None: ...
    def on_fit_end(self) -> None: ...
    def on_train_start(self) -> None: ...
    def on_train_end(self) -> None: ...
    def on_train_epoch_start(self) -> None: ...
    def on_train_epoch_end(self) -> None: ...
    def on_train_batch_start(self, batch: Any, batch_idx: int): ...
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None: ...
    def on_validation_start(self) -> None: ...
    def on_validation_end(self) -> None: ...
    def on_validation_epoch_start(self) -> None: ...
    def on_validation_epoch_end(self) -> None: ...
    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_test_start(self) -> None: ...
    def on_test_end(self) -> None: ...
    def on_test_epoch_start(self) -> None: ...
    def on_test_epoch_end(self) -> None: ...
    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_predict_start(self) -> None: ...
    def on_predict_end(self) -> None: ...
    def on_predict_epoch_start(self) -> None: ...
    def on_predict_epoch_end(self) -> None: ...
    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_before_backward(self, loss: torch.Tensor) -> None: ...
    def on_after_backward(self) -> None: ...
    def on_before_optimizer_step(self, optimizer) -> None: ...
    def on_before_zero_grad(self, optimizer) -> None: ...
    def on_save_checkpoint(self, checkpoint: dict) -> None: ...
    def on_load_checkpoint(self, checkpoint: dict) -> None: ...
    def configure_model(self) -> None:
        """Once per process before the optimizers are configured (after ``setup``): a place to
        build layers, e.g. large ones, on the process that trains them."""

    # ---------------------------------------- hooks with Lightning's default behaviour
    # The loop always calls these; overriding one changes that part of the step, as in Lightning.
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Automatic optimization's step. ``optimizer_closure`` runs training_step, zero_grad
        and backward; it must be called (``optimizer.step(closure=...)`` does), e.g. after an LR
        warm-up has adjusted ``optimizer.param_groups``."""
        optimizer.step(closure=optimizer_closure)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        optimizer.zero_grad()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Called after the closure, before every automatic optimizer step, with the Trainer's
        ``gradient_clip_val``/``gradient_clip_algorithm`` (None when not set)."""
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def lr_scheduler_step(self, scheduler, metric: Any) -> None:
        scheduler.step() if metric is None else scheduler.step(metric)

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """The backward pass of automatic and manual optimization (``loss`` already scaled by
        the GradScaler under precision='16-mixed')."""
        loss.backward(*args, **kwargs)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return move_to_device(batch, device)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch

    def on_validation_model_zero_grad(self) -> None:
        """Before a validation inside fit (not inside an accumulation window): free the grads."""
        self.zero_grad()

    def on_validation_model_eval(self) -> None:
        self.trainer.model.eval()

    def on_validation_model_train(self) -> None:
        """Only called when overridden: otherwise each submodule's mode from before the
        validation is restored (Lightning's behaviour)."""
        self.trainer.model.train()

    def on_test_model_eval(self) -> None:
        self.trainer.model.eval()

    def on_test_model_train(self) -> None:
        self.trainer.model.train()

    def on_predict_model_eval(self) -> None:
        self.trainer.model.eval()


def takes_batch_idx(step: Any) -> bool:
    """Whether a ``*_step`` wants ``batch_idx`` (Lightning's rule: a parameter so named, a
    second positional parameter, or ``*args``); ``training_step(self, batch)`` does not."""
    spec = inspect.getfullargspec(step)
    args = spec.args[1:] if inspect.ismethod(step) or (spec.args and spec.args[0] == "self") else spec.args
    return "batch_idx" in args or spec.varargs is not None or len(args) >= 2


def is_overridden(name: str, obj: Any, base: type) -> bool:
    """True when ``obj``'s class defines ``name`` differently from ``base`` (or base lacks it)."""
    impl = getattr(type(obj), name, None)
    if impl is None:
        return False
    return impl is not getattr(base, name, None)


def construct_from_hparams(cls, saved: Mapping | None, overrides: Mapping[str, Any]):
    """``cls(**saved hparams, **overrides)`` as Lightning's loading does: overrides win, and names
    ``__init__`` does not take are dropped unless it takes ``**kwargs``."""
    init_kwargs = {**dict(saved or {}), **overrides}
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        init_kwargs = {k: v for k, v in init_kwargs.items() if k in params and k != "self"}
    return cls(**init_kwargs)


def collect_init_args(obj: Any, args: tuple, ignore: str | list[str] | None) -> dict:
    """The ``__init__`` arguments of ``obj`` read from the calling frames (see
    ``Module.save_hyperparameters``)."""
    ignore = [ignore] if isinstance(ignore, str) else list(ignore or [])
    if len(args) == 1 and isinstance(args[0], Mapping):
        values = dict(args[0])
    else:
        # Skip this function's and save_hyperparameters' frames, then walk up through the
        # super().__init__ chain of obj so a subclass's own arguments are seen too.
        frame = inspect.currentframe().f_back.f_back
        init_frames = []
        while frame is not None and frame.f_code.co_name == "__init__" and frame.f_locals.get("self") is obj:
            init_frames.append(frame)
            frame = frame.f_back
        values: dict = {}
        for fr in reversed(init_frames):  # the most derived __init__ first wins
            code = fr.f_code
            n_named = code.co_argcount + code.co_kwonlyargcount
            for n in code.co_varnames[1:n_named]:
                values.setdefault(n, fr.f_locals.get(n))
            if code.co_flags & inspect.CO_VARKEYWORDS:
                kw_name = code.co_varnames[n_named + bool(code.co_flags & inspect.CO_VARARGS)]
                for k, v in (fr.f_locals.get(kw_name) or {}).items():
                    values.setdefault(k, v)
        if args:
            missing = [a for a in args if a not in values]
            if missing:
                raise ValueError(f"save_hyperparameters: {missing} are not arguments of __init__")
            values = {a: values[a] for a in args}
    for name in ignore:
        values.pop(name, None)
    return values


def _check_log_options(name: str, enable_graph: bool, sync_dist: bool, sync_dist_group: Any,
                       rank_zero_only: bool) -> None:
    """The self.log options raytrainer does not implement: refused, never ignored."""
    if enable_graph:
        raise ValueError(f"self.log({name!r}, enable_graph=True) is not supported: logged values are detached "
                         "(keep your own reference to the tensor if you need its graph)")
    if sync_dist_group is not None:
        raise ValueError(f"self.log({name!r}, sync_dist_group=...) is not supported: sync_dist=True reduces over "
                         "all ranks")
    if rank_zero_only and sync_dist:
        raise ValueError(f"self.log({name!r}, rank_zero_only=True, sync_dist=True): a value logged on rank 0 "
                         "alone cannot be reduced across ranks; drop one of them")
