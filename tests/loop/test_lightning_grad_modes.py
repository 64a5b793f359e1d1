"""``inference_mode``, side by side with pytorch-lightning: trainer.validate/test/predict run
under ``torch.inference_mode`` (hooks included) unless ``inference_mode=False``; the validation
inside fit always under ``torch.no_grad``. On 2 CPU ranks (gloo) Lightning uses no_grad: so do we."""
from __future__ import annotations

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


def data(n: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 2, generator=g), torch.randn(n, 1, generator=g)), batch_size=2)


class RecordsGradMode:
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.modes = []

    def _note(self, where):
        self.modes.append((where, torch.is_inference_mode_enabled(), torch.is_grad_enabled()))

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self._note("validation_step")
        self.log("val_loss", nn.functional.mse_loss(self.layer(batch[0]), batch[1]), sync_dist=True)

    def test_step(self, batch, batch_idx):
        self._note("test_step")
        self.log("test_loss", nn.functional.mse_loss(self.layer(batch[0]), batch[1]), sync_dist=True)

    def predict_step(self, batch, batch_idx):
        self._note("predict_step")
        return self.layer(batch[0])

    def on_validation_start(self):
        self._note("on_validation_start")

    def on_test_epoch_end(self):
        self._note("on_test_epoch_end")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("inference_mode", [True, False])
def test_evaluation_grad_modes_are_lightnings(tmp_path, inference_mode):
    runs = []
    for base in (rt.Module, pl.LightningModule):
        module = type("M", (RecordsGradMode, base), {})()
        kwargs = dict(max_epochs=1, inference_mode=inference_mode, num_sanity_val_steps=0, logger=False)
        if base is rt.Module:
            trainer = make_trainer(tmp_path, **kwargs)
        else:
            trainer = pl.Trainer(accelerator="cpu", enable_progress_bar=False, enable_checkpointing=False,
                                 enable_model_summary=False, default_root_dir=str(tmp_path), **kwargs)
        trainer.fit(module, data(), data())
        trainer.validate(module, data())
        trainer.test(module, data())
        predictions = trainer.predict(module, data())
        runs.append((module.modes, [p.is_inference() for p in predictions]))
    assert runs[0] == runs[1]
    assert ("test_step", inference_mode, False) in runs[0][0] and ("validation_step", False, False) in runs[0][0]


def test_two_cpu_ranks_evaluate_under_no_grad_as_lightning_does_over_gloo(tmp_path):
    def rank_fn(rank, world_size):
        module = type("M", (RecordsGradMode, rt.Module), {})()
        out = execute(make_trainer(tmp_path), "test", module, None, {"test": data(8)}, None, GlooContext(rank, world_size))
        return module.modes, out["metrics"]
    for modes, metrics in run_ranks(rank_fn):
        assert {m[1:] for m in modes} == {(False, False)} and "test_loss" in metrics
