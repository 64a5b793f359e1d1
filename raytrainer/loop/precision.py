"""Precision plugins: ``"32-true"`` | ``"16-mixed"`` | ``"bf16-mixed"``.

The base does nothing (``autocast()`` is a ``nullcontext``), as Lightning Fabric's plugins do; the
loop calls the same methods whatever the precision.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")
_ALIASES = {"32": "32-true", 32: "32-true", "16": "16-mixed", 16: "16-mixed",
            "bf16": "bf16-mixed", "16-true": None, "bf16-true": None}


def normalize_precision(value) -> str:
    """Accept Lightning's short forms; raise on anything else."""
    if value in PRECISIONS:
        return value
    canonical = _ALIASES.get(value)
    if canonical is None:
        raise ValueError(f"precision={value!r} is not supported; use one of {list(PRECISIONS)}")
    return canonical


class Precision:
    """Full fp32: autocast off, plain backward and step."""

    name = "32-true"

    def autocast(self):
        return nullcontext()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The tensor backward runs on (and ``on_before_backward`` sees, as in Lightning)."""
        return loss

    def unscale(self, optimizer) -> None:
        """Make the gradients true gradients before hooks see or clip them (a no-op here)."""

    def optimizer_step(self, optimizer, closure, after_closure, automatic: bool, **kwargs: Any) -> Any:
        """``optimizer.step`` with the closure (training_step, zero_grad, backward) run inside it,
        as closure optimizers (LBFGS) need; ``after_closure`` (unscale, on_before_optimizer_step,
        clipping) runs after every call of the closure, before the update."""
        def closure_then_hooks():
            result = closure() if closure is not None else None
            after_closure()
            return result
        return optimizer.step(closure=closure_then_hooks, **kwargs)  # kwargs: the optimizer's own

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class MixedPrecision(Precision):
    """Autocast to fp16 or bf16 on ``device_type``; fp16 also scales the loss with a GradScaler."""

    def __init__(self, precision: str, device_type: str):
        self.name = precision
        self.device_type = device_type
        self.dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
        self.scaler = torch.amp.GradScaler(device_type) if precision == "16-mixed" else None

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def optimizer_step(self, optimizer, closure, after_closure, automatic: bool, **kwargs: Any) -> Any:
        if self.scaler is None:
            return super().optimizer_step(optimizer, closure, after_closure, automatic, **kwargs)
        # GradScaler cannot step with a closure: run it first, then unscale and step (Lightning's
        # order). An optimizer that calls its closure several times (LBFGS) cannot work here.
        if "LBFGS" in type(optimizer).__name__:
            raise ValueError("precision='16-mixed' cannot step an optimizer that needs a closure "
                             "(LBFGS): GradScaler does not support closures. Use '32-true' or 'bf16-mixed'")
        result = closure() if closure is not None else None
        if automatic and result is None:
            # training_step returned None at the window's end: no step (as Lightning), and no
            # unscale either, which would leave the scaler waiting for an update()
            return None
        after_closure()  # unscale first: hooks and clipping see true gradients
        out = self.scaler.step(optimizer, **kwargs)  # skips the update when gradients hold inf/NaN
        self.scaler.update()
        return out

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def build_precision(precision: str, device: torch.device) -> Precision:
    if precision == "32-true":
        return Precision()
    check_precision_supported(precision, device.type)
    return MixedPrecision(precision, device.type)


def check_precision_supported(precision: str, device_type: str) -> None:
    """Fail up front, with the fix, when this torch/device cannot run ``precision``."""
    if precision == "32-true":
        return
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    if device_type == "cuda" and precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        raise ValueError("precision='bf16-mixed' needs a GPU with bf16 support (Ampere or newer); "
                         "use precision='16-mixed' on this GPU")
    try:
        with torch.autocast(device_type, dtype=dtype):
            pass
        if precision == "16-mixed":
            torch.amp.GradScaler(device_type)
    except Exception as e:  # old torch: no CPU fp16 autocast / GradScaler("cpu")
        raise ValueError(f"precision={precision!r} is not supported on {device_type} by torch "
                         f"{torch.__version__}: {e}. Use 'bf16-mixed' or '32-true' there") from e
