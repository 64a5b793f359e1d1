"""Run by tests/runtime/test_driver_bar.py in its own process, as a user's script would run: Ray
started by the script's own ``ray.init``, then a 2-worker fit with the default progress bar and
model summary, and a worker that prints. Prints ``final <metrics>`` at the end.

    driver_bar_job.py STORAGE
"""
import sys
import time

import ray
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt


class Net(rt.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        time.sleep(0.03)  # epochs of ~1 s: the driver's bar redraws during them
        loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_train_start(self):
        print(f"hello from rank {self.global_rank}", flush=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


if __name__ == "__main__":
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4, generator=g)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    result = rt.Trainer(devices=2, max_epochs=2, storage_path=sys.argv[1], logger=False, enable_checkpointing=False,
                        log_every_n_steps=1).fit(Net(), loader)
    print("final", {k: round(v, 6) for k, v in result.metrics.items()}, flush=True)
