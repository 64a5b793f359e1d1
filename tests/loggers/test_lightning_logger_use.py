"""How Lightning code uses its loggers, side by side with pytorch-lightning: the graph of
``example_input_array`` (``TensorBoardLogger(log_graph=True)``), the CSV logger's experiment
writer, and ``self.logger.experiment`` called on every rank of a 2-rank run (rank zero writes,
the others do nothing, as with Lightning's rank-zero-only loggers)."""
from __future__ import annotations

import csv
import glob
import os

import pytest
import torch
from helpers import make_trainer
from multirank import GlooContext, run_ranks
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt
from raytrainer.loop.execute import execute

pl = pytest.importorskip("pytorch_lightning")
pytestmark = pytest.mark.timeout(120)


def data(n: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)), batch_size=2)


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    return EventAccumulator(log_dir, size_guidance={"histograms": 0, "scalars": 0}).Reload()


class UsesItsLogger:
    """A module that writes through ``self.logger.experiment``, as Lightning's examples do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
        self.example_input_array = torch.zeros(2, 3)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        experiment = self.logger.experiment
        if hasattr(experiment, "add_histogram"):  # TensorBoard's SummaryWriter
            experiment.add_histogram("first_layer", self.net[0].weight, self.global_step)
        else:  # the CSV logger's experiment writer
            experiment.log_metrics({"custom": torch.tensor(batch_idx + 0.5)}, step=self.global_step)
        return nn.functional.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_both(tmp_path, make_logger):
    dirs = []
    for base, loggers, root in ((rt.Module, rt.loggers, tmp_path / "rt"), (pl.LightningModule, pl.loggers, tmp_path / "pl")):
        module, logger = type("M", (UsesItsLogger, base), {})(), make_logger(loggers, str(root))
        if base is rt.Module:
            make_trainer(root, max_epochs=1, logger=logger).fit(module, data())
        else:
            pl.Trainer(max_epochs=1, accelerator="cpu", logger=logger, enable_progress_bar=False,
                       enable_checkpointing=False, enable_model_summary=False).fit(module, data())
        logger.save()
        dirs.append(logger.log_dir)
    return dirs


def test_log_graph_traces_example_input_array_like_lightning(tmp_path):
    ours, theirs = _fit_both(tmp_path, lambda mod, root: mod.TensorBoardLogger(root, name="tb", log_graph=True))
    graphs = [_events(d).Graph() for d in (ours, theirs)]
    ops = [sorted({node.op for node in g.node}) for g in graphs]
    assert ops[0] == ops[1] and any("linear" in op for op in ops[0])
    # the module's histograms went through self.logger.experiment, one per step, in both
    assert [e.step for e in _events(ours).Histograms("first_layer")] == \
           [e.step for e in _events(theirs).Histograms("first_layer")] == [0, 1, 2, 3]

    class NoExample(UsesItsLogger, rt.Module):
        def __init__(self):
            super().__init__()
            self.example_input_array = None
    with pytest.warns(UserWarning, match="Could not log computational graph to TensorBoard"):
        make_trainer(tmp_path / "none", logger=rt.loggers.TensorBoardLogger(log_graph=True)).fit(NoExample(), data())


def test_csv_experiment_writes_rows_like_lightning(tmp_path):
    ours, theirs = _fit_both(tmp_path, lambda mod, root: mod.CSVLogger(root, name="csv"))

    def custom_rows(log_dir):
        with open(os.path.join(log_dir, "metrics.csv"), newline="") as f:
            return [(int(r["step"]), float(r["custom"])) for r in csv.DictReader(f) if r.get("custom")]
    assert custom_rows(ours) == custom_rows(theirs) == [(0, 0.5), (1, 1.5), (2, 2.5), (3, 3.5)]


def test_self_logger_experiment_on_every_rank_writes_once(tmp_path):
    """Lightning code calls self.logger.experiment.add_histogram on every rank; only rank zero's
    lands in the event files, and the logger is the same class on every rank."""
    def rank_fn(rank, world_size):
        seen = []

        class Module(UsesItsLogger, rt.Module):
            def on_train_start(self):
                seen.append((isinstance(self.logger, rt.loggers.TensorBoardLogger), self.logger.name,
                             type(self.logger.experiment).__name__))
                self.logger.log_metrics({"from_every_rank": float(self.global_rank)}, 0)

        logger = rt.loggers.TensorBoardLogger(str(tmp_path / "tb"), name="shared", log_graph=True)
        execute(make_trainer(tmp_path, logger=logger), "fit", Module(), None, {"train": data(8)}, None,
                GlooContext(rank, world_size))
        logger.save()
        return seen
    ranks = run_ranks(rank_fn)
    assert ranks[0] == [(True, "shared", "SummaryWriter")]
    assert ranks[1] == [(True, "shared", "_DummyExperiment")]
    events = _events(str(tmp_path / "tb" / "shared" / "version_0"))
    assert [e.step for e in events.Histograms("first_layer")] == [0, 1]  # 2 steps per rank, rank 0's
    assert [e.value for e in events.Scalars("from_every_rank")] == [0.0]
    assert len(glob.glob(str(tmp_path / "tb" / "shared" / "*" / "events.*"))) == 1


class HparamsLogger:
    """Records what log_hyperparams gets, and when (after on_fit_start, as Lightning)."""

    def __init__(self, events):
        super().__init__()
        self.events = events

    def log_hyperparams(self, params, *args, **kwargs):
        self.events.append(("hparams", dict(params)))

    def log_metrics(self, metrics, step=None):
        pass


def test_module_and_datamodule_hparams_are_merged_after_on_fit_start_like_lightning(tmp_path):
    def run(base, dm_base, loggers_base, trainer_of, clash=False):
        events = []

        class Model(UsesItsLogger, base):
            def __init__(self, lr=0.1, batch_size=2):
                super().__init__()
                self.save_hyperparameters()

            def training_step(self, batch, batch_idx):
                return nn.functional.mse_loss(self(batch[0]), batch[1])

            def on_fit_start(self):
                events.append(("on_fit_start",))

            def validation_step(self, batch, batch_idx):
                pass

        class Data(dm_base):
            def __init__(self, batch_size=2, root="data"):
                super().__init__()
                self.save_hyperparameters()

            def train_dataloader(self):
                return data()

            def val_dataloader(self):
                return data()

        logger = type("Recorder", (HparamsLogger, loggers_base), {"name": "r", "version": 0, "experiment": None})(events)
        trainer = trainer_of(logger)
        model = Model(batch_size=4 if clash else 2)
        trainer.fit(model, datamodule=Data())
        trainer.validate(model, datamodule=Data())  # every stage logs them, as Lightning
        return events

    ours = run(rt.Module, rt.DataModule, rt.loggers.Logger, lambda lg: make_trainer(tmp_path / "rt", logger=lg))
    theirs = run(pl.LightningModule, pl.LightningDataModule, pl.loggers.Logger, lambda lg: pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=lg, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=str(tmp_path / "pl")))
    assert ours == theirs == [("on_fit_start",), ("hparams", {"lr": 0.1, "batch_size": 2, "root": "data"}),
                              ("hparams", {"lr": 0.1, "batch_size": 2, "root": "data"})]
    messages = []
    for base, dm_base, lg_base, make in ((rt.Module, rt.DataModule, rt.loggers.Logger,
                                          lambda lg: make_trainer(tmp_path / "rt2", logger=lg)),
                                         (pl.LightningModule, pl.LightningDataModule, pl.loggers.Logger,
                                          lambda lg: pl.Trainer(max_epochs=1, accelerator="cpu", logger=lg,
                                                                enable_progress_bar=False, enable_checkpointing=False,
                                                                default_root_dir=str(tmp_path / "pl2")))):
        with pytest.raises(RuntimeError, match="Error while merging hparams") as raised:
            run(base, dm_base, lg_base, make, clash=True)
        messages.append(str(raised.value))
    assert messages[0] == messages[1]


class Validates(UsesItsLogger):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.mse_loss(self(batch[0]), batch[1]))


def _versions_used(base, loggers_mod, make_trainer_for, root):
    """Fits as a Lightning script makes them: two fresh Trainers with fresh loggers, then a
    validate on the second Trainer. Returns each logger's log dir relative to ``root``."""
    seen = []
    for _ in range(2):
        tb, table = loggers_mod.TensorBoardLogger(str(root), name="tb"), loggers_mod.CSVLogger(str(root), name="csv")
        trainer, module = make_trainer_for([tb, table]), type("M", (Validates, base), {})()
        trainer.fit(module, data())
        seen.append((os.path.relpath(tb.log_dir, root), os.path.relpath(table.log_dir, root)))
    trainer.validate(module, data())
    seen.append((os.path.relpath(tb.log_dir, root), os.path.relpath(table.log_dir, root)))
    assert sorted(os.listdir(root / "tb")) == ["version_0", "version_1"]  # every file went there
    return seen


