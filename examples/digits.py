"""Handwritten digits (scikit-learn's bundled 8x8 digits, no download): a small CNN trained with
2 DDP workers on an embedded local Ray, checkpointed, early-stopped, then tested.

    python examples/digits.py [--launcher local|ray] [--devices 2] [--max-epochs 15]

Expected: test accuracy >= 0.95 (seed 0), in under a minute on 2 CPU cores; in-process
(``--launcher local``) already after 8 epochs (tests/test_examples.py checks both).
"""
from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

import raytrainer as rt


class DigitsData(rt.DataModule):
    def __init__(self, batch_size: int = 64, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        from sklearn.datasets import load_digits
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
        y = torch.tensor(digits.target, dtype=torch.long)
        full = TensorDataset(x, y)
        g = torch.Generator().manual_seed(self.hparams.seed)
        self.train, self.val, self.test = random_split(full, [1257, 270, 270], generator=g)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=256)

    def test_dataloader(self):
        return DataLoader(self.test, batch_size=256)


class DigitsCNN(rt.Module):
    def __init__(self, lr: float = 3e-3, channels: int = 32, dropout: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels * 16, 10))

    def forward(self, x):
        return self.net(x)

    def _shared(self, batch):
        x, y = batch
        logits = self(x)
        return nn.functional.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()

    def training_step(self, batch, batch_idx):
        loss, acc = self._shared(batch)
        self.log("train_loss", loss, prog_bar=True, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, acc = self._shared(batch)
        self.log_dict({"val_loss": loss, "val_acc": acc}, prog_bar=True, sync_dist=True)

    def test_step(self, batch, batch_idx):
        loss, acc = self._shared(batch)
        self.log_dict({"test_loss": loss, "test_acc": acc}, sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--launcher", default="ray", choices=["ray", "local"])
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--max-epochs", type=int, default=15)
    p.add_argument("--storage-path", default="./raytrainer_runs")
    p.add_argument("--name", default="digits")
    args = p.parse_args(argv)

    # Trainer(seed=0) seeds when fit starts, after the model exists: seed its initial weights too.
    rt.seed_everything(0)
    trainer = rt.Trainer(
        launcher=args.launcher, devices=args.devices if args.launcher == "ray" else 1,
        max_epochs=args.max_epochs, seed=0, log_every_n_steps=5,
        storage_path=args.storage_path, name=args.name,
        callbacks=[rt.callbacks.ModelCheckpoint(monitor="val_acc", mode="max", save_top_k=2, save_last=True),
                   rt.callbacks.EarlyStopping(monitor="val_loss", patience=4),
                   rt.callbacks.LearningRateMonitor()],
    )
    model, data = DigitsCNN(), DigitsData()
    result = trainer.fit(model, datamodule=data, ckpt_path="last")
    test = rt.Trainer(launcher="local", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, storage_path=args.storage_path, name=args.name)
    metrics = test.test(model, datamodule=data, verbose=False)[0]
    print(f"digits: epochs={result.current_epoch} steps={result.global_step} "
          f"val_acc={result.metrics.get('val_acc', float('nan')):.4f} test_acc={metrics['test_acc']:.4f}")
    print(f"  best checkpoint: {result.best_checkpoint}\n  logs: {result.log_dir}")
    return {"fit": result, "test": metrics}


if __name__ == "__main__":
    main()
