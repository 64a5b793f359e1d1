"""Device placement and distributed wrapping: one process, DDP, or FSDP2 (``fully_shard``).

A strategy decides how steps are called and how the state is read and written (full, or each
rank's shards); the loop and checkpoint code call it without knowing which one it is. Training
steps of a wrapped model go through a shim module whose ``forward`` calls the named step
(``training_step``, ...): DDP only syncs gradients of what runs through its ``forward``, and FSDP
only gathers the root's parameters in its ``forward`` hooks (as Lightning's module wrapper does).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from raytrainer import checkpoint as ckpt_io
from raytrainer.utilities import describe_batch


STATE_DICT_TYPES = ("full", "sharded")


@dataclass(frozen=True)
class FSDPStrategy:
    """``Trainer(strategy=rt.FSDPStrategy(state_dict_type="sharded"))``, as Lightning's.

    ``"full"`` (the default, ``strategy="fsdp"``): checkpoints hold the full state, gathered to
    rank 0 on CPU; they load anywhere, but rank 0 must hold the whole model and optimizer state.
    ``"sharded"`` (``strategy="fsdp_sharded"``, the string form for YAML): every rank writes its
    own shards with torch.distributed.checkpoint and nothing is gathered (sharded_checkpoint.py);
    they load on any world size, or as a full state dict in one process. The Trainer keeps the
    string form (``cfg.strategy``); with one device nothing is sharded and checkpoints are full.
    """
    state_dict_type: str = "full"

    def __post_init__(self) -> None:
        if self.state_dict_type not in STATE_DICT_TYPES:
            from raytrainer.config import ConfigError
            raise ConfigError(f"FSDPStrategy(state_dict_type={self.state_dict_type!r}) is invalid: expected "
                              f"one of {list(STATE_DICT_TYPES)}")

    @property
    def name(self) -> str:
        return "fsdp" if self.state_dict_type == "full" else "fsdp_sharded"


class _StepShim(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, step_name: str, *args, **kwargs):
        return getattr(self.module, step_name)(*args, **kwargs)


class Strategy:
    """One process (or DDP, below): ``module.state_dict()`` is the full state on every rank."""

    sharded_checkpoint = False  # checkpoint_*_state give this rank's shards (sharded_checkpoint.py)

    def __init__(self, run):
        self.run = run

    def setup(self) -> None:
        self.run.module.to(self.run.device)

    def step_fn(self, name: str):
        return getattr(self.run.module, name)

    def no_sync(self):
        """Inside an accumulation window: no gradient communication until its last backward."""
        return nullcontext()

    def model_state_dict(self) -> dict:
        return self.run.module.state_dict()

    def load_model_state_dict(self, state: dict) -> None:
        ckpt_io.load_module_state(self.run.module, state)

    def optimizer_state_dicts(self) -> list[dict]:
        return [o.state_dict() for o in self.run.optimizers]

    def load_optimizer_state_dicts(self, states: list[dict]) -> None:
        for opt, sd in zip(self.run.optimizers, states):
            opt.load_state_dict(sd)

    # What a checkpoint holds: the full state here; each rank's shards with sharded_checkpoint.
    def checkpoint_model_state(self) -> dict:
        return self.model_state_dict()

    def checkpoint_optimizer_states(self) -> list[dict]:
        return self.optimizer_state_dicts()

    def shard_target(self) -> dict | None:
        """Where a sharded checkpoint loads in place on every rank; None: as full tensors."""
        return None


class DDPStrategy(Strategy):
    def setup(self) -> None:
        from torch.nn.parallel import DistributedDataParallel
        super().setup()
        device = self.run.device
        self.wrapper = DistributedDataParallel(_StepShim(self.run.module),
                                               device_ids=[device.index] if device.type == "cuda" else None)
        self.run.model = self.wrapper

    def step_fn(self, name: str):
        if name != "training_step":
            return super().step_fn(name)  # evaluation needs no gradient sync
        return lambda *args, **kwargs: self.wrapper(name, *args, **kwargs)

    def no_sync(self):
        return self.wrapper.no_sync()


class FSDP2Strategy(Strategy):
    """FSDP2: every direct child with parameters is sharded, then the root. Checkpoints hold the
    full (unsharded) state gathered to CPU, or with ``sharded`` each rank's shards (DCP); both load
    on any world size or strategy. ``model_state_dict()`` is always the full state (the weights
    handed back to the caller after fit)."""

    def __init__(self, run, sharded: bool = False):
        super().__init__(run)
        self.sharded_checkpoint = sharded

    def setup(self) -> None:
        from torch.distributed.fsdp import fully_shard
        super().setup()
        module = self.run.module
        for child in module.children():
            if any(p.requires_grad for p in child.parameters()):
                fully_shard(child)
        self.shim = _StepShim(module)
        fully_shard(self.shim)
        self.run.model = self.shim

    def step_fn(self, name: str):
        return lambda *args, **kwargs: self.shim(name, *args, **kwargs)

    @contextmanager
    def no_sync(self):
        self.shim.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.shim.set_requires_gradient_sync(True)

    def _options(self, full: bool = True):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(full_state_dict=True, cpu_offload=True) if full else StateDictOptions()

    def model_state_dict(self) -> dict:  # a collective: every rank calls it
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(self.run.module, options=self._options())

    def load_model_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        ckpt_io.check_module_state(self.run.module, state)
        set_model_state_dict(self.run.module, state, options=self._options(full=not _is_sharded(state)))

    def optimizer_state_dicts(self) -> list[dict]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        return [get_optimizer_state_dict(self.run.module, o, options=self._options()) for o in self.run.optimizers]

    def load_optimizer_state_dicts(self, states: list[dict]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        for opt, sd in zip(self.run.optimizers, states):
            full = not _is_sharded(sd.get("state", {}))
            set_optimizer_state_dict(self.run.module, opt, sd, options=self._options(full=full))

    def checkpoint_model_state(self) -> dict:  # every rank calls it (full: a gather)
        if not self.sharded_checkpoint:
            return self.model_state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(self.run.module, options=self._options(full=False))

    def checkpoint_optimizer_states(self) -> list[dict]:
        if not self.sharded_checkpoint:
            return self.optimizer_state_dicts()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        return [get_optimizer_state_dict(self.run.module, o, options=self._options(full=False))
                for o in self.run.optimizers]

    def shard_target(self) -> dict:
        """This rank's shards of the current state, which a sharded checkpoint is read into in
        place (with either state_dict_type: no rank materializes the full model to resume)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        options = self._options(full=False)
        return {"model": get_model_state_dict(self.run.module, options=options),
                "optimizers": [get_optimizer_state_dict(self.run.module, o, options=options)
                               for o in self.run.optimizers]}

    def check_shards(self, saved_model: dict, saved_optimizers: int) -> None:
        """Before a sharded load: the saved keys and full shapes (meta tensors) must fit the
        module, and the optimizer count configure_optimizers() returned."""
        ckpt_io.check_module_state(self.run.module, saved_model)
        if saved_optimizers != len(self.run.optimizers):
            raise ValueError(f"the checkpoint has {saved_optimizers} optimizer states but "
                             f"configure_optimizers() returned {len(self.run.optimizers)} optimizers")


