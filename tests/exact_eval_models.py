"""The module and the one-process reference of the exact-evaluation tests (tests/loop/ and
tests/runtime/): a classifier that logs every kind of synced reduction and a torchmetrics
accuracy, evaluated over 101 samples (an odd size: no even split across 2 workers)."""
from __future__ import annotations

import pytest
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt

N, FEATURES, CLASSES = 101, 4, 3


def data(n: int = N, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, FEATURES, generator=g), torch.randint(0, CLASSES, (n,), generator=g))


def eval_loader(n: int = N, batch_size: int = 10) -> DataLoader:
    return DataLoader(data(n), batch_size=batch_size)


class Classifier(rt.Module):
    """Logs, in validation and test, every kind of synced reduction plus a torchmetrics accuracy
    (updated per batch, computed — and synced by torchmetrics itself — at the epoch's end)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES))
        self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=CLASSES, average="micro")
        self.seen: list[int] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = unpack(batch)
        return nn.functional.cross_entropy(self(x), y)

    def _evaluate(self, batch, prefix: str):
        x, y = unpack(batch)
        per_sample = nn.functional.cross_entropy(self(x), y, reduction="none")
        self.log(f"{prefix}_loss", per_sample.mean(), sync_dist=True)
        self.log(f"{prefix}_count", float(len(y)), reduce_fx="sum", sync_dist=True)
        self.log(f"{prefix}_max", per_sample.max(), reduce_fx="max", sync_dist=True)
        self.log(f"{prefix}_min", per_sample.min(), reduce_fx="min", sync_dist=True)
        self.acc.update(self(x), y)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self):
        self.log("val_acc", self.acc.compute())
        self.acc.reset()

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self._evaluate(batch, "test")

    def on_test_epoch_end(self):
        self.log("test_acc", self.acc.compute())
        self.acc.reset()

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return {"logits": self(unpack(batch)[0]), "rank": torch.tensor(self.global_rank)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def one_process(model: nn.Module, prefix: str, n: int = N) -> dict[str, float]:
    """What one process computes over the whole set with ``model``'s weights."""
    x, y = data(n).tensors
    with torch.no_grad():
        logits = model(x)
    per_sample = nn.functional.cross_entropy(logits, y, reduction="none")
    return {f"{prefix}_loss": per_sample.mean().item(), f"{prefix}_count": float(n),
            f"{prefix}_max": per_sample.max().item(), f"{prefix}_min": per_sample.min().item(),
            f"{prefix}_acc": (logits.argmax(1) == y).float().mean().item()}


def assert_close(got: dict, expected: dict) -> None:
    assert set(expected) <= set(got), (got, expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-5), key



def unpack(batch):
    """(x, y) of a TensorDataset batch or of a Ray Dataset's dict batch."""
    return (batch["x"], batch["y"]) if isinstance(batch, dict) else tuple(batch)


def ray_rows(n: int = N) -> list[dict]:
    """The same samples as rows of a Ray Dataset."""
    x, y = data(n).tensors
    return [{"x": x[i].tolist(), "y": int(y[i])} for i in range(n)]
