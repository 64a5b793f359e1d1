"""What a user observes of self.log, side by side with pytorch-lightning (the spec): names
(``name_step``/``name_epoch``, ``name/dataloader_idx_N`` with several evaluation loaders), what
``callback_metrics`` holds inside the epoch-end hooks, the rows the loggers get, ``logged_metrics``,
and what ``validate()`` returns."""
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


def loader(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 2, generator=g), torch.randn(n, 1, generator=g)), batch_size=4)


class LoggingCode:
    """The module code both trainers run."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(2, 1)
        self.seen: dict[str, list] = {"on_train_epoch_end": [], "on_validation_epoch_end": []}

    def _loss(self, batch):
        return nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("tl", loss)
        self.log("te", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        loss = self._loss(batch)
        self.log("v", loss, on_step=True, on_epoch=True)
        self.log("w", 2 * loss)

    def on_validation_epoch_end(self):
        self.seen["on_validation_epoch_end"].append(_metrics(self.trainer.callback_metrics))
        self.log("from_hook", 1.5)

    def on_train_epoch_end(self):
        self.seen["on_train_epoch_end"].append(_metrics(self.trainer.callback_metrics))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _metrics(metrics) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in metrics.items()}


RtRows, PlRows = row_loggers(pl)


class Seen:
    def __init__(self):
        super().__init__()
        self.seen = {"on_train_epoch_end": [], "on_validation_epoch_end": []}

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen["on_train_epoch_end"].append(_metrics(trainer.callback_metrics))

    def on_validation_epoch_end(self, trainer, pl_module):
        self.seen["on_validation_epoch_end"].append(_metrics(trainer.callback_metrics))


class RtModule(LoggingCode, rt.Module):
    pass


class PlModule(LoggingCode, pl.LightningModule):
    pass


class RtSeen(Seen, rt.Callback):
    pass


class PlSeen(Seen, pl.Callback):
    pass


def _both(tmp_path, val_loaders, **kwargs):
    ours = (RtModule(), RtRows(), RtSeen())
    rt_trainer = make_trainer(tmp_path, max_epochs=2, log_every_n_steps=1, logger=ours[1], callbacks=[ours[2]],
                              **kwargs)
    rt_trainer.fit(ours[0], loader(8, 0), val_loaders())
    theirs = (PlModule(), PlRows(), PlSeen())
    pl_trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, log_every_n_steps=1, logger=theirs[1],
                            callbacks=[theirs[2]], enable_progress_bar=False, enable_checkpointing=False,
                            enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    pl_trainer.fit(theirs[0], loader(8, 0), val_loaders())
    return (rt_trainer, *ours), (pl_trainer, *theirs)


@pytest.mark.parametrize("val_loaders", [lambda: loader(10, 1), lambda: [loader(10, 1), loader(6, 2)]],
                         ids=["one-loader", "two-loaders"])
def test_names_hooks_rows_and_results_match_lightning(tmp_path, val_loaders):
    (rt_trainer, rt_module, rt_rows, rt_seen), (pl_trainer, pl_module, pl_rows, pl_seen) = _both(tmp_path, val_loaders)
    assert _metrics(rt_trainer.callback_metrics) == _metrics(pl_trainer.callback_metrics)
    assert _metrics(rt_trainer.logged_metrics) == _metrics(pl_trainer.logged_metrics)
    assert rt_module.seen == pl_module.seen  # the module's epoch-end hooks see this epoch's values
    assert rt_seen.seen == pl_seen.seen      # callbacks also what the module logged in its hook
    # every row the loggers got, in order: names and values (the step numbers: the xfail below)
    assert [row for _, row in rt_rows.rows] == [row for _, row in pl_rows.rows]
    ours = rt_trainer.validate(rt_module, val_loaders(), verbose=False)
    theirs = pl_trainer.validate(pl_module, val_loaders(), verbose=False)
    assert [_metrics(d) for d in ours] == [_metrics(d) for d in theirs]


def test_logger_rows_use_lightnings_step_numbers(tmp_path):
    (_, _, rt_rows, _), (_, _, pl_rows, _) = _both(tmp_path, lambda: loader(10, 1))
    assert [step for step, _ in rt_rows.rows] == [step for step, _ in pl_rows.rows]


class ReturnsCode:
    """training_step returns a tensor, a dict with an extra entry, or None (a skipped batch)."""

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(2, 1)
        self.kind, self.got = kind, []

    def training_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        return {"tensor": loss, "dict": {"loss": loss, "extra": 2 * loss, "n": 3}, "none": None}[self.kind]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.got.append({k: (round(float(v), 6), v.requires_grad) if isinstance(v, torch.Tensor) else v
                         for k, v in outputs.items()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("kind, accumulate", [("tensor", 1), ("dict", 1), ("none", 1), ("dict", 2)])
def test_on_train_batch_end_gets_lightnings_outputs(tmp_path, kind, accumulate):
    """(With accumulation the "loss" is the one backward ran on: divided by the window.)"""
    class Ours(ReturnsCode, rt.Module):
        pass

    class Theirs(ReturnsCode, pl.LightningModule):
        pass

    ours, theirs = Ours(kind), Theirs(kind)
    make_trainer(tmp_path, accumulate_grad_batches=accumulate).fit(ours, loader(8, 0))
    pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
               enable_checkpointing=False, enable_model_summary=False, accumulate_grad_batches=accumulate,
               default_root_dir=str(tmp_path)).fit(theirs, loader(8, 0))
    assert ours.got == theirs.got and len(ours.got) == 2
