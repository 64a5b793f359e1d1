"""The Trainer surface callbacks use (the built-in ones use nothing else): Lightning's attributes,
``trainer.strategy``, and raytrainer's checkpoint boundary and ``save_checkpoint``."""
from __future__ import annotations

import os

import pytest
import torch

import raytrainer as rt
from helpers import LinearModel, loader, make_trainer


class Observer(rt.Callback):
    def __init__(self):
        self.seen = []

    def on_fit_start(self, trainer, pl_module):
        strategy = trainer.strategy
        self.seen.append(("strategy", strategy.world_size, strategy.global_rank, strategy.is_global_zero,
                          strategy.root_device.type, strategy.broadcast({"a": 1}),
                          float(strategy.reduce(torch.tensor(3.0))), strategy.all_gather_object(5)))
        strategy.barrier()
        self.seen.append(("sizes", trainer.num_training_batches, trainer.num_val_batches))

    def on_validation_end(self, trainer, pl_module):
        self.seen.append(("validation", trainer.state.fn, trainer.state.stage, trainer.validating))

    def on_checkpoint_boundary(self, trainer, pl_module):
        self.seen.append(("boundary", trainer.checkpoint_boundary, trainer.global_step,
                          trainer.boundary_checkpoint_path.rsplit("/", 1)[-1]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(("step", trainer.state.stage, trainer.checkpoint_boundary))


def test_callbacks_see_the_strategy_sizes_state_and_boundaries(tmp_path):
    obs = Observer()
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[obs], limit_val_batches=2)
    trainer.fit(LinearModel(), loader(n=8, batch_size=4), loader(n=12, batch_size=4))
    assert obs.seen[0] == ("strategy", 1, 0, True, "cpu", {"a": 1}, 3.0, [5])
    assert obs.seen[1] == ("sizes", 2, [2])  # limit_val_batches applied to the 3-batch val loader
    assert ("validation", "fit", "validate", True) in obs.seen
    assert [s for s in obs.seen if s[0] == "step"] == [("step", "train", None)] * 2  # no boundary mid-step
    boundaries = [s for s in obs.seen if s[0] == "boundary"]
    assert boundaries == [("boundary", "step", 1, "step=000000001.ckpt"), ("boundary", "step", 2, "step=000000002.ckpt"),
                          ("boundary", "epoch", 2, "step=000000002-epoch_end.ckpt")]
    assert trainer.checkpoint_boundary is None and trainer.state.fn == "fit"
    (metrics,) = trainer.validate(dataloaders=loader(n=4), verbose=False)
    assert trainer.state.fn == "validate" and "val_loss" in metrics


class SavesAtStep(rt.Callback):
    def __init__(self, step):
        self.step, self.uris = step, []

    def on_checkpoint_boundary(self, trainer, pl_module):
        if trainer.global_step == self.step and trainer.checkpoint_boundary == "step":
            self.uris.append(trainer.save_checkpoint())
            self.uris.append(trainer.save_checkpoint())  # once per position: the same checkpoint


def test_save_checkpoint_commits_the_current_position_once_and_refuses_what_it_cannot_do(tmp_path):
    saver = SavesAtStep(3)
    trainer = make_trainer(tmp_path, max_steps=5, max_epochs=-1, callbacks=[saver])
    with pytest.raises(RuntimeError, match=r"save_checkpoint\(\) needs a running or finished fit"):
        trainer.save_checkpoint()
    trainer.fit(LinearModel(), loader(n=40))
    first, again = saver.uris
    assert first == again and first.endswith("/checkpoints/step=000000003.ckpt")
    assert rt.load_checkpoint(first)["global_step"] == 3  # committed when save_checkpoint returned
    assert trainer.save_checkpoint().endswith("/checkpoints/step=000000005.ckpt")  # after fit: where it ended
    exported = trainer.save_checkpoint(str(tmp_path / "export" / "model.ckpt"))  # one Lightning file, there
    assert exported == str(tmp_path / "export" / "model.ckpt") and os.listdir(tmp_path / "export") == ["model.ckpt"]
    assert torch.load(exported, weights_only=True)["global_step"] == 5
    with pytest.raises(ValueError, match=r"save_checkpoint\(weights_only=True\) needs a filepath"):
        trainer.save_checkpoint(weights_only=True)
