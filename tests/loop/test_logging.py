"""self.log: step/epoch values, reductions, names, and what reaches the loggers' files."""
from __future__ import annotations

import os

import pytest
import torch
import yaml
from torch import nn

import raytrainer as rt
from helpers import (LinearModel, csv_column, csv_path, loader, make_trainer, read_csv, tb_scalars,
                     tb_tags, tensors)


def _logging(log_fn, **model_kwargs):
    """A LinearModel whose training_step also calls ``log_fn(self, batch, batch_idx)``."""
    class Model(LinearModel):
        def training_step(self, batch, batch_idx):
            log_fn(self, batch, batch_idx)
            return super().training_step(batch, batch_idx)
    return Model(**model_kwargs)


def _csv_fit(tmp_path, model, max_epochs=1, train=None, val=None, **kwargs):
    trainer = make_trainer(tmp_path, max_epochs=max_epochs, logger=rt.loggers.CSVLogger(),
                           log_every_n_steps=kwargs.pop("log_every_n_steps", 1), **kwargs)
    result = trainer.fit(model, train if train is not None else loader(n=10, batch_size=4), val)
    return trainer, result, read_csv(csv_path(trainer))


# ---------------------------------------------------------------- epoch reductions

def test_on_epoch_mean_is_weighted_by_batch_size(tmp_path):
    # batches of 4, 4 and 2 samples log 1, 2, 3: weighted mean (4 + 8 + 6) / 10 = 1.8, not 2.0
    model = _logging(lambda m, b, i: m.log("m", float(i + 1), on_step=False, on_epoch=True))
    trainer, result, rows = _csv_fit(tmp_path, model)
    assert trainer.callback_metrics["m"].item() == pytest.approx(1.8)
    assert trainer.logged_metrics["m"] == pytest.approx(1.8)
    assert result.metrics["m"] == pytest.approx(1.8)
    assert csv_column(rows, "m") == [(2, pytest.approx(1.8))]  # Lightning's step: the epoch's last


def test_explicit_batch_size_overrides_the_inferred_one(tmp_path):
    model = _logging(lambda m, b, i: m.log("m", float(i + 1), on_step=False, on_epoch=True, batch_size=1))
    trainer, _, _ = _csv_fit(tmp_path, model)
    assert trainer.callback_metrics["m"].item() == pytest.approx(2.0)


def test_train_loss_epoch_mean_matches_hand_computation(tmp_path):
    seen = []

    class Model(LinearModel):
        def training_step(self, batch, batch_idx):
            loss = self.loss(batch)
            seen.append((loss.item(), len(batch[0])))
            self.log("loss", loss, on_step=False, on_epoch=True)
            return loss

    trainer, _, rows = _csv_fit(tmp_path, Model(), max_epochs=2)
    per_epoch = [seen[:3], seen[3:]]
    expected = [sum(v * n for v, n in ep) / sum(n for _, n in ep) for ep in per_epoch]
    assert csv_column(rows, "loss") == [(2, pytest.approx(expected[0])), (5, pytest.approx(expected[1]))]


@pytest.mark.parametrize("reduce_fx,expected", [("sum", 6.0), ("max", 3.0), ("min", 1.0),
                                                (torch.sum, 6.0), (torch.max, 3.0), ("mean", 1.8)])
def test_reduce_fx(tmp_path, reduce_fx, expected):
    model = _logging(lambda m, b, i: m.log("m", torch.tensor(float(i + 1)), on_step=False, on_epoch=True,
                                           reduce_fx=reduce_fx))
    trainer, _, rows = _csv_fit(tmp_path, model)
    assert trainer.callback_metrics["m"].item() == pytest.approx(expected)
    assert csv_column(rows, "m") == [(2, pytest.approx(expected))]


