"""LearningRateMonitor side by side with Lightning's: the same rows (names, values, steps) for
step and epoch schedulers, momentum and weight decay, several optimizers and parameter groups."""
from __future__ import annotations

import pytest
import torch
from helpers import make_trainer
from row_loggers import row_loggers
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt

pl = pytest.importorskip("pytorch_lightning")
pytestmark = pytest.mark.timeout(120)


RtRows, PlRows = row_loggers(pl, keep=lambda key: key.startswith(("lr-", "sched")), digits=8)


class Scheduled:
    def __init__(self, interval="step", momentum=0.9, two=False):
        super().__init__()
        torch.manual_seed(0)
        self.layer, self.other = nn.Linear(2, 1), nn.Linear(2, 1)
        self.interval, self.momentum, self.two = interval, momentum, two
        if two:
            self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self.layer(batch[0]) + self.other(batch[0]), batch[1])
        if not self.two:
            return loss
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self):
        if self.two:  # two SGDs (one with two named/unnamed groups) and an Adam with a named scheduler
            sgd = torch.optim.SGD([{"params": self.layer.parameters(), "lr": 0.1},
                                   {"params": self.other.parameters(), "lr": 0.2}], momentum=self.momentum)
            sgd2 = torch.optim.SGD(self.other.parameters(), lr=0.3, weight_decay=0.01)
            adam = torch.optim.Adam(self.layer.parameters(), lr=0.01)
            sched = {"scheduler": torch.optim.lr_scheduler.StepLR(adam, 1, 0.5), "name": "sched-adam"}
            return [sgd, sgd2, adam], [sched]
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=self.momentum, weight_decay=0.001)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5),
                                                    "interval": self.interval}}


def _rows(monitor_kwargs, max_epochs=2, log_every_n_steps=2, **module_kwargs):
    out = []
    for base, monitor, rows in ((rt.Module, rt.callbacks.LearningRateMonitor, RtRows),
                                (pl.LightningModule, pl.callbacks.LearningRateMonitor, PlRows)):
        module = type("M", (Scheduled, base), {})(**module_kwargs)
        logger = rows()
        kwargs = dict(max_epochs=max_epochs, log_every_n_steps=log_every_n_steps, logger=logger,
                      callbacks=[monitor(**monitor_kwargs)])
        g = torch.Generator().manual_seed(0)
        train = DataLoader(TensorDataset(torch.randn(10, 2, generator=g), torch.randn(10, 1, generator=g)), batch_size=2)
        if base is rt.Module:
            make_trainer(_rows.tmp, **kwargs).fit(module, train)
        else:
            pl.Trainer(accelerator="cpu", enable_progress_bar=False, enable_checkpointing=False,
                       enable_model_summary=False, default_root_dir=str(_rows.tmp), **kwargs).fit(module, train)
        out.append(logger.rows)
    return out


@pytest.fixture(autouse=True)
def _tmp(tmp_path):
    _rows.tmp = tmp_path


@pytest.mark.parametrize("interval, monitor_kwargs", [
    ("step", {}), ("epoch", {}), ("step", {"logging_interval": "epoch"}),
    ("epoch", {"logging_interval": "step", "log_momentum": True, "log_weight_decay": True}),
])
def test_rows_are_lightnings(interval, monitor_kwargs):
    ours, theirs = _rows(monitor_kwargs, interval=interval)
    assert ours == theirs and ours


def test_several_optimizers_and_groups_are_named_as_lightning_names_them():
    ours, theirs = _rows({"log_momentum": True, "log_weight_decay": True}, max_epochs=1, log_every_n_steps=1, two=True)
    assert ours == theirs
    assert {"lr-SGD/pg1", "lr-SGD/pg2", "lr-SGD-1", "sched-adam"} <= set(ours[0][1])
