"""ModelSummary: a table of the module's layers and parameter counts at fit start (Lightning's,
on by default: ``Trainer(enable_model_summary=True)``), logged once on global rank 0 to the
``raytrainer.summary`` logger. ``summarize(module, max_depth)`` returns the numbers as an object
with Lightning's attribute names (``layer_names``, ``param_nums``, ``total_parameters``...).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from torch import nn

from raytrainer.callbacks.base import Callback

log = logging.getLogger("raytrainer.summary")

_BITS = {"32-true": 32, "16-mixed": 16, "bf16-mixed": 16}  # Lightning sizes mixed precision at 16 bits


@dataclass
class Summary:
    layer_names: list[str]
    layer_types: list[str]
    param_nums: list[int]
    training_modes: list[bool]
    total_parameters: int
    trainable_parameters: int
    model_size: float                  # MB of parameters at the run's precision
    total_training_modes: dict[str, int]

    def table(self) -> str:
        cols = [("", [str(i) for i in range(len(self.layer_names))]), ("Name", self.layer_names),
                ("Type", self.layer_types), ("Params", [readable_count(n) for n in self.param_nums]),
                ("Mode", ["train" if t else "eval" for t in self.training_modes])]
        widths = [max([len(h)] + [len(v) for v in values]) for h, values in cols]
        rule = "-" * (sum(widths) + 3 * len(cols))
        lines = [" | ".join(h.ljust(w) for (h, _), w in zip(cols, widths)), rule]
        lines += [" | ".join(values[i].ljust(w) for (_, values), w in zip(cols, widths))
                  for i in range(len(self.layer_names))]
        lines.append(rule)
        for value, label in ((readable_count(self.trainable_parameters), "Trainable params"),
                             (readable_count(self.total_parameters - self.trainable_parameters), "Non-trainable params"),
                             (readable_count(self.total_parameters), "Total params"),
                             (f"{self.model_size:,.3f}", "Total estimated model params size (MB)"),
                             (str(self.total_training_modes["train"]), "Modules in train mode"),
                             (str(self.total_training_modes["eval"]), "Modules in eval mode")):
            lines.append(value.ljust(10) + label)
        return "\n".join(lines)


def summarize(module: nn.Module, max_depth: int = 1, precision: str = "32-true") -> Summary:
    if max_depth == 0:
        layers = []
    elif max_depth == 1:
        layers = list(module.named_children())
    else:
        layers = [(n, m) for n, m in list(module.named_modules())[1:] if max_depth < 0 or n.count(".") < max_depth]
    params = list(module.parameters())
    total = sum(p.numel() for p in params)
    modes = [m.training for m in list(module.modules())[1:]]
    return Summary(
        layer_names=[n for n, _ in layers], layer_types=[type(m).__name__ for _, m in layers],
        param_nums=[sum(p.numel() for p in m.parameters()) for _, m in layers],
        training_modes=[m.training for _, m in layers], total_parameters=total,
        trainable_parameters=sum(p.numel() for p in params if p.requires_grad),
        model_size=total * _BITS.get(precision, 32) / 8 * 1e-6,
        total_training_modes={"train": modes.count(True), "eval": modes.count(False)})


def readable_count(number: int) -> str:
    """Lightning's abbreviation: 123 -> '123  ', 1234 -> '1.2 K', 2e6 -> '2.0 M'."""
    labels = [" ", "K", "M", "B", "T"]
    digits = int(math.floor(math.log10(number)) + 1) if number > 0 else 1
    groups = min(int(math.ceil(digits / 3)), len(labels))
    scaled = number * 10 ** (-3 * (groups - 1))
    if groups == 1 or scaled >= 100:
        return f"{int(scaled):,d} {labels[groups - 1]}"
    return f"{scaled:,.1f} {labels[groups - 1]}"


class ModelSummary(Callback):
    """The summary table at fit start, on global rank 0 (``max_depth``: 1 = the module's children,
    -1 = every submodule, 0 = totals only)."""

    rank_zero_only = True

    def __init__(self, max_depth: int = 1):
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < -1:
            raise ValueError(f"ModelSummary(max_depth={max_depth!r}) is invalid: expected -1, 0 or an int >= 1")
        self.max_depth = max_depth
        self.summary: Summary | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.summary = summarize(pl_module, self.max_depth, trainer.precision)
        if trainer.progress_sink is not None:  # a Ray worker: the driver logs it, where the user looks
            trainer.progress_sink({"log": "\n" + self.summary.table(), "logger": log.name})
        else:
            log.info("\n%s", self.summary.table())
