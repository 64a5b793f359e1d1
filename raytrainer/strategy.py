"""Device placement and distributed wrapping (DDP; FSDP with the Ray launcher).

Training forwards go through ``run.training_forward``: the module's ``training_step`` itself in
one process, or a DDP-wrapped shim whose ``forward`` calls ``training_step`` (DDP only syncs
gradients of what runs through its ``forward``, as in Lightning's module wrapper).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn


class _TrainingStepShim(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module.training_step(*args, **kwargs)


def setup_strategy(run) -> None:
    module = run.module
    module.to(run.device)
    run.training_forward = module.training_step
    run.no_sync = nullcontext
    if run.ctx.world_size == 1 or run.stage != "fit":
        return
    if run.cfg.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        wrapper = DistributedDataParallel(_TrainingStepShim(module), device_ids=device_ids)
        run.model = wrapper
        run.training_forward = wrapper
        run.no_sync = wrapper.no_sync
    else:
        raise NotImplementedError("strategy='fsdp' is not available yet; use strategy='ddp'")


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
