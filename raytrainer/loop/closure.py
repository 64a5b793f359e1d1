"""Automatic optimization's closure, as in Lightning: ``training_step``, then zero_grad at an
accumulation window's first batch, then backward. The module's ``optimizer_step`` hands it to
``optimizer.step(closure=...)`` at a window's last batch (so closure optimizers such as LBFGS,
which call it several times, work); inside a window the loop calls it directly.
"""
from __future__ import annotations

from typing import Any

import torch

from raytrainer.profiler import BACKWARD, FORWARD


class TrainingClosure:
    """One batch's training step, callable (``optimizer_closure``). Returns the loss backward ran
    on (divided by ``accumulate_grad_batches``, detached), or None when training_step returned None."""

    __slots__ = ("run", "batch", "batch_idx", "window_start", "outputs", "loss", "calls")

    def __init__(self, run, batch: Any, batch_idx: int):
        self.run, self.batch, self.batch_idx = run, batch, batch_idx
        # gradients are cleared at a window's first batch (Lightning's place), even without a loss
        self.window_start = batch_idx % run.accumulate_grad_batches == 0
        self.outputs: Any = None
        self.loss: torch.Tensor | None = None
        self.calls = 0

    def __call__(self) -> torch.Tensor | None:
        run = self.run
        prof = run.profiler
        with prof.region(FORWARD), run.precision.autocast():
            outputs = run.training_step(self.batch, self.batch_idx)
        self.outputs, self.calls = outputs, self.calls + 1
        loss = extract_loss(outputs)
        k = run.accumulate_grad_batches
        # Backward runs outside autocast (as torch recommends); the loss is averaged over the
        # window so k accumulated micro-batches equal one batch k times larger.
        with prof.region(BACKWARD):
            if self.window_start:
                run.zero_grad(self.batch_idx)
            if loss is None:
                self.loss = None
                return None
            run.note_loss(loss)  # checked on logging steps
            loss = loss / k if k > 1 else loss
            run.backward(loss)
        self.loss = loss.detach()
        return self.loss

    def check_called(self) -> None:
        if not self.calls:
            raise RuntimeError(f"{type(self.run.module).__name__}.optimizer_step did not call the "
                               "optimizer_closure (training_step and backward run inside it): call "
                               "optimizer.step(closure=optimizer_closure), or optimizer_closure() "
                               "on a step you skip")

    def batch_end_outputs(self) -> dict:
        """What on_train_batch_end receives, as in Lightning: a dict whose "loss" is the loss
        backward ran on, detached (a returned tensor becomes {"loss": ...}; None becomes {}); a
        returned dict's other entries as they were."""
        outputs = self.outputs
        if outputs is None:
            return {}
        if isinstance(outputs, torch.Tensor):
            return {"loss": self.loss}
        return {**outputs, "loss": self.loss}


def extract_loss(outputs: Any) -> torch.Tensor | None:
    if outputs is None:
        return None
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if isinstance(outputs, dict) and "loss" not in outputs:
        raise ValueError(f"training_step returned a dict without a 'loss' key (keys: {sorted(outputs)}); "
                         "return the loss tensor, a dict with 'loss', or None to skip the batch")
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"training_step returned {type(loss).__name__}; return the loss tensor, "
                        "a dict with 'loss', or None to skip the batch")
    if loss.numel() != 1:
        raise ValueError(f"training_step's loss has shape {tuple(loss.shape)}; it must be a scalar "
                         "(reduce it with .mean() or .sum())")
    if not loss.requires_grad:
        raise ValueError("training_step's loss does not require grad (was it detached, computed "
                         "under torch.no_grad(), or from a module without trainable parameters?); "
                         "return the loss tensor itself, computed from the module's parameters")
    return loss
