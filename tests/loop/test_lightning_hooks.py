"""The hooks a LightningModule overrides to change a training step, side by side with
pytorch-lightning (the spec): ``optimizer_step`` (LR warm-up, closure optimizers such as LBFGS),
``optimizer_zero_grad``, ``backward``, ``configure_gradient_clipping``, ``lr_scheduler_step``, the
three batch-transfer hooks (the datamodule's where it overrides them), ``configure_model``, the
evaluation-mode hooks, and step signatures without ``batch_idx``. Each case runs the same module
code under both trainers and compares what a user observes: the calls, their order and
arguments, the weights, ``global_step``."""
from __future__ import annotations

from enum import Enum

import pytest
import torch
from helpers import make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt

pl = pytest.importorskip("pytorch_lightning")
pytestmark = pytest.mark.timeout(120)


def data(n: int, batch_size: int = 2, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 2, generator=g), torch.randn(n, 1, generator=g)),
                      batch_size=batch_size)


def run_both(code: type, trainer_kwargs: dict, *loaders, pl_kwargs: dict | None = None, datamodule=None,
             **module_kwargs):
    """Fit ``code`` (a mixin of module code) under raytrainer and under Lightning; return both
    (trainer, module) pairs. ``datamodule``: a factory taking the base class to subclass."""
    results = []
    for base, fit in ((rt.Module, _fit_rt), (pl.LightningModule, _fit_pl)):
        module = type(f"{code.__name__}On{base.__name__}", (code, base), {})(**module_kwargs)
        dm = datamodule(rt.DataModule if base is rt.Module else pl.LightningDataModule) if datamodule else None
        results.append(fit(module, trainer_kwargs, loaders, pl_kwargs or {}, dm))
    return results


def _fit_rt(module, kwargs, loaders, pl_kwargs, dm):
    trainer = make_trainer(_fit_rt.tmp, **kwargs)
    trainer.fit(module, *loaders, datamodule=dm) if dm else trainer.fit(module, *loaders)
    return trainer, module


def _fit_pl(module, kwargs, loaders, pl_kwargs, dm):
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=str(_fit_rt.tmp), **{"max_epochs": 1, **kwargs, **pl_kwargs})
    trainer.fit(module, *loaders, datamodule=dm) if dm else trainer.fit(module, *loaders)
    return trainer, module


@pytest.fixture(autouse=True)
def _tmp(tmp_path):
    _fit_rt.tmp = tmp_path


def same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=name)


# ---------------------------------------------------------------- every step hook, in order

class Recorder:
    """Records each hook Lightning calls during a step, with its arguments."""

    def __init__(self, none_at=(1,)):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(2, 1)
        self.none_at, self.calls = set(none_at), []

    def rec(self, *args):
        self.calls.append(tuple(a.value if isinstance(a, Enum) else a for a in args))  # Lightning's TrainerFn

    def training_step(self, batch, batch_idx):
        self.rec("training_step", batch_idx)
        if batch_idx in self.none_at:
            return None
        return nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.rec("validation_step", batch_idx, self.training, self.layer.training)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure):
        self.rec("optimizer_step", epoch, batch_idx, type(optimizer).__name__,
                 isinstance(optimizer, torch.optim.SGD))
        optimizer.step(closure=optimizer_closure)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        self.rec("optimizer_zero_grad", epoch, batch_idx, type(optimizer).__name__)
        optimizer.zero_grad()

    def on_before_zero_grad(self, optimizer):
        self.rec("on_before_zero_grad")

    def backward(self, loss, *args, **kwargs):
        self.rec("backward", round(loss.item(), 6))
        loss.backward(*args, **kwargs)

    def on_before_backward(self, loss):
        self.rec("on_before_backward", round(loss.item(), 6))

    def on_after_backward(self):
        self.rec("on_after_backward")

    def on_before_optimizer_step(self, optimizer):
        self.rec("on_before_optimizer_step", type(optimizer).__name__)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.rec("configure_gradient_clipping", gradient_clip_val, gradient_clip_algorithm)
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def lr_scheduler_step(self, scheduler, metric):
        self.rec("lr_scheduler_step", type(scheduler).__name__, metric)
        scheduler.step()

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self.rec("on_before_batch_transfer", dataloader_idx)
        return batch

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        self.rec("transfer_batch_to_device", str(device), dataloader_idx)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.rec("on_after_batch_transfer", dataloader_idx)
        return batch

    def on_train_batch_start(self, batch, batch_idx):
        self.rec("on_train_batch_start", batch_idx)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.rec("on_train_batch_end", batch_idx, self.global_step, sorted(outputs))

    def on_validation_model_zero_grad(self):
        self.rec("on_validation_model_zero_grad")
        super().on_validation_model_zero_grad()

    def on_validation_model_eval(self):
        self.rec("on_validation_model_eval")
        super().on_validation_model_eval()

    def on_validation_start(self):
        self.rec("on_validation_start")

    def on_validation_end(self):
        self.rec("on_validation_end")

    def configure_model(self):
        self.rec("configure_model", self.layer.weight.device.type)

    def setup(self, stage):
        self.rec("setup", stage)

    def on_fit_start(self):
        self.rec("on_fit_start")