def _is_sharded(state: dict) -> bool:
    """Whether a (possibly nested) state holds DTensors: this rank's shards, not full tensors."""
    from torch.distributed.tensor import DTensor
    return any(isinstance(v, DTensor) or (isinstance(v, dict) and _is_sharded(v)) for v in state.values())


def setup_strategy(run) -> None:
    distributed = run.ctx.world_size > 1 and run.stage == "fit"
    if not distributed:
        run.strategy = Strategy(run)
    elif run.cfg.strategy == "ddp":
        run.strategy = DDPStrategy(run)
    else:  # "fsdp" | "fsdp_sharded"
        run.strategy = FSDP2Strategy(run, sharded=run.cfg.strategy == "fsdp_sharded")
    run.strategy.setup()
    run.training_forward = _noting_the_batch(run.strategy.step_fn("training_step"), "training_step")
    run.no_sync = run.strategy.no_sync


def _noting_the_batch(step, name: str):
    """``step`` whose exceptions carry a note saying what the batch was: ``x, y = batch`` on a
    batch of another structure fails inside user code with "not enough values to unpack" or
    "KeyError: 0", which names neither the batch nor the loader. The exception is the user's own,
    re-raised. Per step this costs one function call (the try itself is free unless it raises)."""
    def noted(batch, batch_idx, *args):
        try:
            return step(batch, batch_idx, *args)
        except Exception as e:
            if hasattr(e, "add_note"):  # Python >= 3.11
                e.add_note(f"raytrainer: {name}(batch, batch_idx={batch_idx}) raised this; the batch was "
                           f"{describe_batch(batch)}. If {name} expected another structure, make the "
                           "loader yield it (a DataLoader over TensorDataset(x, y) yields [x, y]; a "
                           "dataset of dicts yields a dict of batched values)")
            raise
    return noted


def apply_determinism(deterministic: bool):
    """Turn on deterministic algorithms for the run; returns a function restoring the old mode
    (process-wide torch flags must not leak into the next run in the same process)."""
    if not deterministic:
        return lambda: None
    previous = torch.are_deterministic_algorithms_enabled()
    prev_cudnn = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True

    def restore() -> None:
        torch.use_deterministic_algorithms(previous)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev_cudnn
    return restore
