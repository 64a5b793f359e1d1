"""Lightning features raytrainer does not implement are refused by name, never ignored; the
self.log options it does implement behave as Lightning's (side by side)."""
from __future__ import annotations

import pytest
import torch
from helpers import LinearModel, loader, make_trainer

import raytrainer as rt

pytestmark = pytest.mark.timeout(120)


def test_a_lightning_hook_that_would_not_be_called_is_an_error_before_anything_runs(tmp_path):
    calls = []

    class Model(LinearModel):
        def setup(self, stage):
            calls.append("setup")

        def configure_sharded_model(self):
            calls.append("configure_sharded_model")

    with pytest.raises(TypeError, match=r"Model overrides configure_sharded_model: Lightning hooks raytrainer "
                                        r"does not call .*rename it configure_model"):
        make_trainer(tmp_path).fit(Model(), loader())
    assert calls == []  # refused up front: nothing of the run started


@pytest.mark.parametrize("kwargs, message", [
    ({"enable_graph": True}, r"enable_graph=True\) is not supported"),
    ({"sync_dist_group": object()}, r"sync_dist_group=...\) is not supported"),
    ({"rank_zero_only": True, "sync_dist": True}, r"rank_zero_only=True, sync_dist=True"),
])
def test_log_options_that_would_be_ignored_are_refused(tmp_path, kwargs, message):
    class Model(LinearModel):
        def training_step(self, batch, batch_idx):
            loss = self.loss(batch)
            self.log("x", loss, **kwargs)
            return loss

    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path).fit(Model(), loader())


def test_an_unknown_log_argument_is_a_type_error(tmp_path):
    class Model(LinearModel):
        def training_step(self, batch, batch_idx):
            loss = self.loss(batch)
            self.log("x", loss, on_stpe=True)
            return loss

    with pytest.raises(TypeError, match="on_stpe"):
        make_trainer(tmp_path).fit(Model(), loader())


class NamesOwnLoader:
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        self.log(f"loss_{dataloader_idx}", loss, add_dataloader_idx=False)
        self.log("rank_zero", 1.0, rank_zero_only=True)


def test_add_dataloader_idx_false_and_rank_zero_only_as_lightning(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")

    class Ours(NamesOwnLoader, LinearModel):
        pass

    class Theirs(NamesOwnLoader, pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layer = torch.nn.Linear(2, 1)

    loaders = lambda: [loader(n=6, seed=1), loader(n=4, seed=2)]  # noqa: E731
    ours = make_trainer(tmp_path).validate(Ours(), loaders(), verbose=False)
    theirs = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False).validate(Theirs(), loaders(), verbose=False)
    assert [set(d) for d in ours] == [set(d) for d in theirs]
    assert all(a == pytest.approx(b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("loaders, signature", [(2, "without"), (1, "required")])
def test_dataloader_idx_in_the_step_signature_is_checked_as_lightning_checks_it(tmp_path, loaders, signature):
    """Several loaders and a step without dataloader_idx (or one loader and a dataloader_idx with no
    default): Lightning's error, word for word, before the first batch."""
    pl = pytest.importorskip("pytorch_lightning")

    class Steps:
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
            self.batches = 0

        if signature == "without":
            def test_step(self, batch, batch_idx):
                self.batches += 1
        else:
            def test_step(self, batch, batch_idx, dataloader_idx):
                self.batches += 1

    def data():
        return [torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
                for _ in range(loaders)]
    messages = []
    for base in (rt.Module, pl.LightningModule):
        module = type("Model", (Steps, base), {})()
        trainer = make_trainer(tmp_path) if base is rt.Module else pl.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=str(tmp_path))
        with pytest.raises(RuntimeError) as raised:
            trainer.test(module, data())
        messages.append(str(raised.value))
        assert module.batches == 0
    assert messages[0] == messages[1] and "dataloader_idx" in messages[0]
