"""Where epochs end and data is (re)loaded, side by side with pytorch-lightning: ``max_steps``
reached mid-epoch (the epoch's end runs, the counters move; raytrainer's checkpoint still resumes
the epoch exactly), a float ``val_check_interval`` that does not divide the epoch, and
``reload_dataloaders_every_n_epochs``."""
from __future__ import annotations

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

RtRows, PlRows = row_loggers(pl)


def data(n: int, batch_size: int = 2, seed: int = 0, shuffle: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 2, generator=g), torch.randn(n, 1, generator=g)),
                      batch_size=batch_size, shuffle=shuffle)


class Records:
    """What a module observes: its batches, its epoch ends (with the metrics callbacks see there),
    its validations, the learning rate an epoch scheduler leaves."""

    def __init__(self, train_rows: int = 6):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(2, 1)
        self.train_rows, self.seen = train_rows, []

    def training_step(self, batch, batch_idx):
        self.seen.append(("train", self.current_epoch, batch_idx, round(float(batch[0].sum()), 5)))
        loss = nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        self.log("loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.seen.append(("val", self.current_epoch, self.global_step, batch_idx))
        self.log("val_loss", nn.functional.mse_loss(self.layer(batch[0]), batch[1]))

    def on_train_epoch_end(self):
        metrics = self.trainer.callback_metrics
        self.seen.append(("epoch end", self.current_epoch, self.global_step, round(float(metrics["loss_epoch"]), 5),
                          self.trainer.optimizers[0].param_groups[0]["lr"]))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)}


class ReloadsData(Records):
    """Loaders that grow with the epoch, as curriculum code builds them: a reload is visible in
    the batches."""

    def train_dataloader(self):
        self.seen.append(("train_dataloader", self.current_epoch, self.global_step))
        return data(2 * (self.current_epoch + 2), seed=self.current_epoch)

    def val_dataloader(self):
        self.seen.append(("val_dataloader", self.current_epoch, self.global_step))
        return data(2 * (self.current_epoch + 1), seed=10 + self.current_epoch)


def _both(tmp_path, trainer_kwargs, module_cls=Records, train=None, val=None):
    out = []
    for base, rows in ((rt.Module, RtRows), (pl.LightningModule, PlRows)):
        module, logger = type("M", (module_cls, base), {})(), rows()
        kwargs = {"log_every_n_steps": 1, "logger": logger, "num_sanity_val_steps": 0, **trainer_kwargs}
        if base is rt.Module:
            trainer = make_trainer(tmp_path / "rt", **kwargs)
        else:
            trainer = pl.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, enable_checkpointing=False,
                                 enable_model_summary=False, default_root_dir=str(tmp_path / "pl"), **kwargs)
        trainer.fit(module, train() if train else None, val() if val else None)
        out.append((trainer, module, logger))
    return out


def test_max_steps_mid_epoch_ends_the_epoch_like_lightning(tmp_path):
    """3 batches an epoch, max_steps=5: epoch 1's end runs at step 5 with its partial aggregate,
    the epoch scheduler does not step for the unfinished epoch, and current_epoch reads 2."""
    (ours, rt_mod, rt_rows), (theirs, pl_mod, pl_rows) = _both(
        tmp_path, {"max_epochs": -1, "max_steps": 5}, train=lambda: data(6), val=lambda: data(2))
    assert rt_mod.seen == pl_mod.seen
    assert [s for s in rt_mod.seen if s[0] == "epoch end"][-1][1:3] == (1, 5)
    assert rt_rows.rows == pl_rows.rows
    assert (ours.current_epoch, ours.global_step) == (theirs.current_epoch, theirs.global_step) == (2, 5)


