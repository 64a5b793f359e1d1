"""Tiny modules, data and readers shared by the in-process behaviour tests.

A plain module (not a conftest): tests import what they use with ``from helpers import ...``.
Everything here is CPU-only, deterministic and small enough for a fit to take well under a second.
"""
from __future__ import annotations

import csv
import os
import pathlib

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import raytrainer as rt

TESTS_DIR = pathlib.Path(__file__).resolve().parent  # the support modules (helpers, *_job.py) live here
REPO = TESTS_DIR.parent


# ---------------------------------------------------------------- data

def dataset(n: int = 10, features: int = 2, seed: int = 0, scale: float = 1.0) -> TensorDataset:
    """``n`` samples of ``y = x @ w + noise`` (one target column)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = x.sum(dim=1, keepdim=True) * scale + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


class NoisyData(Dataset):
    """``n`` samples of ``y = sum(x)`` whose inputs get augmentation noise from the *global* torch
    RNG at load time: a resume must keep data loading drawing from the RNG in the same order."""

    def __init__(self, n: int = 80, features: int = 6, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, features, generator=g)
        self.y = self.x.sum(1, keepdim=True)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.01 * torch.randn(self.x.shape[1]), self.y[i]


def loader(n: int = 10, batch_size: int = 4, shuffle: bool = False, features: int = 2, seed: int = 0,
           scale: float = 1.0) -> DataLoader:
    return DataLoader(dataset(n, features, seed, scale), batch_size=batch_size, shuffle=shuffle)


def tensors(dl: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole (x, y) of a TensorDataset loader."""
    return dl.dataset.tensors


# ---------------------------------------------------------------- trainer

def make_trainer(tmp_path, **kwargs) -> rt.Trainer:
    """An in-process Trainer writing under ``tmp_path``; no loggers, checkpoints, sanity check or
    model summary unless asked (tests/loop/test_lightning_trainer_args.py covers those)."""
    kwargs.setdefault("max_epochs", 1)
    kwargs.setdefault("num_sanity_val_steps", 0)
    kwargs.setdefault("enable_model_summary", False)
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("name", "run")
    return rt.Trainer(launcher="local", storage_path=str(tmp_path), enable_progress_bar=False,
                      accelerator="cpu", **kwargs)


# ---------------------------------------------------------------- modules

class LinearModel(rt.Module):
    """``nn.Linear(features, 1)`` regressor with MSE; counts its step calls.

    Logs ``train_loss`` (per step) in training_step and ``val_loss`` / ``test_loss`` in the
    evaluation steps. ``optimizer_factory(params)`` builds the optimizer (SGD(lr) by default).
    """

    def __init__(self, features: int = 2, lr: float = 0.1, seed: int = 0, optimizer_factory=None):
        super().__init__()
        torch.manual_seed(seed)
        self.layer = nn.Linear(features, 1)
        self.lr = lr
        self.optimizer_factory = optimizer_factory
        self.train_calls = 0
        self.val_calls = 0
        self.test_calls = 0
        self.train_batch_sizes: list[int] = []
        self.val_runs: list[tuple[int, int]] = []  # (current_epoch, global_step) at each validation

    def forward(self, x):
        return self.layer(x)

    def loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def training_step(self, batch, batch_idx):
        self.train_calls += 1
        self.train_batch_sizes.append(len(batch[0]))
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.val_calls += 1
        self.log("val_loss", self.loss(batch))

    def on_validation_start(self):
        self.val_runs.append((self.current_epoch, self.global_step))

    def test_step(self, batch, batch_idx):
        self.test_calls += 1
        self.log("test_loss", self.loss(batch))

    def configure_optimizers(self):
        if self.optimizer_factory is not None:
            return self.optimizer_factory(self.parameters())
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ScriptedValModel(LinearModel):
    """Logs ``val_loss`` (or ``metric``) = ``values[current_epoch]`` in every validation step, so
    the epoch value is exactly the scripted one."""

    def __init__(self, values, metric: str = "val_loss", **kwargs):
        super().__init__(**kwargs)
        self.values = list(values)
        self.metric = metric

    def validation_step(self, batch, batch_idx):
        self.val_calls += 1
        self.log(self.metric, float(self.values[self.current_epoch]))


class SpySGD(torch.optim.SGD):
    """SGD that records every ``step`` and the gradients it stepped with (after clipping)."""

    def __init__(self, params, lr: float = 0.1, **kwargs):
        super().__init__(params, lr=lr, **kwargs)
        self.steps = 0
        self.grads: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        # The closure (training_step, backward, clipping) runs inside step, as in Lightning
        loss = None if closure is None else torch.enable_grad()(closure)()
        self.steps += 1
        self.grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                           if p.grad is not None])
        super().step()
        return loss


class GradsBeforeStep(rt.Callback):
    """Records the gradients seen in on_before_optimizer_step (before clipping)."""

    def __init__(self):
        self.grads: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]
                           if p.grad is not None])


class LrRecorder(rt.Callback):
    """The first param group's lr at every train batch start and every epoch start."""

    def __init__(self):
        self.batch_lrs: list[float] = []
        self.epoch_lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def flat_params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


# ---------------------------------------------------------------- readers

def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def csv_path(trainer: rt.Trainer) -> str:
    return os.path.join(trainer.run_dir, "csv", "metrics.csv")


def csv_column(rows, column: str) -> list[tuple[int, float]]:
    """``(step, value)`` for every row where ``column`` has a value."""
    return [(int(r["step"]), float(r[column])) for r in rows if r.get(column) not in (None, "")]


def tb_scalars(log_dir: str, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(log_dir, size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def tb_tags(log_dir: str) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return set(EventAccumulator(log_dir, size_guidance={"scalars": 0}).Reload().Tags()["scalars"])


# ---------------------------------------------------------------- the folder format before .ckpt files

def as_legacy_folder(ckpt_path: str) -> str:
    """Rewrite a run's ``.ckpt`` as the checkpoint folder raytrainer wrote before ``.ckpt`` files
    (model.pt, state.pt, rank-NNNNN.pt, COMMIT.json with their hashes), at the same name without
    the suffix; removes the file. Returns the folder: old runs' checkpoints must still load."""
    import hashlib
    import io
    import json

    from raytrainer.checkpoint import store

    state = store.load(ckpt_path)
    folder = ckpt_path.removesuffix(".ckpt")
    os.makedirs(folder)
    rank_states = state.pop("rank_states")
    files = {"model.pt": state.pop("state_dict"), "state.pt": state,
             **{f"rank-{r:05d}.pt": s for r, s in rank_states.items()}}
    table = {}
    for name, obj in files.items():
        buf = io.BytesIO()
        torch.save(obj, buf)
        pathlib.Path(folder, name).write_bytes(buf.getvalue())
        table[name] = {"sha256": hashlib.sha256(buf.getvalue()).hexdigest(), "size": len(buf.getvalue())}
    marker = {"format_version": 1, "files": table, "global_step": state["global_step"], "epoch": state["epoch"]}
    pathlib.Path(folder, "COMMIT.json").write_text(json.dumps(marker))
    os.remove(ckpt_path)
    return folder