@pytest.mark.parametrize("none_at", [(1,), (2, 3)], ids=["none-mid-window", "none-whole-window"])
def test_every_step_hook_is_called_in_lightnings_order_with_its_arguments(none_at):
    """Accumulation over 2 batches, clipping, a step scheduler, a validation in the middle of the
    epoch; training_step returns None inside a window, or for a whole window (Lightning still
    counts the optimizer step)."""
    kwargs = dict(accumulate_grad_batches=2, gradient_clip_val=0.5, limit_val_batches=1, val_check_interval=4)
    (ours, rt_mod), (theirs, pl_mod) = run_both(Recorder, kwargs, data(12), data(4), none_at=none_at)
    assert rt_mod.calls == pl_mod.calls
    assert ours.global_step == theirs.global_step == 3
    same_weights(rt_mod, pl_mod)


# ---------------------------------------------------------------- optimizer_step overrides

class WarmUp:
    """Lightning's docs recipe: a linear LR warm-up in optimizer_step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(2, 1)
        self.lrs = []

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure):
        optimizer.step(closure=optimizer_closure)
        if self.trainer.global_step < 5:
            scale = min(1.0, float(self.trainer.global_step + 1) / 5)
            for pg in optimizer.param_groups:
                pg["lr"] = scale * 0.05
        self.lrs.append(optimizer.param_groups[0]["lr"])


class Lbfgs:
    """A closure optimizer: LBFGS calls the closure (training_step, zero_grad, backward) several
    times per step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(2, 1)
        self.closure_calls = 0

    def training_step(self, batch, batch_idx):
        self.closure_calls += 1
        return nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=4)


@pytest.mark.parametrize("code", [WarmUp, Lbfgs])
def test_optimizer_step_overrides_and_closure_optimizers_train_as_in_lightning(code):
    (ours, rt_mod), (theirs, pl_mod) = run_both(code, {"max_epochs": 2}, data(8, 4))
    assert ours.global_step == theirs.global_step == 4
    same_weights(rt_mod, pl_mod)
    if code is WarmUp:
        assert rt_mod.lrs == pl_mod.lrs and rt_mod.lrs[:2] == pytest.approx([0.01, 0.02])
    else:
        assert rt_mod.closure_calls == pl_mod.closure_calls > 4  # several calls per step


def test_an_optimizer_step_that_never_runs_the_closure_is_a_clear_error(tmp_path):
    class Skips(WarmUp, rt.Module):
        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure):
            pass  # forgot optimizer.step(closure=optimizer_closure)

    with pytest.raises(RuntimeError, match=r"Skips.optimizer_step did not call the optimizer_closure"):
        make_trainer(tmp_path).fit(Skips(), data(4))


# ---------------------------------------------------------------- data hooks and step signatures

