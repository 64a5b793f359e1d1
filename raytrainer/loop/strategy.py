"""Device placement and distributed wrapping: one process, DDP, or FSDP2 (``fully_shard``).

A strategy decides how steps are called and how the state is read and written (full, or each
rank's shards); the loop and checkpoint code call it without knowing which one it is. Training
steps of a wrapped model go through a shim module whose ``forward`` calls the named step
(``training_step``, ...): DDP only syncs gradients of what runs through its ``forward``, and FSDP
only gathers the root's parameters in its ``forward`` hooks (as Lightning's module wrapper does).
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from raytrainer.checkpoint.format import check_module_state, load_module_state
from raytrainer.errors import ConfigError
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
    """One process (or DDP, below): ``module.state_dict()`` is the full state on every rank.

    Also what modules and callbacks see as ``trainer.strategy`` (Lightning's names):
    ``root_device``, ``world_size``, ``global_rank``, ``is_global_zero``, ``barrier()``,
    ``broadcast(obj, src)``, ``reduce(tensor, reduce_op)``, ``all_gather_object(obj)``."""

    sharded_checkpoint = False  # checkpoint_*_state give this rank's shards (checkpoint/sharded.py)

    def __init__(self, module: nn.Module, device: torch.device, ctx=None):
        self.module = module
        self.device = device
        self.ctx = ctx
        self.optimizers: list[torch.optim.Optimizer] = []  # set_optimizers, after configure_optimizers

    def setup(self) -> None:
        self.module.to(self.device)

    @property
    def model(self) -> nn.Module:
        """The module as the strategy wraps it (Lightning's ``trainer.model``)."""
        return getattr(self, "wrapper", None) or getattr(self, "shim", None) or self.module

    def set_optimizers(self, optimizers: list) -> None:
        self.optimizers = list(optimizers)

    def step_fn(self, name: str):
        return getattr(self.module, name)

    def no_sync(self):
        """Inside an accumulation window: no gradient communication until its last backward."""
        return nullcontext()

    def evaluation(self, shard_sizes: list[float]):
        """Around one evaluation pass; ``shard_sizes``: this rank's batches per loader (inf when
        not known), which may differ between ranks. Evaluation steps run no collective here."""
        return nullcontext()

    # ------------------------------------------------------------------ collectives (public)
    @property
    def root_device(self) -> torch.device:
        return self.device

    @property
    def world_size(self) -> int:
        return self.ctx.world_size if self.ctx is not None else 1

    @property
    def global_rank(self) -> int:
        return self.ctx.global_rank if self.ctx is not None else 0

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    def barrier(self, name: str | None = None) -> None:
        if self.ctx is not None:
            self.ctx.barrier()

    def broadcast(self, obj, src: int = 0):
        """``obj`` as rank ``src`` has it, on every rank (a collective)."""
        return self.ctx.broadcast_object(obj, src) if self.ctx is not None else obj

    def all_gather(self, data, sync_grads: bool = False):
        """Every rank's tensors (in ``data``, possibly nested in dicts/lists/tuples) stacked on a new
        first dimension (Lightning's ``strategy.all_gather``); ``sync_grads``: differentiable."""
        if self.ctx is None or self.world_size == 1:
            return data
        if isinstance(data, dict):
            return {k: self.all_gather(v, sync_grads) for k, v in data.items()}
        if isinstance(data, (list, tuple)):
            return type(data)(self.all_gather(v, sync_grads) for v in data)
        if not isinstance(data, torch.Tensor):
            data = torch.tensor(data, device=self.device)
        if sync_grads:
            from torch.distributed.nn.functional import all_gather as differentiable_all_gather
            return torch.stack(differentiable_all_gather(data.contiguous()))
        out = [torch.empty_like(data) for _ in range(self.world_size)]
        dist.all_gather(out, data.contiguous())
        return torch.stack(out)

    def all_gather_object(self, obj) -> list:
        return self.ctx.all_gather_object(obj) if self.ctx is not None else [obj]

    def reduce(self, tensor: torch.Tensor, group=None, reduce_op: str | None = "mean") -> torch.Tensor:
        """``tensor`` reduced over all ranks ("mean" | "sum" | "max" | "min"), as Lightning's."""
        if self.ctx is None or self.world_size == 1:
            return tensor
        op = (reduce_op or "mean").lower()
        op = {"avg": "mean", "add": "sum"}.get(op, op)
        if op == "mean":
            return self.ctx.all_reduce(tensor.float(), "sum") / self.world_size
        return self.ctx.all_reduce(tensor, op)

    # ------------------------------------------------------------------ state
    def model_state_dict(self) -> dict:
        return self.module.state_dict()

    def load_model_state_dict(self, state: dict) -> None:
        load_module_state(self.module, state)

    def optimizer_state_dicts(self) -> list[dict]:
        return [o.state_dict() for o in self.optimizers]

    def load_optimizer_state_dicts(self, states: list[dict]) -> None:
        for opt, sd in zip(self.optimizers, states):
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
    def __init__(self, module: nn.Module, device: torch.device, ctx=None, sync_batchnorm: bool = False):
        super().__init__(module, device, ctx)
        self.sync_batchnorm = sync_batchnorm

    def setup(self) -> None:
        from torch.nn.parallel import DistributedDataParallel
        if self.sync_batchnorm:
            _convert_sync_batchnorm(self.module, self.device)
        super().setup()
        device = self.device
        self.wrapper = DistributedDataParallel(_StepShim(self.module),
                                               device_ids=[device.index] if device.type == "cuda" else None)

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

    def __init__(self, module: nn.Module, device: torch.device, ctx=None, sharded: bool = False):
        super().__init__(module, device, ctx)
        self.sharded_checkpoint = sharded

    def setup(self) -> None:
        from torch.distributed.fsdp import fully_shard
        super().setup()
        module = self.module
        for child in module.children():
            if any(p.requires_grad for p in child.parameters()):
                fully_shard(child)
        self.shim = _StepShim(module)
        fully_shard(self.shim)

    def step_fn(self, name: str):
        return lambda *args, **kwargs: self.shim(name, *args, **kwargs)

    @contextmanager
    def no_sync(self):
        self.shim.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.shim.set_requires_gradient_sync(True)

    @contextmanager
    def evaluation(self, shard_sizes: list[float]):
        # An FSDP forward all-gathers each module's parameters: a collective per batch, which
        # would leave a rank with a batch fewer than the others (exact evaluation) waiting
        # forever. With uneven shards the parameters are gathered once for the pass and kept
        # (torch's documented recipe for evals); the price is the full parameters in memory
        # during the pass. Even shards evaluate sharded, as they train.
        if not self._uneven(shard_sizes):
            yield
            return
        from torch.distributed.fsdp import FSDPModule
        modules = [m for m in self.shim.modules() if isinstance(m, FSDPModule)]
        for m in modules:  # the same order on every rank: one all-gather each
            m.unshard()
        self.shim.set_reshard_after_forward(False)
        try:
            yield
        finally:
            for m in modules:
                # as fully_shard left them: the root keeps its parameters after forward
                m.set_reshard_after_forward(m is not self.shim, recurse=False)
                m.reshard()

    def _uneven(self, shard_sizes: list[float]) -> bool:
        unknown = 2 ** 62
        sizes = [unknown if math.isinf(n) else int(n) for n in shard_sizes]
        both = self.ctx.all_reduce(torch.tensor(sizes + [-n for n in sizes], dtype=torch.int64), "max").tolist()
        high, low = both[:len(sizes)], [-n for n in both[len(sizes):]]
        return high != low or unknown in high

    def _options(self, full: bool = True):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(full_state_dict=True, cpu_offload=True) if full else StateDictOptions()

    def model_state_dict(self) -> dict:  # a collective: every rank calls it
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(self.module, options=self._options())

    def load_model_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        check_module_state(self.module, state)
        set_model_state_dict(self.module, state, options=self._options(full=not _is_sharded(state)))

    def optimizer_state_dicts(self) -> list[dict]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        return [get_optimizer_state_dict(self.module, o, options=self._options()) for o in self.optimizers]

    def load_optimizer_state_dicts(self, states: list[dict]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        for opt, sd in zip(self.optimizers, states):
            full = not _is_sharded(sd.get("state", {}))
            set_optimizer_state_dict(self.module, opt, sd, options=self._options(full=full))

    def checkpoint_model_state(self) -> dict:  # every rank calls it (full: a gather)
        if not self.sharded_checkpoint:
            return self.model_state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(self.module, options=self._options(full=False))

    def checkpoint_optimizer_states(self) -> list[dict]:
        if not self.sharded_checkpoint:
            return self.optimizer_state_dicts()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        return [get_optimizer_state_dict(self.module, o, options=self._options(full=False))
                for o in self.optimizers]

    def shard_target(self) -> dict:
        """This rank's shards of the current state, which a sharded checkpoint is read into in
        place (with either state_dict_type: no rank materializes the full model to resume)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        options = self._options(full=False)
        return {"model": get_model_state_dict(self.module, options=options),
                "optimizers": [get_optimizer_state_dict(self.module, o, options=options)
                               for o in self.optimizers]}

    def check_shards(self, saved_model: dict, saved_optimizers: int) -> None:
        """Before a sharded load: the saved keys and full shapes (meta tensors) must fit the
        module, and the optimizer count configure_optimizers() returned."""
        check_module_state(self.module, saved_model)
        if saved_optimizers != len(self.optimizers):
            raise ValueError(f"the checkpoint has {saved_optimizers} optimizer states but "
                             f"configure_optimizers() returned {len(self.optimizers)} optimizers")


def _is_sharded(state: dict) -> bool:
    """Whether a (possibly nested) state holds DTensors: this rank's shards, not full tensors."""
    from torch.distributed.tensor import DTensor
    return any(isinstance(v, DTensor) or (isinstance(v, dict) and _is_sharded(v)) for v in state.values())


def build_strategy(name: str, module: nn.Module, device: torch.device, ctx, distributed: bool,
                   sync_batchnorm: bool = False) -> Strategy:
    """``Trainer(strategy=...)``'s name -> the strategy of one run (one process when not ``distributed``)."""
    if not distributed:
        return Strategy(module, device, ctx)
    if name == "ddp":
        return DDPStrategy(module, device, ctx, sync_batchnorm=sync_batchnorm)
    if sync_batchnorm:
        raise ValueError("Trainer(sync_batchnorm=True) is for strategy='ddp' (FSDP shards normalize per worker)")
    return FSDP2Strategy(module, device, ctx, sharded=name == "fsdp_sharded")  # "fsdp" | "fsdp_sharded"


def _convert_sync_batchnorm(module: nn.Module, device: torch.device) -> None:
    """Trainer(sync_batchnorm=True): batch statistics over every worker's batch (GPU only: torch's
    SyncBatchNorm has no CPU kernel). Converted in place, so the user's module holds them."""
    if device.type != "cuda":
        raise ValueError("Trainer(sync_batchnorm=True) needs GPU workers (torch's SyncBatchNorm runs on CUDA "
                         "only); on CPU each worker normalizes with its own batch statistics")
    for name, child in list(module.named_children()):
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)


def noting_the_batch(step, name: str, pass_batch_idx: bool = True):
    """``step`` whose exceptions carry a note saying what the batch was: ``x, y = batch`` on a
    batch of another structure fails inside user code with "not enough values to unpack" or
    "KeyError: 0", which names neither the batch nor the loader. The exception is the user's own,
    re-raised. Per step this costs one function call (the try itself is free unless it raises).
    ``pass_batch_idx=False``: a ``training_step(self, batch)`` gets the batch alone."""
    def noted(batch, batch_idx, *args):
        try:
            return step(batch, batch_idx, *args) if pass_batch_idx else step(batch, *args)
        except Exception as e:
            if hasattr(e, "add_note"):  # Python >= 3.11
                e.add_note(f"raytrainer: {name}(batch, batch_idx={batch_idx}) raised this; the batch was "
                           f"{describe_batch(batch)}. If {name} expected another structure, make the "
                           "loader yield it (a DataLoader over TensorDataset(x, y) yields [x, y]; a "
                           "dataset of dicts yields a dict of batched values)")
            raise
    return noted


def apply_determinism(deterministic: bool, benchmark: bool | None = None):
    """Turn on deterministic algorithms (and set cudnn's benchmark mode) for the run; returns a
    function restoring the old flags (process-wide torch flags must not leak into the next run
    in the same process)."""
    previous = torch.are_deterministic_algorithms_enabled()
    prev_cudnn = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    elif benchmark is not None:
        torch.backends.cudnn.benchmark = benchmark

    def restore() -> None:
        torch.use_deterministic_algorithms(previous)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev_cudnn
    return restore
