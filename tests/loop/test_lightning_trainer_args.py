"""Lightning's Trainer arguments and attributes, side by side with pytorch-lightning: the sanity
check (num_sanity_val_steps), min_epochs/min_steps against should_stop, overfit_batches,
barebones, the model summary, the attributes modules read, and the arguments refused by name."""
from __future__ import annotations

import logging

import pytest
import torch
from helpers import make_trainer
from row_loggers import row_loggers
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt
from raytrainer.errors import ConfigError

pl = pytest.importorskip("pytorch_lightning")
pytestmark = pytest.mark.timeout(120)


def data(n: int, batch_size: int = 2, seed: int = 0, shuffle: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 2, generator=g), torch.randn(n, 1, generator=g)),
                      batch_size=batch_size, shuffle=shuffle)


RtRows, PlRows = row_loggers(pl)


class Watches:
    """Records what a module sees: the sanity check, the batches, the attributes Lightning's
    examples read."""

    def __init__(self, stop_at_epoch=None):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(2, 1)
        self.stop_at_epoch, self.seen = stop_at_epoch, []

    def training_step(self, batch, batch_idx):
        self.seen.append(("train", self.current_epoch, batch_idx, round(float(batch[0].sum()), 5),
                          self.trainer.is_last_batch))
        loss = nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.seen.append(("val", dataloader_idx, batch_idx, self.trainer.sanity_checking))
        self.log("val_loss", nn.functional.mse_loss(self.layer(batch[0]), batch[1]))

    def on_train_epoch_end(self):
        if self.stop_at_epoch is not None and self.current_epoch >= self.stop_at_epoch:
            self.trainer.should_stop = True

    def on_fit_start(self):
        t = self.trainer
        self.seen.append(("attrs", t.num_devices, t.num_nodes, t.min_epochs, t.min_steps, t.gradient_clip_val,
                          t.val_check_interval, t.check_val_every_n_epoch, t.sanity_checking,
                          t.model is not None, t.lightning_module is self))

    def on_train_start(self):
        self.seen.append(("sanity batches", list(self.trainer.num_sanity_val_batches), dict(self.trainer.callback_metrics)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SanityCallback:
    def __init__(self):
        super().__init__()
        self.calls = []

    def on_sanity_check_start(self, trainer, pl_module):
        self.calls.append(("start", trainer.sanity_checking))

    def on_sanity_check_end(self, trainer, pl_module):
        self.calls.append(("end", trainer.sanity_checking))

    def on_validation_start(self, trainer, pl_module):
        self.calls.append(("validation", trainer.sanity_checking))


def _both(trainer_kwargs, train, val, **module_kwargs):
    out = []
    for base, cb_base, rows in ((rt.Module, rt.Callback, RtRows), (pl.LightningModule, pl.Callback, PlRows)):
        module = type("M", (Watches, base), {})(**module_kwargs)
        callback, logger = type("C", (SanityCallback, cb_base), {})(), rows()
        kwargs = {"max_epochs": 2, "log_every_n_steps": 1, "logger": logger, "callbacks": [callback], **trainer_kwargs}
        if base is rt.Module:
            trainer = make_trainer(_both.tmp, **{"num_sanity_val_steps": 2, **kwargs})  # Lightning's default
        else:
            trainer = pl.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, enable_checkpointing=False,
                                 enable_model_summary=False, default_root_dir=str(_both.tmp), **kwargs)
        torch.manual_seed(1)  # the shuffled loader's order comes from the global RNG
        trainer.fit(module, train(), val())
        out.append((trainer, module, callback, logger))
    return out


@pytest.fixture(autouse=True)
def _tmp(tmp_path):
    _both.tmp = tmp_path


@pytest.mark.parametrize("sanity", [2, -1, 0])
def test_sanity_check_runs_validation_first_and_keeps_nothing(sanity):
    """Two loaders; a shuffled train loader: the sanity check draws no randomness the training
    uses (the batches and weights equal Lightning's, which isolates the RNG too)."""
    (ours, rt_mod, rt_cb, rt_rows), (theirs, pl_mod, pl_cb, pl_rows) = _both(
        {"num_sanity_val_steps": sanity}, lambda: data(8, shuffle=True), lambda: [data(6, seed=1), data(2, seed=2)])
    assert rt_mod.seen == pl_mod.seen
    assert rt_cb.calls == pl_cb.calls and (("start", True) in rt_cb.calls) == (sanity != 0)
    assert rt_rows.rows == pl_rows.rows  # nothing of the sanity check reaches the loggers
    for a, b in zip(rt_mod.state_dict().values(), pl_mod.state_dict().values()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("limits", [{"min_epochs": 3}, {"min_steps": 9}, {}])
def test_should_stop_waits_for_min_epochs_and_min_steps(limits):
    (ours, rt_mod, _, _), (theirs, pl_mod, _, _) = _both(
        {"max_epochs": 5, "num_sanity_val_steps": 0, **limits}, lambda: data(8), lambda: data(2), stop_at_epoch=0)
    assert (ours.current_epoch, ours.global_step) == (theirs.current_epoch, theirs.global_step)
    assert ours.global_step == {"min_epochs": 12, "min_steps": 9}.get(next(iter(limits), None), 4)
    assert rt_mod.seen == pl_mod.seen


def test_overfit_batches_trains_on_the_same_first_batches_unshuffled():
    with pytest.warns(UserWarning, match="shuffling is turned off"):
        (ours, rt_mod, _, _), (theirs, pl_mod, _, _) = _both(
            {"overfit_batches": 2, "num_sanity_val_steps": 0}, lambda: data(10, shuffle=True), lambda: data(6))
    assert rt_mod.seen == pl_mod.seen
    assert [s[2:4] for s in rt_mod.seen if s[0] == "train"][:2] == [s[2:4] for s in rt_mod.seen if s[0] == "train"][2:]
    for a, b in zip(rt_mod.state_dict().values(), pl_mod.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_model_summary_numbers_are_lightnings(tmp_path, caplog):
    from pytorch_lightning.utilities.model_summary import ModelSummary as PlSummary

    class Net(rt.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(2, 300), nn.ReLU(), nn.Linear(300, 4))
            self.norm = nn.BatchNorm1d(4)
            self.head = nn.Linear(4, 1)
            self.head.requires_grad_(False)

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self.head(self.norm(self.body(batch[0]))), batch[1]) + \
                sum(p.sum() * 0 for p in self.parameters() if p.requires_grad)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class PlNet(Net, pl.LightningModule):
        pass

    caplog.set_level(logging.INFO, logger="raytrainer.summary")
    trainer = make_trainer(tmp_path, enable_model_summary=True)  # Lightning's default
    summary_cb = next(c for c in trainer.callbacks if isinstance(c, rt.callbacks.ModelSummary))
    trainer.fit(Net(), data(4))
    ours, theirs = summary_cb.summary, PlSummary(PlNet(), max_depth=1)
    for attr in ("layer_names", "layer_types", "param_nums", "training_modes", "total_parameters",
                 "trainable_parameters", "model_size", "total_training_modes"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert "2.1 K     Trainable params" in caplog.text and "5         Non-trainable params" in caplog.text


def test_attributes_default_root_dir_and_refusals(tmp_path):
    trainer = rt.Trainer(default_root_dir=str(tmp_path), launcher="local", logger=False)
    assert trainer.default_root_dir == trainer.cfg.storage_path == str(tmp_path)
    with pytest.raises(ConfigError, match=r"default_root_dir is Lightning's name for storage_path"):
        rt.Trainer(default_root_dir=str(tmp_path), storage_path=str(tmp_path / "other"))
    for arg, value in (("plugins", []), ("model_registry", "m")):
        with pytest.raises(ConfigError, match=rf"Trainer\({arg}=...\) is a Lightning argument raytrainer does not support"):
            rt.Trainer(**{arg: value})
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['max_epoch'\]"):
        rt.Trainer(max_epoch=3)
    with pytest.raises(ConfigError, match=r"barebones=True.*drop detect_anomaly"):
        rt.Trainer(barebones=True, detect_anomaly=True)
    bare = rt.Trainer(barebones=True, launcher="local")
    assert bare.loggers == [] and bare.checkpoint_callback is None and not bare.cfg.num_sanity_val_steps
    assert not any(isinstance(c, (rt.callbacks.ProgressBar, rt.callbacks.ModelSummary)) for c in bare.callbacks)
    with pytest.raises(ConfigError, match=r"launcher='local', num_nodes=2"):
        rt.Trainer(num_nodes=2, launcher="local")
    with pytest.raises(ConfigError, match=r"benchmark=True, deterministic=True"):
        rt.Trainer(benchmark=True, deterministic=True)


def test_detect_anomaly_and_benchmark_apply_during_the_run_only(tmp_path):
    class Nan(rt.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(2, 1)
            self.benchmark = None

        def on_fit_start(self):
            self.benchmark = torch.backends.cudnn.benchmark

        def training_step(self, batch, batch_idx):
            return torch.sqrt(self.layer(batch[0]) * 0 - 1).sum()  # NaN gradients in backward

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    before = torch.backends.cudnn.benchmark
    module = Nan()
    with pytest.raises(RuntimeError, match=r"Function 'SqrtBackward0' returned nan values"):
        make_trainer(tmp_path, detect_anomaly=True, benchmark=not before).fit(module, data(4))
    assert module.benchmark is (not before) and torch.backends.cudnn.benchmark is before
    assert not torch.is_anomaly_enabled()


class NumpyDraws(torch.utils.data.Dataset):
    """Each sample: a numpy draw in the worker process that loads it (and the worker's id)."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        import numpy as np
        info = torch.utils.data.get_worker_info()
        return torch.tensor([float(np.random.rand()), float(info.id)]), torch.zeros(1)


def test_seed_everything_workers_seeds_numpy_in_loader_workers_and_rank_zero_utilities(tmp_path, monkeypatch):
    from raytrainer.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

    class Draws(rt.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.draws = nn.Linear(2, 1), []

        def training_step(self, batch, batch_idx):
            self.draws += [tuple(row.tolist()) for row in batch[0]]
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def draws(workers, rank):
        monkeypatch.setenv("RANK", str(rank))  # what Ray Train sets in each worker
        monkeypatch.delenv("PL_SEED_WORKERS", raising=False)
        rt.seed_everything(7, workers=workers)
        module = Draws()
        make_trainer(tmp_path, name=f"w{workers}{rank}").fit(module, DataLoader(NumpyDraws(), batch_size=2,
                                                                                 num_workers=2))
        return module.draws

    # torch seeds numpy per worker, but from the same base seed on every rank: every rank's
    # workers draw the same "random" augmentations. workers=True mixes the rank in (Lightning's).
    assert draws(False, 0) == draws(False, 1)
    seeded = draws(True, 0)
    assert seeded != draws(True, 1) and seeded == draws(True, 0)  # distinct per rank, reproducible
    monkeypatch.delenv("RANK")

    calls = []
    assert rank_zero_only(lambda: calls.append(1) or "done")() == "done" and calls == [1]
    monkeypatch.setenv("RANK", "1")
    assert rank_zero_only(lambda: calls.append(2))() is None and calls == [1]
    rank_zero_info("not shown on rank 1")
    rank_zero_warn("nor this")


def test_datamodule_trainer_is_set_before_setup(tmp_path):
    seen = {}

    def datamodule(base):
        class Data(base):
            def setup(self, stage):
                seen[base.__name__] = (self.trainer is not None, stage == "fit")

            def train_dataloader(self):
                return data(4)

        return Data()

    module = type("M", (Watches, rt.Module), {})()
    make_trainer(tmp_path).fit(module, datamodule=datamodule(rt.DataModule))
    theirs = type("M", (Watches, pl.LightningModule), {})()
    pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
               enable_model_summary=False, default_root_dir=str(tmp_path)).fit(
        theirs, datamodule=datamodule(pl.LightningDataModule))
    assert seen == {"DataModule": (True, True), "LightningDataModule": (True, True)}


class FakeClock:
    """time.monotonic for both Timers: one second per training step (set by the module)."""
    now = 0.0

    @classmethod
    def monotonic(cls):
        return cls.now


class Ticks:
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(2, 1)
        self.epoch_ends = []

    def training_step(self, batch, batch_idx):
        FakeClock.now += 1.0
        return nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    def on_train_epoch_end(self):
        self.epoch_ends.append(self.global_step)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_max_time_stops_where_lightnings_timer_stops_and_the_budget_survives_a_resume(tmp_path, monkeypatch):
    import pytorch_lightning.callbacks.timer as pl_timer

    import raytrainer.callbacks.timer as rt_timer
    monkeypatch.setattr(rt_timer, "time", FakeClock)
    monkeypatch.setattr(pl_timer, "time", FakeClock)

    FakeClock.now = 0.0
    ours = type("M", (Ticks, rt.Module), {})()
    trainer = make_trainer(tmp_path, max_epochs=None, max_time={"seconds": 6}, enable_checkpointing=True)
    trainer.fit(ours, data(8))  # 4 steps per epoch: the budget ends in the middle of epoch 1
    FakeClock.now = 0.0
    theirs = type("M", (Ticks, pl.LightningModule), {})()
    pl_trainer = pl.Trainer(max_time={"seconds": 6}, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    pl_trainer.fit(theirs, data(8))
    assert (trainer.global_step, trainer.current_epoch) == (pl_trainer.global_step, pl_trainer.current_epoch) == (6, 2)
    assert ours.epoch_ends == theirs.epoch_ends == [4, 6]  # the stopped epoch's end ran
    timer = next(c for c in trainer.callbacks if isinstance(c, rt.callbacks.Timer))
    assert timer.time_elapsed("train") == pytest.approx(6.0)

    # The elapsed time is in the checkpoint: a budget of 9 s leaves 3 steps to the resumed run
    resumed = type("M", (Ticks, rt.Module), {})()
    again = make_trainer(tmp_path, max_epochs=None, max_time="00:00:00:09", enable_checkpointing=True)
    again.fit(resumed, data(8), ckpt_path="last")
    assert again.global_step == 9
    with pytest.raises(ConfigError, match=r"max_time='1h'\) is invalid: expected 'DD:HH:MM:SS'"):
        rt.Trainer(max_time="1h")


def test_sync_batchnorm_needs_gpu_workers(tmp_path):
    """SyncBatchNorm has no CPU kernel in torch: sync_batchnorm=True on 2 CPU ranks is refused with
    the reason (not silently per-rank statistics). (num_nodes: tests/runtime/test_ray_train.py.)"""
    from multirank import GlooContext, run_ranks

    from raytrainer.loop.execute import execute

    def rank_fn(rank, world_size):
        model = type("M", (Watches, rt.Module), {})()
        model.norm = nn.BatchNorm1d(2)
        try:
            execute(make_trainer(tmp_path, sync_batchnorm=True), "fit", model, None, {"train": data(8)}, None,
                    GlooContext(rank, world_size))
        except ValueError as e:
            return str(e)
    assert run_ranks(rank_fn) == ["Trainer(sync_batchnorm=True) needs GPU workers (torch's SyncBatchNorm runs on "
                                  "CUDA only); on CPU each worker normalizes with its own batch statistics"] * 2