def test_epoch_values_restart_every_epoch(tmp_path):
    model = _logging(lambda m, b, i: m.log("m", float(m.current_epoch * 10 + i), on_step=False,
                                           on_epoch=True, reduce_fx="sum"))
    _, _, rows = _csv_fit(tmp_path, model, max_epochs=2)
    assert csv_column(rows, "m") == [(2, 0 + 1 + 2), (5, 10 + 11 + 12)]


# ---------------------------------------------------------------- step values and names

def test_training_step_defaults_to_on_step_only(tmp_path):
    values = []

    def log(m, b, i):
        values.append(float(i) + 0.5)
        m.log("s", values[-1])

    trainer, result, rows = _csv_fit(tmp_path, _logging(log), max_epochs=2)
    assert csv_column(rows, "s") == list(zip(range(6), values))  # the steps before each row (Lightning)
    assert "s_step" not in rows[0] and "s_epoch" not in rows[0]
    assert trainer.callback_metrics["s"].item() == pytest.approx(values[-1])
    assert trainer.logged_metrics["s"] == pytest.approx(values[-1])


def test_on_step_and_on_epoch_give_step_and_epoch_names(tmp_path):
    model = _logging(lambda m, b, i: m.log("x", float(i + 1), on_step=True, on_epoch=True))
    trainer, result, rows = _csv_fit(tmp_path, model, max_epochs=2)
    assert csv_column(rows, "x_step") == [(0, 1.0), (1, 2.0), (2, 3.0), (3, 1.0), (4, 2.0), (5, 3.0)]
    assert csv_column(rows, "x_epoch") == [(2, pytest.approx(1.8)), (5, pytest.approx(1.8))]
    assert "x" not in rows[0]
    cm = trainer.callback_metrics
    assert {"x", "x_step", "x_epoch"} <= set(cm)
    assert cm["x_step"].item() == 3.0
    assert cm["x_epoch"].item() == pytest.approx(1.8) == cm["x"].item()
    assert trainer.logged_metrics["x_step"] == 3.0
    assert trainer.logged_metrics["x_epoch"] == pytest.approx(1.8)
    assert "x" not in trainer.logged_metrics


def test_logged_metrics_only_hold_what_went_to_the_loggers(tmp_path):
    """callback_metrics has every step's latest value; logged_metrics only those of logging steps."""
    model = _logging(lambda m, b, i: m.log("s", float(i)))
    trainer = make_trainer(tmp_path, max_epochs=1, log_every_n_steps=2)
    trainer.fit(model, loader(n=10, batch_size=4))
    assert trainer.callback_metrics["s"].item() == 2.0  # the last step
    assert trainer.logged_metrics["s"] == 1.0  # logged at step 2 only
    assert "epoch" not in trainer.logged_metrics  # on every row to the loggers, not a logged metric (Lightning)


def test_logger_false_metrics_are_not_written(tmp_path):
    def log(m, b, i):
        m.log("hidden", 7.0, logger=False)
        m.log("hidden_epoch_mean", 3.0, logger=False, on_step=False, on_epoch=True)
        m.log("shown", 1.0, prog_bar=True)

    trainer, result, rows = _csv_fit(tmp_path, _logging(log), val=loader(n=4, batch_size=2))
    columns = set(rows[0])
    assert "shown" in columns and "hidden" not in columns and "hidden_epoch_mean" not in columns
    assert trainer.callback_metrics["hidden"].item() == 7.0
    assert trainer.callback_metrics["hidden_epoch_mean"].item() == 3.0
    assert "hidden" not in trainer.logged_metrics
    assert trainer.progress_bar_metrics == {"shown": 1.0}
    assert result.metrics["hidden"] == 7.0


def test_log_in_epoch_end_hook_defaults_to_epoch(tmp_path):
    class Model(LinearModel):
        def on_train_epoch_end(self):
            self.log("epoch_hook", float(self.current_epoch) + 0.25)

    trainer, _, rows = _csv_fit(tmp_path, Model(), max_epochs=2)
    assert csv_column(rows, "epoch_hook") == [(2, 0.25), (5, 1.25)]


