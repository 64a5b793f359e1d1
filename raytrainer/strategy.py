"""Device placement and distributed wrapping: one process, DDP, or FSDP2 (``fully_shard``).

A strategy decides how steps are called and how the full state is read and written; the loop and
checkpoint code call it without knowing which one it is. Training steps of a wrapped model go
through a shim module whose ``forward`` calls the named step (``training_step``, ...): DDP only
syncs gradients of what runs through its ``forward``, and FSDP only gathers the root's parameters
in its ``forward`` hooks (as Lightning's module wrapper does).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from raytrainer import checkpoint as ckpt_io
from raytrainer.utilities import describe_batch


class _StepShim(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, step_name: str, *args, **kwargs):
        return getattr(self.module, step_name)(*args, **kwargs)


class Strategy:
    """One process (or DDP, below): ``module.state_dict()`` is the full state on every rank."""

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


class FSDPStrategy(Strategy):
    """FSDP2: every direct child with parameters is sharded, then the root; checkpoints hold the
    full (unsharded) state gathered to CPU, so they load on any world size or strategy."""

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

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def model_state_dict(self) -> dict:  # a collective: every rank calls it
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(self.run.module, options=self._options())

    def load_model_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        ckpt_io.check_module_state(self.run.module, state)
        set_model_state_dict(self.run.module, state, options=StateDictOptions(full_state_dict=True))

    def optimizer_state_dicts(self) -> list[dict]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        return [get_optimizer_state_dict(self.run.module, o, options=self._options()) for o in self.run.optimizers]

    def load_optimizer_state_dicts(self, states: list[dict]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        for opt, sd in zip(self.run.optimizers, states):
            set_optimizer_state_dict(self.run.module, opt, sd, options=StateDictOptions(full_state_dict=True))


def setup_strategy(run) -> None:
    distributed = run.ctx.world_size > 1 and run.stage == "fit"
    if not distributed:
        cls = Strategy
    else:
        cls = DDPStrategy if run.cfg.strategy == "ddp" else FSDPStrategy
    run.strategy = cls(run)
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
