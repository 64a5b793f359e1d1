"""Lightning's checkpoint files, both ways, side by side with pytorch-lightning: a raytrainer
``.ckpt`` (``trainer.save_checkpoint(path)``) read by pytorch-lightning's ``load_from_checkpoint``
and by a plain ``torch.load(weights_only=True)``; a Lightning ``.ckpt`` and a raytrainer
checkpoint folder read by ``rt.Module.load_from_checkpoint`` (hparams, overrides,
``on_load_checkpoint`` before the weights)."""
from __future__ import annotations

import pytest
import torch
from helpers import as_legacy_folder, make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt
from raytrainer.errors import CheckpointError

pl = pytest.importorskip("pytorch_lightning")
pytestmark = pytest.mark.timeout(120)


def data(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)), batch_size=4)


class Regressor:
    def __init__(self, hidden: int = 4, lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.loaded = []

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def on_load_checkpoint(self, checkpoint):
        self.loaded.append(sorted(checkpoint["state_dict"]))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)]


RtRegressor = type("RtRegressor", (Regressor, rt.Module), {})
PlRegressor = type("PlRegressor", (Regressor, pl.LightningModule), {})


def _pl_trainer(tmp_path, **kw):
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), **kw)


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, msg=name)


def test_a_raytrainer_ckpt_is_read_by_lightning_and_by_torch_load(tmp_path):
    ours = RtRegressor(hidden=5)
    trainer = make_trainer(tmp_path, max_epochs=2)
    trainer.fit(ours, data())
    path = trainer.save_checkpoint(str(tmp_path / "model.ckpt"))

    plain = torch.load(path, weights_only=True)
    assert (plain["epoch"], plain["global_step"], plain["hyper_parameters"]) == (2, 8, {"hidden": 5, "lr": 0.1})
    assert len(plain["optimizer_states"]) == 1 and len(plain["lr_schedulers"]) == 1
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    net.load_state_dict({k.removeprefix("net."): v for k, v in plain["state_dict"].items()})

    theirs = PlRegressor.load_from_checkpoint(path)  # pytorch-lightning's own reader
    assert theirs.hparams == {"hidden": 5, "lr": 0.1}
    _same_weights(theirs, ours)
    # ... and Lightning continues training from it: its counters are the file's
    resumed = _pl_trainer(tmp_path / "pl", max_epochs=3)
    resumed.fit(PlRegressor(hidden=5), data(), ckpt_path=path)
    assert (resumed.current_epoch, resumed.global_step) == (3, 12)

    weights = trainer.save_checkpoint(str(tmp_path / "weights.ckpt"), weights_only=True)
    assert "optimizer_states" not in torch.load(weights, weights_only=True)
    _same_weights(RtRegressor.load_from_checkpoint(weights), ours)


def test_load_from_checkpoint_reads_lightnings_ckpt_like_lightning(tmp_path):
    theirs = PlRegressor(hidden=6, lr=0.05)
    trainer = _pl_trainer(tmp_path, max_epochs=1)
    trainer.fit(theirs, data())
    trainer.save_checkpoint(tmp_path / "pl.ckpt")

    ours = RtRegressor.load_from_checkpoint(str(tmp_path / "pl.ckpt"), lr=0.5)  # an override wins
    again = PlRegressor.load_from_checkpoint(tmp_path / "pl.ckpt", lr=0.5)
    assert dict(ours.hparams) == dict(again.hparams) == {"hidden": 6, "lr": 0.5}
    _same_weights(ours, theirs)
    assert ours.loaded == again.loaded == [["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]]
    assert ours.training and again.training  # both as constructed: in training mode


def test_load_from_checkpoint_reads_a_run_checkpoint_and_on_load_checkpoint_can_rename_keys(tmp_path):
    trainer = make_trainer(tmp_path, max_epochs=1, enable_checkpointing=True)
    trainer.fit(RtRegressor(hidden=3), data())
    path = trainer.checkpoint_callback.best_model_path
    assert path.endswith("/checkpoints/step=000000004-epoch_end.ckpt")  # the run's own checkpoint: one file
    plain = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))  # Lightning users' first habit
    plain.load_state_dict({k.removeprefix("net."): v for k, v in torch.load(path, weights_only=True)["state_dict"].items()})
    _same_weights(plain, trainer.lightning_module.net)

    class Renamed(RtRegressor):  # the layer was renamed since the checkpoint was written
        def __init__(self, hidden=4, lr=0.1):
            super().__init__(hidden, lr)
            self.body = self.net
            del self.net

        def on_load_checkpoint(self, checkpoint):
            checkpoint["state_dict"] = {k.replace("net.", "body."): v for k, v in checkpoint["state_dict"].items()}

    model = Renamed.load_from_checkpoint(path, map_location="cpu")
    assert model.hparams.hidden == 3 and model.body[0].weight.shape == (3, 3)
    assert PlRegressor.load_from_checkpoint(path).hparams.hidden == 3  # pytorch-lightning reads it as is
    with pytest.raises(RuntimeError, match=r"size mismatch for net.0.weight"):
        RtRegressor.load_from_checkpoint(path, hidden=7)  # a mismatched model: strict by default
    RtRegressor.load_from_checkpoint(path, map_location=lambda storage, location: storage)
    # The folder format before .ckpt files still loads (with a deprecation warning); its tensors
    # load on the CPU, so torch's function form of map_location is refused with the reason.
    folder = as_legacy_folder(path)
    with pytest.warns(DeprecationWarning, match="the format before .ckpt files"):
        _same_weights(Renamed.load_from_checkpoint(folder).body, model.body)
    with pytest.raises(ValueError, match="map_location as a function applies to .ckpt files"):
        RtRegressor.load_from_checkpoint(folder, map_location=lambda storage, location: storage)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        RtRegressor.load_from_checkpoint(str(tmp_path / "nothing.ckpt"))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        RtRegressor.load_from_checkpoint(str(tmp_path / "junk.ckpt"))


