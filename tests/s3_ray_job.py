"""Run by tests/test_ray_s3.py in its own process, so its embedded Ray starts with the standard
AWS variables already set (as a user's shell would): a 2-worker Ray fit and a 2-trial sweep, both
on s3://. argv: s3 prefix. Prints one JSON line."""
import json
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt
from sweep_models import Reg, RegData

prefix = sys.argv[1]
g = torch.Generator().manual_seed(0)
x = torch.randn(64, 8, generator=g)
data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True)
fit = rt.Trainer(devices=2, max_epochs=2, storage_path=prefix, name="ray-fit", enable_progress_bar=False,
                 callbacks=[rt.callbacks.ModelCheckpoint(save_last=True)]).fit(Reg(lr=0.01), data)
swept = rt.sweep(Reg, RegData(), rt.Trainer(max_epochs=2, storage_path=prefix, name="sweep"),
                 search_space={"lr": rt.tune.grid_search([1e-2, 3e-2])}, metric="val_loss",
                 scheduler="fifo", verbose=False)
print(json.dumps({"fit_last": fit.last_checkpoint, "fit_step": fit.global_step,
                  "trials": [[t.status, t.checkpoint] for t in swept.trials],
                  "best": swept.best.checkpoint}))
