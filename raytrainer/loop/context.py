"""RunContext: everything the loop needs to know about where it runs.

In-process, inside Ray Train workers, or inside a Tune trial, the loop is the same; only the
context differs (rank, world size, device, collectives, reporting, a restart's checkpoint). This
is the only seam between the loop and a runtime: every runtime implements ``RunContext``
(``LocalContext`` here; ``runtime/ray_context.py``; ``tune/trial.py``), and the loop never imports
ray.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.distributed as dist

from raytrainer.loop.preemption import STOP


class RunContext(ABC):
    """Where one process of a run stands, and how it talks to the others."""

    world_size: int
    global_rank: int
    local_rank: int
    node_rank: int
    device: torch.device
    # Where rank 0's progress bar sends its state when another process draws it (the driver of a
    # Ray fit: callbacks/progress.py); None: it draws here.
    progress_sink = None

    @abstractmethod
    def barrier(self) -> None: ...

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Return the reduction ("sum" | "max" | "min") of ``tensor`` over all ranks."""

    @abstractmethod
    def broadcast_object(self, obj: Any, src: int = 0) -> Any: ...

    @abstractmethod
    def all_gather_object(self, obj: Any) -> list[Any]: ...

    @abstractmethod
    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        """Tell the runtime about progress: called at validations and checkpoint commits."""

    @abstractmethod
    def restart_checkpoint(self) -> str | None:
        """After the runtime restarted this run's workers (a failure, a preemption): the newest
        checkpoint this fit committed, which wins over the checkpoint the fit started from."""

    @abstractmethod
    def poll_stop(self, global_step: int, epoch_end: bool) -> tuple[str, str] | None:
        """At every checkpoint boundary: ``(action, reason)`` when the run must stop or
        checkpoint now (loop/preemption.py), the same on every rank; else None."""


class LocalContext(RunContext):
    """One process, one device: collectives are identities; a signal's stop flag is read here."""

    world_size = 1
    global_rank = 0
    local_rank = 0
    node_rank = 0

    def __init__(self, device: torch.device, stop_flag=None):
        self.device = device
        self.stop_flag = stop_flag  # set by a SIGTERM/SIGINT handler (runtime/signals.py)

    def barrier(self) -> None:
        pass

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        pass

    def restart_checkpoint(self) -> str | None:
        return None  # nothing restarts a process in this one

    def poll_stop(self, global_step: int, epoch_end: bool) -> tuple[str, str] | None:
        if self.stop_flag is None or self.stop_flag.reason is None:
            return None
        return STOP, self.stop_flag.reason


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class ProcessGroupContext(RunContext):
    """Collectives through torch.distributed's default process group (set up by the runtime:
    Ray Train, or a test's own gloo group); identities when there is none."""

    def _group_ready(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self._group_ready():
            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if not self._group_ready():
            return tensor
        out = tensor.detach().clone()
        if dist.get_backend() == "nccl" and out.device.type != "cuda":
            out = out.to(self.device)
        dist.all_reduce(out, op=_REDUCE_OPS[op])
        return out.to(tensor.device)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self._group_ready():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self._group_ready():
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def resolve_device(accelerator: str, local_rank: int = 0) -> torch.device:
    """``accelerator`` ("cpu" | "gpu" | "auto") to this process's device."""
    if accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("accelerator='gpu' but torch sees no CUDA device here; "
                               "use accelerator='cpu' or 'auto'")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")