def test_log_in_train_batch_hooks_defaults_to_step(tmp_path):
    class Model(LinearModel):
        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.log("batch_end", float(batch_idx))

    _, _, rows = _csv_fit(tmp_path, Model())
    assert csv_column(rows, "batch_end") == [(0, 0.0), (1, 1.0), (2, 2.0)]


def test_log_dict_and_numeric_types(tmp_path):
    import numpy as np

    model = _logging(lambda m, b, i: m.log_dict({"a": 1, "b": np.float32(2.5), "c": torch.tensor([4.0])}))
    trainer, _, rows = _csv_fit(tmp_path, model)
    assert {k: float(v) for k, v in rows[0].items() if k in "abc"} == {"a": 1.0, "b": 2.5, "c": 4.0}


# ---------------------------------------------------------------- validation metrics

def test_validation_epoch_mean_equals_hand_computation(tmp_path):
    val = loader(n=10, batch_size=4, seed=1)  # 4, 4, 2: the small last batch weighs less
    model = LinearModel()
    trainer, result, rows = _csv_fit(tmp_path, model, max_epochs=2, val=val)
    x, y = tensors(val)
    with torch.no_grad():
        expected = nn.functional.mse_loss(model(x), y).item()  # weights after the last step
    assert result.metrics["val_loss"] == pytest.approx(expected, rel=1e-6)
    assert trainer.callback_metrics["val_loss"].item() == pytest.approx(expected, rel=1e-6)
    assert [s for s, _ in csv_column(rows, "val_loss")] == [2, 5]
    assert csv_column(rows, "val_loss")[-1][1] == pytest.approx(expected, rel=1e-6)
    # validation metrics are epoch aggregates even when on_step is asked for
    assert "val_loss_step" not in rows[0] and "val_loss_epoch" not in rows[0]


def test_validate_returns_the_epoch_means(tmp_path):
    val = loader(n=10, batch_size=4, seed=1)
    model = LinearModel()
    (metrics,) = make_trainer(tmp_path).validate(model, val, verbose=False)
    x, y = tensors(val)
    with torch.no_grad():
        assert metrics == {"val_loss": pytest.approx(nn.functional.mse_loss(model(x), y).item())}
    assert model.val_calls == 3


# ---------------------------------------------------------------- the loggers' files

class _HP(LinearModel):
    def __init__(self, lr=0.1, hidden=3):
        super().__init__(lr=lr)
        self.save_hyperparameters()


def test_default_loggers_write_tensorboard_and_csv(tmp_path):
    model = _HP(lr=0.05)
    trainer = rt.Trainer(max_epochs=2, launcher="local", storage_path=str(tmp_path), name="exp",
                         enable_progress_bar=False, enable_checkpointing=False, log_every_n_steps=2)
    result = trainer.fit(model, loader(n=10, batch_size=4), loader(n=4, batch_size=4))
    assert [type(lg).__name__ for lg in trainer.loggers] == ["TensorBoardLogger", "CSVLogger"]
    tb_dir = str(tmp_path / "exp" / "tensorboard")
    assert result.log_dir == trainer.log_dir == tb_dir

    # CSV, at Lightning's steps (the optimizer steps before the row): train_loss after optimizer
    # steps 2, 4, 6 (rows 1, 3, 5); val_loss at the epochs' last steps (rows 2, 5).
    rows = read_csv(tmp_path / "exp" / "csv" / "metrics.csv")
    assert list(rows[0]) == ["step", "epoch", "train_loss", "val_loss"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 5]
    assert [s for s, _ in csv_column(rows, "train_loss")] == [1, 3, 5]
    assert [s for s, _ in csv_column(rows, "val_loss")] == [2, 5]
    assert csv_column(rows, "epoch") == [(1, 0.0), (2, 0.0), (3, 1.0), (5, 1.0)]

    # TensorBoard, read back by TensorBoard's own reader: the same scalars at the same steps.
    assert tb_tags(tb_dir) == {"train_loss", "val_loss", "epoch", "hp_metric"}  # hp_metric: Lightning's -1
    assert tb_scalars(tb_dir, "train_loss") == [(s, pytest.approx(v)) for s, v in csv_column(rows, "train_loss")]
    assert tb_scalars(tb_dir, "val_loss") == [(s, pytest.approx(v)) for s, v in csv_column(rows, "val_loss")]
    assert tb_scalars(tb_dir, "val_loss")[-1][1] == pytest.approx(result.metrics["val_loss"])

    for sub in ("tensorboard", "csv"):
        with open(tmp_path / "exp" / sub / "hparams.yaml") as f:
            assert yaml.safe_load(f) == {"lr": 0.05, "hidden": 3}


