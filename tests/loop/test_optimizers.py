"""Every return form of configure_optimizers trains, with its schedulers stepped as configured."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import raytrainer as rt
from helpers import LinearModel, LrRecorder, ScriptedValModel, flat_params, loader, make_trainer


def _fit_form(tmp_path, form, max_epochs=2, n=6, batch_size=2, val=False, model_cls=LinearModel,
              **model_kwargs):
    """Fit a LinearModel whose configure_optimizers returns ``form(opt_factory)``; returns the model,
    the trainer and the lr recorder."""
    class Model(model_cls):
        def configure_optimizers(self):
            return form(self, lambda: torch.optim.SGD(self.parameters(), lr=0.1))

    model = Model(**model_kwargs)
    before = flat_params(model)
    rec = LrRecorder()
    trainer = make_trainer(tmp_path, max_epochs=max_epochs, callbacks=[rec])
    trainer.fit(model, loader(n=n, batch_size=batch_size), loader(n=4, batch_size=2) if val else None)
    assert not torch.equal(before, flat_params(model))  # the returned optimizer stepped
    return model, trainer, rec


def _steplr(opt, gamma=0.5):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=gamma)


def test_form_a_single_optimizer(tmp_path):
    made = []
    model, trainer, rec = _fit_form(tmp_path, lambda m, sgd: made.append(sgd()) or made[-1])
    assert trainer.optimizers == made and trainer.lr_scheduler_configs == []
    assert rec.batch_lrs == [0.1] * 6
    assert trainer.global_step == 6


def test_form_a_list_with_one_optimizer(tmp_path):
    made = []
    model, trainer, rec = _fit_form(tmp_path, lambda m, sgd: [made.append(sgd()) or made[-1]])
    assert trainer.optimizers == made
    assert trainer.global_step == 6


def test_form_optimizers_and_schedulers_lists(tmp_path):
    def form(m, sgd):
        opt = sgd()
        return [opt], [_steplr(opt)]

    model, trainer, rec = _fit_form(tmp_path, form, max_epochs=3)
    (cfg,) = trainer.lr_scheduler_configs
    assert (cfg.interval, cfg.frequency) == ("epoch", 1)
    assert rec.epoch_lrs == pytest.approx([0.1, 0.05, 0.025])
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0125)


def test_form_dict_with_a_bare_scheduler(tmp_path):
    def form(m, sgd):
        opt = sgd()
        return {"optimizer": opt, "lr_scheduler": _steplr(opt)}

    model, trainer, rec = _fit_form(tmp_path, form)
    assert rec.batch_lrs == pytest.approx([0.1] * 3 + [0.05] * 3)


def test_form_dict_with_scheduler_config_step_frequency_2(tmp_path):
    def form(m, sgd):
        opt = sgd()
        return {"optimizer": opt, "lr_scheduler": {"scheduler": _steplr(opt), "interval": "step",
                                                   "frequency": 2, "name": "my_lr"}}

    model, trainer, rec = _fit_form(tmp_path, form)
    (cfg,) = trainer.lr_scheduler_configs
    assert (cfg.interval, cfg.frequency, cfg.name) == ("step", 2, "my_lr")
    assert rec.batch_lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0125)  # 6 steps / 2


def test_form_dict_with_plateau_and_top_level_monitor(tmp_path):
    def form(m, sgd):
        opt = sgd()
        return {"optimizer": opt, "monitor": "val_loss",
                "lr_scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=0)}

    model, trainer, rec = _fit_form(tmp_path, form, max_epochs=4, val=True, model_cls=ScriptedValModel,
                                    values=[1.0, 2.0, 0.5, 0.5])
    assert trainer.lr_scheduler_configs[0].monitor == "val_loss"
    # epoch 1 worse -> x0.1; epoch 2 better -> keep; epoch 3 flat -> x0.1
    assert rec.epoch_lrs == pytest.approx([0.1, 0.1, 0.01, 0.01])
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.001)


def test_form_plateau_monitor_inside_scheduler_config_by_step(tmp_path):
    """A step-interval plateau scheduler reads the latest train_loss (logged per step)."""
    def form(m, sgd):
        opt = sgd()
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "interval": "step",
                                                   "monitor": "train_loss"}}

    class Losses(LinearModel):  # logs a decreasing series: "max" mode never sees an improvement
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", 10.0 - self.global_step)
            return loss

    # Same name logged twice in one step: the second value wins.
    model, trainer, rec = _fit_form(tmp_path, form, max_epochs=1, n=8, model_cls=Losses)
    assert rec.batch_lrs == pytest.approx([0.1, 0.1, 0.05, 0.025])


def test_list_of_dicts_with_manual_optimization(tmp_path):
    """Two optimizers, each with its own scheduler; the module steps both (Lightning's manual mode:
    schedulers are not stepped by the loop, the module steps them)."""

    class TwoHeads(rt.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.automatic_optimization = False
            self.a = nn.Linear(2, 1)
            self.b = nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            opt_a, opt_b = self.optimizers()
            for net, opt in ((self.a, opt_a), (self.b, opt_b)):
                loss = nn.functional.mse_loss(net(x), y)
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()

        def on_train_epoch_end(self):
            sched_a, sched_b = self.lr_schedulers()
            sched_a.step()
            sched_b.step()

        def configure_optimizers(self):
            opt_a = torch.optim.SGD(self.a.parameters(), lr=0.1)
            opt_b = torch.optim.SGD(self.b.parameters(), lr=0.2)
            return [{"optimizer": opt_a, "lr_scheduler": _steplr(opt_a, 0.5)},
                    {"optimizer": opt_b, "lr_scheduler": {"scheduler": _steplr(opt_b, 0.1),
                                                          "interval": "step"}}]

    model = TwoHeads()
    a0, b0 = flat_params(model.a), flat_params(model.b)
    trainer = make_trainer(tmp_path, max_epochs=2)
    result = trainer.fit(model, loader(n=6, batch_size=2))
    assert result.global_step == 12  # two optimizer steps per batch
    assert not torch.equal(a0, flat_params(model.a)) and not torch.equal(b0, flat_params(model.b))
    opt_a, opt_b = trainer.optimizers
    # Stepped only by the module's on_train_epoch_end: once per epoch, whatever the interval says.
    assert opt_a.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 2)
    assert opt_b.param_groups[0]["lr"] == pytest.approx(0.2 * 0.1 ** 2)


def test_optimizer_with_param_groups_and_other_optimizer_types(tmp_path):
    class Model(LinearModel):
        def configure_optimizers(self):
            return torch.optim.Adam([{"params": [self.layer.weight], "lr": 0.05},
                                     {"params": [self.layer.bias], "lr": 0.0}])

    model = Model()
    w0, b0 = model.layer.weight.detach().clone(), model.layer.bias.detach().clone()
    make_trainer(tmp_path).fit(model, loader())
    assert not torch.equal(w0, model.layer.weight)
    assert torch.equal(b0, model.layer.bias)  # lr 0 group untouched