def _fit_ours(tmp_path, name, max_epochs, ckpt_path=None, **kw):
    model = RtRegressor()
    trainer = make_trainer(tmp_path, name=name, max_epochs=max_epochs, **kw)
    torch.manual_seed(1)
    trainer.fit(model, DataLoader(data().dataset, batch_size=4, shuffle=True), ckpt_path=ckpt_path)
    return trainer, model


def test_fit_continues_a_lightning_run_from_its_ckpt(tmp_path):
    """Lightning trains 2 epochs and saves; raytrainer continues to 4: the same weights as
    Lightning's own 4-epoch run (weights, momentum, scheduler and counters carried over)."""
    def lightning(max_epochs):
        model = PlRegressor()
        trainer = _pl_trainer(tmp_path / f"pl{max_epochs}", max_epochs=max_epochs)
        trainer.fit(model, data())
        return trainer, model
    first, _ = lightning(2)
    first.save_checkpoint(tmp_path / "two.ckpt")
    _, whole = lightning(4)
    ours = RtRegressor()
    trainer = make_trainer(tmp_path, name="continued", max_epochs=4)
    trainer.fit(ours, data(), ckpt_path=str(tmp_path / "two.ckpt"))
    assert (trainer.global_step, trainer.current_epoch) == (16, 4)
    _same_weights(ours, whole)


def test_an_exported_ckpt_resumes_exactly_and_a_mid_epoch_lightning_ckpt_restarts_its_epoch(tmp_path):
    _, whole = _fit_ours(tmp_path, "whole", 3)
    first, _ = _fit_ours(tmp_path, "first", 1)
    path = first.save_checkpoint(str(tmp_path / "one.ckpt"))
    _, rest = _fit_ours(tmp_path, "rest", 3, ckpt_path=path)
    _same_weights(rest, whole)

    class SavesMidEpoch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:  # after 2 of the epoch's 4 batches
                trainer.save_checkpoint(tmp_path / "mid.ckpt")
    _pl_trainer(tmp_path / "mid", max_epochs=1, callbacks=[SavesMidEpoch()]).fit(PlRegressor(), data())
    with pytest.warns(UserWarning, match=r"after 2 batches of epoch 0, without the position of its data loader"):
        trainer, _ = _fit_ours(tmp_path, "from-mid", 1, ckpt_path=str(tmp_path / "mid.ckpt"))
    assert trainer.global_step == 2 + 4  # the whole epoch 0 again
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk.ckpt is not a checkpoint file"):
        make_trainer(tmp_path).fit(RtRegressor(), data(), ckpt_path=str(tmp_path / "junk.ckpt"))


class Data:
    """A datamodule with hparams and a state of its own, as Lightning's docs show."""

    def __init__(self, batch_size: int = 4, n: int = 16):
        super().__init__()
        self.save_hyperparameters()
        self.epochs_served = 0

    def train_dataloader(self):
        self.epochs_served += 1
        return DataLoader(data(self.hparams.n).dataset, batch_size=self.hparams.batch_size)

    def state_dict(self):
        return {"epochs_served": self.epochs_served}

    def load_state_dict(self, state):
        self.epochs_served = state["epochs_served"]


RtData = type("RtData", (Data, rt.DataModule), {})
PlData = type("PlData", (Data, pl.LightningDataModule), {})


def test_the_datamodule_hparams_and_state_are_in_the_ckpt_both_ways_and_stay_attached(tmp_path):
    ours, theirs = make_trainer(tmp_path / "rt", max_epochs=2), _pl_trainer(tmp_path / "pl", max_epochs=2)
    ours.fit(RtRegressor(), datamodule=RtData(batch_size=8))
    theirs.fit(PlRegressor(), datamodule=PlData(batch_size=8))
    ours.save_checkpoint(tmp_path / "rt.ckpt")
    theirs.save_checkpoint(tmp_path / "pl.ckpt")
    files = [torch.load(tmp_path / f"{who}.ckpt", weights_only=True) for who in ("rt", "pl")]
    for ckpt, cls_name in zip(files, ("RtData", "PlData")):
        assert ckpt["datamodule_hyper_parameters"] == {"batch_size": 8, "n": 16}
        assert ckpt[cls_name] == {"epochs_served": 1}  # Lightning's key: the datamodule's class name
    # Either library's file builds either library's datamodule (hparams, overrides, state).
    for path in (tmp_path / "rt.ckpt", tmp_path / "pl.ckpt"):
        dm = RtData.load_from_checkpoint(str(path), n=32)
        assert (dict(dm.hparams), dm.epochs_served) == ({"batch_size": 8, "n": 32}, 1 if "rt" in path.name else 0)
    assert PlData.load_from_checkpoint(str(tmp_path / "rt.ckpt")).hparams == {"batch_size": 8, "n": 16}

    # After fit, the trainer keeps its module and datamodule (a stage without one leaves it), as Lightning.
    for trainer, dm_cls in ((ours, RtData), (theirs, PlData)):
        assert isinstance(trainer.datamodule, dm_cls) and trainer.lightning_module is not None
    class Validated(RtRegressor):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.training_step(batch, batch_idx))
    ours.validate(Validated(), data())
    assert isinstance(ours.datamodule, RtData)