def test_logger_list_and_explicit_save_dir(tmp_path):
    tb = rt.loggers.TensorBoardLogger(save_dir=str(tmp_path / "elsewhere"), name="tb")
    csv_logger = rt.loggers.CSVLogger(name="table")
    trainer = make_trainer(tmp_path / "runs", max_epochs=1, logger=[csv_logger, tb], log_every_n_steps=1)
    trainer.fit(LinearModel(), loader(n=10, batch_size=4))
    assert trainer.logger is csv_logger and trainer.log_dir == str(tmp_path / "runs" / "run" / "table")
    rows = read_csv(os.path.join(csv_logger.log_dir, "metrics.csv"))
    assert [s for s, _ in csv_column(rows, "train_loss")] == [0, 1, 2]
    assert [s for s, _ in tb_scalars(str(tmp_path / "elsewhere" / "tb" / "version_0"), "train_loss")] == [0, 1, 2]


def test_resuming_its_own_run_continues_the_version_a_fresh_fit_opens_the_next(tmp_path):
    """Versioned loggers (a save_dir, no version): a fit continuing its own run's checkpoint writes
    on in the version that checkpoint recorded, so a resumed run's curves stay one (Lightning
    would open the next version: our documented deviation); a fresh fit opens the next one."""
    def fit(max_epochs, ckpt_path=None, name="run"):
        tb, table = (rt.loggers.TensorBoardLogger(str(tmp_path / "logs"), name="tb"),
                     rt.loggers.CSVLogger(str(tmp_path / "logs"), name="csv"))
        make_trainer(tmp_path / "runs", max_epochs=max_epochs, logger=[tb, table], log_every_n_steps=1,
                     enable_checkpointing=True, name=name).fit(LinearModel(), loader(n=8, batch_size=4),
                                                              ckpt_path=ckpt_path)
        return os.path.basename(tb.log_dir), os.path.basename(table.log_dir)

    assert fit(1) == ("version_0", "version_0")
    assert fit(2, ckpt_path="last") == ("version_0", "version_0")  # the run's own checkpoint
    steps = [s for s, _ in tb_scalars(str(tmp_path / "logs" / "tb" / "version_0"), "train_loss")]
    assert steps == [0, 1, 2, 3]  # one run's curve, both epochs
    rows = read_csv(str(tmp_path / "logs" / "csv" / "version_0" / "metrics.csv"))
    assert [s for s, _ in csv_column(rows, "train_loss")] == [0, 1, 2, 3]
    assert fit(1, name="other") == ("version_1", "version_1")  # another run: the next version
    other_runs_checkpoint = str(next((tmp_path / "runs" / "run" / "checkpoints").iterdir()))
    assert fit(2, ckpt_path=other_runs_checkpoint, name="third") == ("version_2", "version_2")


def test_logger_false_writes_no_log_files(tmp_path):
    trainer = make_trainer(tmp_path, max_epochs=1, logger=False, log_every_n_steps=1)
    result = trainer.fit(LinearModel(), loader(), loader())
    assert trainer.loggers == [] and trainer.logger is None
    assert result.metrics["val_loss"] > 0
    assert list(tmp_path.rglob("*.csv")) == [] and list(tmp_path.rglob("events.out.*")) == []
