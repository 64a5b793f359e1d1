"""Tiny module and data for the sweep tests (imported by Tune trial actors too)."""
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt


class RegData(rt.DataModule):
    def __init__(self, n: int = 256):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.hparams.n, 8, generator=g)
        self.ds = TensorDataset(x, x @ torch.arange(8.0).unsqueeze(1) / 8)

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=32, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.ds, batch_size=128)


class Reg(rt.Module):
    def __init__(self, lr: float = 1e-3, start_log: str | None = None, val_delay: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(8, 1)

    def on_fit_start(self):
        if self.hparams.start_log:  # one line per trial (re)start: resume must not re-run finished trials
            with open(self.hparams.start_log, "a") as f:
                f.write(f"{self.hparams.lr}\n")

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0 and self.hparams.val_delay:
            time.sleep(self.hparams.val_delay)  # long enough for concurrent trials to overlap
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        if self.hparams.lr <= 0:
            raise ValueError(f"bad learning rate {self.hparams.lr}")  # an errored trial
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
