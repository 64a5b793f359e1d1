"""torchmetrics objects given to self.log / self.log_dict, as Lightning documents them: side by side
with pytorch-lightning in one process, and on 2 real gloo ranks against one process."""
from __future__ import annotations

import pytest
import torch
import torchmetrics
from exact_eval_models import CLASSES, FEATURES, N, data, eval_loader, unpack
from helpers import make_trainer
from multirank import GlooContext, run_ranks
from torch import nn
from torch.utils.data import DataLoader

import raytrainer as rt
from raytrainer.loop.execute import execute

pytestmark = pytest.mark.timeout(120)


class MetricsCode:
    """The documented habits: a metric called on the batch and logged on step and epoch, a metric
    updated and logged as the object, a MetricCollection through log_dict."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES))
        self.train_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=CLASSES, average="micro")
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=CLASSES, average="micro")
        self.val_more = torchmetrics.MetricCollection(
            {"f1": torchmetrics.classification.MulticlassF1Score(num_classes=CLASSES, average="macro"),
             "auroc": torchmetrics.classification.MulticlassAUROC(num_classes=CLASSES)}, prefix="val_")

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = unpack(batch)
        logits = self(x)
        self.train_acc(logits, y)
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=True)
        return nn.functional.cross_entropy(logits, y)

    def validation_step(self, batch, batch_idx):
        x, y = unpack(batch)
        logits = self(x)
        self.val_acc.update(logits, y)
        self.log("val_acc", self.val_acc)
        self.val_more.update(logits, y)
        self.log_dict(self.val_more)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RtMetrics(MetricsCode, rt.Module):
    pass


def test_metric_objects_give_lightnings_values_and_names(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")

    class LitMetrics(MetricsCode, pl.LightningModule):
        pass

    train = lambda: DataLoader(data(48, seed=1), batch_size=8)  # noqa: E731
    ours = make_trainer(tmp_path, max_epochs=2, log_every_n_steps=1)
    ours.fit(RtMetrics(), train(), eval_loader())
    theirs = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                        log_every_n_steps=1, default_root_dir=str(tmp_path))
    theirs.fit(LitMetrics(), train(), eval_loader())
    want = {k: float(v) for k, v in theirs.callback_metrics.items()}
    got = {k: float(v) for k, v in ours.callback_metrics.items()}
    assert {"train_acc_step", "train_acc_epoch", "val_acc", "val_f1", "val_auroc"} <= set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


@pytest.mark.parametrize("n", [N, 5])  # 5: one batch, rank 1 evaluates nothing and still computes
def test_metric_objects_on_two_ranks_equal_one_process(tmp_path, n):
    def rank_fn(rank, world_size):
        out = execute(make_trainer(tmp_path), "validate", RtMetrics(), None, {"val": eval_loader(n)}, None,
                      GlooContext(rank, world_size))
        return out["metrics"]
    on_ranks = run_ranks(rank_fn)
    one = execute(make_trainer(tmp_path), "validate", RtMetrics(), None, {"val": eval_loader(n)}, None,
                  GlooContext(0, 1))["metrics"]
    assert set(one) == {"val_acc", "val_f1", "val_auroc"}
    for metrics in on_ranks:
        assert metrics == pytest.approx(one, abs=1e-6)


def test_logging_a_metric_on_step_before_calling_it_says_what_to_do(tmp_path):
    class UpdatesOnly(RtMetrics):
        def training_step(self, batch, batch_idx):
            x, y = unpack(batch)
            self.train_acc.update(self(x), y)
            self.log("train_acc", self.train_acc, on_step=True)
            return nn.functional.cross_entropy(self(x), y)

    with pytest.raises(ValueError, match=r"self.log\('train_acc', <MulticlassAccuracy>, on_step=True\): call "
                                         r"the metric on the batch first"):
        make_trainer(tmp_path).fit(UpdatesOnly(), DataLoader(data(16), batch_size=8))


def test_a_metric_object_survives_a_mid_epoch_resume(tmp_path):
    """torchmetrics keeps its states out of state_dict; the checkpoint carries them, so the
    resumed epoch's train_acc_epoch is the uninterrupted one's."""
    def fit(name, max_steps=-1, ckpt_path=None):
        trainer = rt.Trainer(launcher="local", accelerator="cpu", max_epochs=1, max_steps=max_steps, seed=0,
                             logger=False,
                             enable_progress_bar=False, storage_path=str(tmp_path), name=name,
                             callbacks=[rt.callbacks.ModelCheckpoint(every_n_train_steps=1)])
        trainer.fit(RtMetrics(), DataLoader(data(56, seed=2), batch_size=8), ckpt_path=ckpt_path)
        return trainer.callback_metrics.get("train_acc_epoch")
    straight = fit("straight")  # one epoch of 7 batches
    partial = fit("resumed", max_steps=2)  # stopped mid-epoch: its end computes the 2 batches' value
    assert partial is not None and partial != straight
    assert fit("resumed", ckpt_path="last") == straight