class Augments:
    """Batch hooks that change the batch; steps written without batch_idx."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(2, 1)
        self.val_sums = []

    def on_before_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return [x + dataloader_idx, y]

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return [x * 2, y] if self.training else batch

    def training_step(self, batch):
        return nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.val_sums.append((dataloader_idx, round(float(batch[0].sum()), 5)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_batch_transfer_hooks_change_what_steps_see_and_steps_may_omit_batch_idx():
    (_, rt_mod), (_, pl_mod) = run_both(Augments, {}, data(8), [data(4, seed=1), data(2, seed=2)])
    assert rt_mod.val_sums == pl_mod.val_sums and {i for i, _ in rt_mod.val_sums} == {0, 1}
    same_weights(rt_mod, pl_mod)


def test_a_datamodules_transfer_hook_is_used_instead_of_the_modules():
    def datamodule(base):
        class Data(base):
            def train_dataloader(self):
                return data(8)

            def on_after_batch_transfer(self, batch, dataloader_idx):
                return [batch[0], batch[1] * 0]  # the targets zeroed: the module's hook is not used

        return Data()

    (_, rt_mod), (_, pl_mod) = run_both(Augments, {}, datamodule=datamodule)
    same_weights(rt_mod, pl_mod)


# ---------------------------------------------------------------- model hooks and modes

class FrozenNorm:
    """A BatchNorm kept in eval mode (frozen statistics) while the rest trains; layers built in
    configure_model; OneCycleLR sized from estimated_stepping_batches in configure_optimizers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.BatchNorm1d(2)
        self.head = None
        self.modes = []

    def configure_model(self):
        if self.head is None:
            torch.manual_seed(1)
            self.head = nn.Linear(2, 1)

    def on_train_epoch_start(self):
        self.norm.eval()

    def training_step(self, batch, batch_idx):
        self.modes.append((self.training, self.norm.training))
        return nn.functional.mse_loss(self.head(self.norm(batch[0])), batch[1])

    def validation_step(self, batch, batch_idx):
        self.modes.append(("val", self.training, self.norm.training))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        total = self.trainer.estimated_stepping_batches
        self.total = total
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.1, total_steps=int(total)), "interval": "step"}}


def test_submodule_modes_configure_model_and_estimated_steps_as_in_lightning():
    (ours, rt_mod), (theirs, pl_mod) = run_both(FrozenNorm, {"max_epochs": 2, "val_check_interval": 2},
                                                data(8), data(4))
    assert rt_mod.total == pl_mod.total == 8
    assert rt_mod.modes == pl_mod.modes and (True, False) in rt_mod.modes
    same_weights(rt_mod, pl_mod)


def test_evaluation_mode_hooks_can_keep_dropout_on(tmp_path):
    """on_validation_model_eval/train overridden (MC dropout): raytrainer calls them, the module
    decides the mode."""
    class MCDropout(rt.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.drop, self.seen = nn.Linear(2, 1), nn.Dropout(0.5), []

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self.drop(self.layer(batch[0])), batch[1])

        def validation_step(self, batch, batch_idx):
            self.seen.append(self.drop.training)

        def on_validation_model_eval(self):
            self.eval()
            self.drop.train()

        def on_validation_model_train(self):
            self.train()
            self.seen.append("train-hook")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = MCDropout()
    make_trainer(tmp_path).fit(module, data(4), data(2))
    assert module.seen == [True, "train-hook"]


@pytest.mark.parametrize("code", [WarmUp, Lbfgs])
def test_step_hooks_under_ddp_on_two_ranks_equal_one_process(tmp_path, code):
    """optimizer_step's closure under DDP (gradients all-reduced inside it, accumulation windows
    under no_sync), with clipping: 2 gloo ranks of batch 2 train as one process of batch 4."""
    from multirank import GlooContext, run_ranks

    from raytrainer.loop.execute import execute

    # (LBFGS without clipping: clipped quasi-Newton steps diverge, and a diverging run amplifies
    # the last bit of the all-reduce's rounding)
    kwargs = dict(max_epochs=2) if code is Lbfgs else dict(max_epochs=2, gradient_clip_val=0.5, accumulate_grad_batches=2)

    def module():
        return type(f"{code.__name__}Rt", (code, rt.Module), {})()

    def rank_fn(rank, world):
        m = module()
        execute(make_trainer(tmp_path / "ranks", **kwargs), "fit", m, None, {"train": data(16, 2)}, None,
                GlooContext(rank, world))
        return {k: v.detach().clone() for k, v in m.state_dict().items()}

    ranks = run_ranks(rank_fn)
    alone = module()
    make_trainer(tmp_path / "alone", **kwargs).fit(alone, data(16, 4))
    for (name, a), b in zip(alone.state_dict().items(), ranks[0].values()):
        # LBFGS's curvature estimate magnifies the all-reduce's rounding (1e-5 relative seen)
        tol = dict(rtol=1e-3, atol=1e-5) if code is Lbfgs else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
