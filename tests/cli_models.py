"""Tiny classes for the CLI tests, importable by class_path (``cli_models.TinyRegressor``; tests/ is
on sys.path through conftest.py). CPU-only, deterministic, a fit takes well under a second."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

import raytrainer as rt
from helpers import dataset


class TinyRegressor(rt.Module):
    def __init__(self, lr: float = 0.1, hidden: int = 4, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x)

    def _loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._loss(batch))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class TinyData(rt.DataModule):
    def __init__(self, n: int = 16, batch_size: int = 4, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()

    def _loader(self, seed_offset: int):
        return DataLoader(dataset(self.hparams.n, seed=self.hparams.seed + seed_offset),
                          batch_size=self.hparams.batch_size)

    def train_dataloader(self):
        return self._loader(0)

    def val_dataloader(self):
        return self._loader(1)

    def test_dataloader(self):
        return self._loader(2)

    def predict_dataloader(self):
        return self._loader(3)


class NeedsWidth(TinyRegressor):
    """A required init argument (no default)."""

    def __init__(self, width: int, lr: float = 0.1):
        super().__init__(lr=lr, hidden=width)


class RejectsWidth(TinyRegressor):
    """Raises in __init__, as a model validating its own arguments does."""

    def __init__(self, width: int = -1):
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        super().__init__(hidden=width)


NOT_A_CLASS = 42
