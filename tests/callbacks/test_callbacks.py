"""Callbacks: EarlyStopping decisions, LearningRateMonitor output, and the documented hook order."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import raytrainer as rt
from helpers import (LinearModel, ScriptedValModel, csv_column, csv_path, loader, make_trainer,
                     read_csv)


# ---------------------------------------------------------------- EarlyStopping

def _early_stop(tmp_path, values, max_epochs=None, **es_kwargs):
    """Fit with val_loss = values[epoch]; returns (validated epochs, callback, result)."""
    es = rt.callbacks.EarlyStopping(monitor=es_kwargs.pop("monitor", "val_loss"), **es_kwargs)
    model = ScriptedValModel(values)
    trainer = make_trainer(tmp_path, max_epochs=max_epochs or len(values), callbacks=[es])
    result = trainer.fit(model, loader(n=4, batch_size=2), loader(n=2, batch_size=2))
    assert trainer.early_stopping_callback is es
    return [epoch for epoch, _ in model.val_runs], es, result


def test_early_stopping_patience(tmp_path):
    epochs, es, result = _early_stop(tmp_path, [5.0, 4.0, 3.0, 3.5, 3.2, 1.0, 0.5], patience=2)
    assert epochs == [0, 1, 2, 3, 4]  # 3.5 and 3.2 do not beat 3.0: stop after epoch 4
    assert es.stopped_epoch == 4 and es.wait_count == 2 and es.best_score == 3.0
    assert "did not improve for 2 checks" in es.stopping_reason
    assert result.current_epoch == 5 and result.global_step == 10


def test_early_stopping_patience_zero_stops_at_first_non_improvement(tmp_path):
    epochs, es, _ = _early_stop(tmp_path, [3.0, 2.0, 2.0, 1.0], patience=0)
    assert epochs == [0, 1, 2]


def test_early_stopping_min_delta(tmp_path):
    values = [1.0, 0.95, 0.92, 0.5, 0.4]
    epochs, es, _ = _early_stop(tmp_path / "a", values, patience=2, min_delta=0.1)
    assert epochs == [0, 1, 2]  # improvements smaller than 0.1 do not count
    epochs, es, _ = _early_stop(tmp_path / "b", values, patience=2, min_delta=0.0)
    assert epochs == [0, 1, 2, 3, 4] and es.stopped_epoch == 0  # ran out of epochs


def test_early_stopping_mode_max(tmp_path):
    epochs, es, _ = _early_stop(tmp_path, [0.1, 0.2, 0.3, 0.25, 0.29, 0.9], patience=2, mode="max",
                                monitor="val_loss")
    assert epochs == [0, 1, 2, 3, 4] and es.best_score == pytest.approx(0.3)


def test_early_stopping_stopping_threshold(tmp_path):
    epochs, es, _ = _early_stop(tmp_path, [1.0, 0.5, 0.05, 0.01], patience=10, stopping_threshold=0.1)
    assert epochs == [0, 1, 2]
    assert "reached stopping_threshold 0.1" in es.stopping_reason


def test_early_stopping_divergence_threshold(tmp_path):
    epochs, es, _ = _early_stop(tmp_path, [1.0, 0.9, 7.0, 0.1], patience=10, divergence_threshold=5.0)
    assert epochs == [0, 1, 2]
    assert "diverged" in es.stopping_reason


def test_early_stopping_check_finite(tmp_path):
    epochs, es, _ = _early_stop(tmp_path / "a", [1.0, math.nan, 0.5, 0.4], patience=10)
    assert epochs == [0, 1]
    assert "is not finite" in es.stopping_reason
    epochs, es, _ = _early_stop(tmp_path / "b", [1.0, math.inf, 0.5, 0.4], patience=10, check_finite=False)
    assert epochs == [0, 1, 2, 3]


def test_early_stopping_without_validation_checks_at_train_epoch_end(tmp_path):
    class Model(LinearModel):
        values = [3.0, 2.0, 2.5, 2.6, 1.0]

        def on_train_epoch_end(self):
            self.log("train_metric", self.values[self.current_epoch])

    es = rt.callbacks.EarlyStopping("train_metric", patience=2)
    result = make_trainer(tmp_path, max_epochs=5, callbacks=[es]).fit(Model(), loader(n=4, batch_size=2))
    assert es.stopped_epoch == 3 and result.current_epoch == 4


def test_callbacks_see_this_epochs_aggregates_at_train_epoch_end(tmp_path):
    seen = []

    class Reader(rt.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            hook = trainer.callback_metrics.get("hook")
            seen.append((trainer.callback_metrics["m"].item(), None if hook is None else hook.item()))
            pl_module.log("from_callback", float(trainer.current_epoch) + 0.5)

    class Model(LinearModel):
        def training_step(self, batch, batch_idx):
            self.log("m", float(self.current_epoch * 10 + batch_idx), on_step=False, on_epoch=True,
                     reduce_fx="sum")
            return super().training_step(batch, batch_idx)

        def on_train_epoch_end(self):
            self.log("hook", float(self.current_epoch))

    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[Reader()], logger=rt.loggers.CSVLogger())
    trainer.fit(Model(), loader(n=6, batch_size=2))
    # this epoch's aggregates; the module's on_train_epoch_end runs after this (non-monitoring)
    # callback's, as in Lightning: its "hook" value is the previous epoch's
    assert seen == [(0 + 1 + 2, None), (10 + 11 + 12, 0.0)]
    rows = read_csv(csv_path(trainer))
    # at the epoch's last step, numbered as Lightning numbers it (the steps before it)
    assert csv_column(rows, "from_callback") == [(2, 0.5), (5, 1.5)]
    assert csv_column(rows, "m") == [(2, 3.0), (5, 33.0)]


def test_early_stopping_decide_is_a_pure_policy():
    es = rt.callbacks.EarlyStopping("m", patience=1, mode="max", min_delta=0.5)
    assert es.decide(1.0) == (False, None)
    stop, reason = es.decide(1.4)
    assert stop and "did not improve" in reason


# ---------------------------------------------------------------- hook order

CALLBACK_HOOKS = [name for name in vars(rt.Callback) if name.startswith("on_") or name in ("setup", "teardown")]
CALLBACK_HOOKS.remove("on_exception")
MODULE_HOOKS = [h for h in CALLBACK_HOOKS if h != "on_checkpoint_boundary"] + ["prepare_data"]


def _recording_module(events, base=None):
    def make(hook):
        def method(self, *args, **kwargs):
            events.append(f"M:{hook}")
        return method

    Model = type("Recording", (base or LinearModel,), {h: make(h) for h in MODULE_HOOKS})

    class Recorded(Model):
        def training_step(self, batch, batch_idx):
            events.append("M:training_step")
            return self.loss(batch)

        def validation_step(self, batch, batch_idx):
            events.append("M:validation_step")
            self.log("val_loss", self.loss(batch))

        def configure_optimizers(self):
            events.append("M:configure_optimizers")
            return super().configure_optimizers()

    return Recorded()


def _make_recorder_hook(hook):
    def method(self, trainer, pl_module, *args, **kwargs):
        self.events.append(f"{self.tag}:{hook}")
    return method


def _recorder_class(base):
    hooks = {h: _make_recorder_hook(h) for h in CALLBACK_HOOKS if hasattr(base, h) or h == "on_checkpoint_boundary"}
    return type("Recorder", (base,), {"__init__": lambda self, tag, events: setattr(self, "tag", tag) or
                                      setattr(self, "events", events), **hooks})


_Recorder = _recorder_class(rt.Callback)


def _recording_data(events, base=None):
    class RecordingData(base or rt.DataModule):
        def prepare_data(self):
            events.append("D:prepare_data")

        def setup(self, stage):
            events.append("D:setup")

        def teardown(self, stage):
            events.append("D:teardown")

        def train_dataloader(self):
            return loader(n=4, batch_size=2)

        def val_dataloader(self):
            return loader(n=2, batch_size=2)
    return RecordingData()


def _lightning():
    """The same recording module, callbacks and data under pytorch-lightning (the spec)."""
    pl = pytest.importorskip("pytorch_lightning")

    class PlLinear(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layer = nn.Linear(2, 1)

        def forward(self, x):
            return self.layer(x)

        def loss(self, batch):
            return nn.functional.mse_loss(self.layer(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def trainer(events, **kwargs):
        return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                          enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                          callbacks=[_recorder_class(pl.Callback)(tag, events) for tag in "AB"], **kwargs)
    return pl, PlLinear, trainer


def _without_boundaries(events):
    return [e for e in events if not e.endswith(":on_checkpoint_boundary")]


def test_hook_order_for_one_epoch_with_validation_is_lightnings(tmp_path):
    pl, PlLinear, pl_trainer = _lightning()
    theirs: list[str] = []
    pl_trainer(theirs, max_epochs=1).fit(_recording_module(theirs, PlLinear),
                                         datamodule=_recording_data(theirs, pl.LightningDataModule))
    ours: list[str] = []
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[_Recorder("A", ours), _Recorder("B", ours)])
    trainer.fit(_recording_module(ours), datamodule=_recording_data(ours))
    assert _without_boundaries(ours) == theirs
    assert "M:on_before_zero_grad" in theirs  # the comparison covers the optimizer hooks too
    # raytrainer's one addition: a checkpoint boundary after each step (after the epoch's
    # validation on the last one) and after the epoch's end
    boundaries = [i for i, e in enumerate(ours) if e == "A:on_checkpoint_boundary"]
    assert [ours[i - 1] for i in boundaries] == ["M:on_train_batch_end", "M:on_validation_end",
                                                 "M:on_train_epoch_end"]


def test_hook_order_for_validate_test_predict_is_lightnings(tmp_path):
    pl, PlLinear, pl_trainer = _lightning()
    x, _ = loader(n=2).dataset.tensors
    for stage, data in (("validate", lambda: loader(n=2, batch_size=2)),
                        ("predict", lambda: torch.utils.data.DataLoader(x, batch_size=2))):
        theirs: list[str] = []
        getattr(pl_trainer(theirs), stage)(_recording_module(theirs, PlLinear), data())
        ours: list[str] = []
        trainer = make_trainer(tmp_path, callbacks=[_Recorder("A", ours), _Recorder("B", ours)])
        getattr(trainer, stage)(_recording_module(ours), data())
        assert ours == theirs, stage


def test_hooks_get_lightning_arguments(tmp_path):
    seen = []

    class Args(rt.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((batch_idx, trainer.global_step, trainer.current_epoch, outputs["extra"],
                         len(batch[0]), pl_module is model, trainer.is_global_zero, trainer.world_size))

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            seen.append(("val", batch_idx, dataloader_idx, outputs))

    class Model(LinearModel):
        def training_step(self, batch, batch_idx):
            return {"loss": self.loss(batch), "extra": 1}

    model = Model()
    make_trainer(tmp_path, callbacks=[Args()]).fit(model, loader(n=6, batch_size=2), loader(n=2, batch_size=2))
    assert [s[:4] for s in seen[:3]] == [(0, 1, 0, 1), (1, 2, 0, 1), (2, 3, 0, 1)]
    assert all(s[4:] == (2, True, True, 1) for s in seen[:3])
    assert seen[3] == ("val", 0, 0, None)


def test_callback_can_stop_training_mid_epoch(tmp_path):
    class StopAt(rt.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 5:
                trainer.should_stop = True

    model = LinearModel()
    result = make_trainer(tmp_path, max_epochs=10, callbacks=[StopAt()]).fit(model, loader(n=6, batch_size=2))
    assert (model.train_calls, result.global_step) == (5, 5)


def test_module_configure_callbacks_replace_same_type_and_run_last(tmp_path):
    events: list[str] = []
    module_es = rt.callbacks.EarlyStopping("val_loss", patience=0)

    class ModuleRecorder(_Recorder):  # another type: does not replace the trainer's _Recorder
        pass

    class Model(ScriptedValModel):
        def configure_callbacks(self):
            return [module_es, ModuleRecorder("M2", events)]

    trainer_es = rt.callbacks.EarlyStopping("val_loss", patience=100)
    model = Model([1.0, 2.0, 3.0])
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[_Recorder("A", events), trainer_es])
    trainer.fit(model, loader(n=2, batch_size=2), loader(n=2, batch_size=2))
    assert trainer.early_stopping_callback is module_es
    assert len(model.val_runs) == 2  # the module's patience=0 one decided
    assert [e for e in events if e.endswith(":on_fit_start")] == ["A:on_fit_start", "M2:on_fit_start"]


def test_on_train_batch_start_returning_minus_one_ends_the_epoch(tmp_path):
    class Skip(LinearModel):
        def on_train_batch_start(self, batch, batch_idx):
            return -1 if batch_idx == 2 else None

    model = Skip()
    result = make_trainer(tmp_path, max_epochs=2).fit(model, loader(n=10, batch_size=2))
    assert (model.train_calls, result.global_step, result.current_epoch) == (4, 4, 2)
