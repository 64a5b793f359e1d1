"""A training script as a user runs it under a scheduler: the same command is re-run after a
SIGTERM, and ``ckpt_path="last"`` picks up where the signal stopped it.

    python preempt_job.py STORAGE NAME MAX_STEPS PROGRESS_FILE WEIGHTS_OUT [launcher] [devices]
                          [max_failures]

Writes the global step to PROGRESS_FILE after every step (so the test knows when to signal),
the process id of every rank-1 worker to PROGRESS_FILE.rank1 (so a test can SIGTERM a worker),
and the final weights to WEIGHTS_OUT.
"""
import os
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import raytrainer as rt


class NoisyData(Dataset):
    """helpers.NoisyData, defined here: this script's classes live in __main__, which Ray pickles
    by value, so its workers need no import path to the tests folder (its job has none)."""

    def __init__(self, n=96):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 6, generator=g)
        self.y = self.x.sum(1, keepdim=True)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.01 * torch.randn(6), self.y[i]


class Net(rt.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class Progress(rt.Callback):
    """Publishes the step (rank 0) and slows training down so a signal lands mid-run."""

    def __init__(self, path, delay):
        self.path, self.delay = path, delay

    def on_train_start(self, trainer, module):
        if trainer.global_rank == 1:
            with open(self.path + ".rank1", "a") as f:
                f.write(f"{os.getpid()}\n")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.is_global_zero:
            with open(self.path, "a") as f:
                f.write(f"{trainer.global_step}\n")
        time.sleep(self.delay)


def trainer(storage, name, max_steps, launcher="local", devices=1, max_failures=0, callbacks=()):
    return rt.Trainer(max_steps=int(max_steps), seed=3, launcher=launcher, devices=devices,
                      accelerator="cpu", storage_path=storage, name=name, logger=False,
                      enable_progress_bar=False, log_every_n_steps=2, max_failures=max_failures,
                      callbacks=list(callbacks))


def loader():
    return DataLoader(NoisyData(), batch_size=8, shuffle=True)


def main():
    storage, name, max_steps, progress, weights_out = sys.argv[1:6]
    launcher = sys.argv[6] if len(sys.argv) > 6 else "local"
    devices = int(sys.argv[7]) if len(sys.argv) > 7 else 1
    max_failures = int(sys.argv[8]) if len(sys.argv) > 8 else 0
    torch.manual_seed(0)
    model = Net()
    trainer(storage, name, max_steps, launcher, devices, max_failures, [Progress(progress, 0.05)]).fit(
        model, loader(), ckpt_path="last")
    torch.save(model.state_dict(), weights_out)


if __name__ == "__main__":
    main()