def test_a_run_cut_short_by_max_steps_resumes_its_epoch_exactly(tmp_path):
    """Where Lightning's checkpoint after max_steps starts the next epoch (the rest of the
    unfinished one is never trained on), raytrainer's `last` resumes the unfinished epoch: 5 steps,
    then 4 more, equal an uninterrupted 9-step run in weights, batches and scheduler."""
    def fit(name, max_steps, ckpt_path=None):
        module = type("M", (Records, rt.Module), {})()
        trainer = make_trainer(tmp_path, name=name, max_epochs=-1, max_steps=max_steps, enable_checkpointing=True,
                               callbacks=[rt.callbacks.ModelCheckpoint(save_last=True, save_top_k=0)])
        torch.manual_seed(1)
        trainer.fit(module, data(6, shuffle=True), ckpt_path=ckpt_path)
        return trainer, module

    _, whole = fit("whole", 9)
    first, part = fit("parts", 5)
    assert first.current_epoch == 2
    second, rest = fit("parts", 9, ckpt_path="last")
    batches = [s for s in whole.seen if s[0] == "train"]
    assert [s for s in part.seen + rest.seen if s[0] == "train"] == batches
    assert [s[1:3] for s in rest.seen if s[0] == "epoch end"] == [(1, 6), (2, 9)]
    assert (second.global_step, second.current_epoch) == (9, 3)
    assert rest.seen[-1][-1] == whole.seen[-1][-1] == 0.1 * 0.5 ** 3  # stepped with each epoch's last batch
    for a, b in zip(rest.state_dict().values(), whole.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_a_float_val_check_interval_validates_every_int_n_batches_like_lightning(tmp_path):
    """0.3 of a 10-batch epoch: validation after batches 3, 6 and 9, none at the epoch's end."""
    (_, rt_mod, rt_rows), (_, pl_mod, pl_rows) = _both(
        tmp_path, {"max_epochs": 2, "val_check_interval": 0.3}, train=lambda: data(20), val=lambda: data(2))
    assert rt_mod.seen == pl_mod.seen
    assert [s[2] for s in rt_mod.seen if s[0] == "val"] == [3, 6, 9, 13, 16, 19]
    assert rt_rows.rows == pl_rows.rows


@pytest.mark.parametrize("every", [1, 2])
def test_reload_dataloaders_every_n_epochs_calls_the_hooks_where_lightning_does(tmp_path, every):
    (ours, rt_mod, rt_rows), (theirs, pl_mod, pl_rows) = _both(
        tmp_path, {"max_epochs": 5, "reload_dataloaders_every_n_epochs": every}, module_cls=ReloadsData)
    assert rt_mod.seen == pl_mod.seen
    assert [s[1] for s in rt_mod.seen if s[0] == "train_dataloader"] == list(range(0, 5, every))
    assert rt_rows.rows == pl_rows.rows
    assert ours.global_step == theirs.global_step


def test_reloaded_data_resumes_exactly(tmp_path):
    """A resume mid-way through a reloaded epoch builds that epoch's loader again (the hook sees
    the resumed epoch) and continues it."""
    def fit(name, max_steps, ckpt_path=None):
        module = type("M", (ReloadsData, rt.Module), {})()
        trainer = make_trainer(tmp_path, name=name, max_epochs=4, max_steps=max_steps, enable_checkpointing=True,
                               reload_dataloaders_every_n_epochs=2,
                               callbacks=[rt.callbacks.ModelCheckpoint(save_last=True, save_top_k=0)])
        trainer.fit(module, ckpt_path=ckpt_path)
        return trainer, module

    _, whole = fit("whole", -1)  # epochs of 2, 2, 4, 4 batches: 12 steps
    fit("parts", 6)  # stops after batch 1 of epoch 2
    _, rest = fit("parts", -1, ckpt_path="last")
    # (built once before the restore, to size the run for configure_optimizers; then for epoch 2)
    assert [s for s in rest.seen if s[0] == "train_dataloader"] == [("train_dataloader", 0, 0), ("train_dataloader", 2, 6)]
    assert [s for s in rest.seen if s[0] == "train"] == [s for s in whole.seen if s[0] == "train"][6:]
    for a, b in zip(rest.state_dict().values(), whole.state_dict().values()):
        torch.testing.assert_close(a, b)


@pytest.mark.ray
def test_reloading_is_refused_for_ray_datasets_from_hooks(ray_cluster, tmp_path):
    """Ray Train splits a Ray Dataset once per run: a hook that returns one cannot be called again.
    Given to fit() directly, a loader is the same object at every reload (as in Lightning)."""
    import ray.data

    class RayRows(rt.DataModule):
        def train_dataloader(self):
            ds = ray.data.from_items([{"x": [0.0, 1.0], "y": [0.0]}] * 4)
            return rt.RayDataLoader(ds, batch_size=2, dtypes=torch.float32)

    class OnRows(Records):
        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self.layer(batch["x"]), batch["y"])

        def on_train_epoch_end(self):
            pass

    module = type("M", (OnRows, rt.Module), {})()
    with pytest.raises(ConfigError, match=r"reload_dataloaders_every_n_epochs=1\) cannot reload a Ray Dataset"):
        make_trainer(tmp_path, reload_dataloaders_every_n_epochs=1).fit(module, datamodule=RayRows())
    trainer = make_trainer(tmp_path, name="explicit", max_epochs=2, reload_dataloaders_every_n_epochs=1)
    trainer.fit(module, RayRows().train_dataloader())
    assert trainer.global_step == 4