def test_save_dir_without_version_opens_the_next_version_like_lightning(tmp_path):
    ours = _versions_used(rt.Module, rt.loggers, lambda loggers: make_trainer(tmp_path / "runs", logger=loggers),
                          tmp_path / "rt")
    theirs = _versions_used(pl.LightningModule, pl.loggers, lambda loggers: pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=loggers, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False), tmp_path / "pl")
    assert ours == theirs == [("tb/version_0", "csv/version_0"), ("tb/version_1", "csv/version_1"),
                              ("tb/version_1", "csv/version_1")]

    # The next version counts from the highest version_N folder present, not from how many exist.
    os.makedirs(tmp_path / "gap" / "tb" / "version_7")
    os.makedirs(tmp_path / "gap" / "tb" / "version_x")  # not a version folder
    assert rt.loggers.TensorBoardLogger(str(tmp_path / "gap"), name="tb").version == \
        pl.loggers.TensorBoardLogger(str(tmp_path / "gap"), name="tb").version == 8
    # A version given is used as given; a string names the folder itself.
    assert rt.loggers.CSVLogger(str(tmp_path), name="c", version="exp").log_dir == \
        pl.loggers.CSVLogger(str(tmp_path), name="c", version="exp").log_dir == str(tmp_path / "c" / "exp")