class Plateaus(Records):
    """Step and epoch ReduceLROnPlateau on the validation loss, beside an epoch StepLR: what each
    batch sees tells when every scheduler stepped."""

    def training_step(self, batch, batch_idx):
        self.seen.append(("lr", self.global_step, [g["lr"] for o in self.trainer.optimizers for g in o.param_groups]))
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        # threshold=10: never an improvement, so every plateau step halves the rate
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=10.0)
        return [opt], [{"scheduler": plateau, "monitor": "val_loss", "interval": "step", "frequency": 2},
                       {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9), "interval": "epoch"}]


def test_schedulers_step_where_lightnings_do(tmp_path):
    """The epoch StepLR steps with the epoch's last batch (before validation and
    on_train_epoch_end), the step plateau scheduler after the step's validation."""
    (_, rt_mod, rt_rows), (_, pl_mod, pl_rows) = _both(
        tmp_path, {"max_epochs": 3, "val_check_interval": 2}, module_cls=Plateaus,
        train=lambda: data(8), val=lambda: data(2))
    assert rt_mod.seen == pl_mod.seen
    assert len({tuple(s[2]) for s in rt_mod.seen if s[0] == "lr"}) > 4  # both kinds stepped
    assert rt_rows.rows == pl_rows.rows


def test_reloaded_loaders_are_sharded_on_every_rank(tmp_path):
    """On 2 ranks each reloaded epoch is split between them: disjoint halves, the new size."""
    from multirank import GlooContext, run_ranks

    from raytrainer.loop.execute import execute

    class Indexed(torch.utils.data.Dataset):
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return torch.tensor([float(i), 0.0]), torch.tensor([0.0])

    class Grows(Records, rt.Module):
        def training_step(self, batch, batch_idx):
            self.seen.append((self.current_epoch, batch[0][:, 0].int().tolist()))
            return nn.functional.mse_loss(self.layer(batch[0]), batch[1])

        def on_train_epoch_end(self):
            pass

        def train_dataloader(self):
            return DataLoader(Indexed(4 * (self.current_epoch + 1)), batch_size=2)

    def rank_fn(rank, world_size):
        module = Grows()
        execute(make_trainer(tmp_path, max_epochs=2, reload_dataloaders_every_n_epochs=1), "fit", module, None, {},
                None, GlooContext(rank, world_size))
        return module.seen
    ranks = run_ranks(rank_fn)
    for epoch, size in ((0, 4), (1, 8)):
        shards = [sorted(i for e, ids in seen if e == epoch for i in ids) for seen in ranks]
        assert sorted(shards[0] + shards[1]) == list(range(size)) and not set(shards[0]) & set(shards[1])
