"""Lightning's callbacks beyond the basics, side by side with pytorch-lightning:
GradientAccumulationScheduler (steps per epoch, weights, a resume inside an accumulating epoch),
LambdaCallback (which hooks run, in which order), DeviceStatsMonitor (what it logs, when) and
SpikeDetection (where it stops, what it writes)."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt

pl = pytest.importorskip("pytorch_lightning")
pytestmark = pytest.mark.timeout(120)


def data(n: int = 12, shuffle: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 2, generator=g), torch.randn(n, 1, generator=g)),
                      batch_size=2, shuffle=shuffle)


class Steps:
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(2, 1)
        self.epoch_ends = []

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    def on_train_epoch_end(self):
        self.epoch_ends.append((self.current_epoch, self.trainer.global_step, self.trainer.accumulate_grad_batches))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _both(tmp_path, make_callbacks, **kwargs):
    out = []
    for base, callbacks in ((rt.Module, rt.callbacks), (pl.LightningModule, pl.callbacks)):
        module = type("M", (Steps, base), {})()
        cbs = make_callbacks(callbacks)
        if base is rt.Module:
            trainer = make_trainer(tmp_path / "rt", callbacks=cbs, **kwargs)
        else:
            trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                                 enable_model_summary=False, default_root_dir=str(tmp_path / "pl"), callbacks=cbs,
                                 **kwargs)
        trainer.fit(module, data())
        out.append((trainer, module, cbs))
    return out


def test_gradient_accumulation_scheduler_steps_like_lightning(tmp_path):
    """6 batches an epoch: factor 1, then 2 from epoch 1, then 4 from epoch 2 (the last window of
    epoch 2 closes at the epoch's end with 2 batches)."""
    (ours, rt_mod, _), (theirs, pl_mod, _) = _both(
        tmp_path, lambda c: [c.GradientAccumulationScheduler(scheduling={1: 2, 2: 4})], max_epochs=3)
    assert rt_mod.epoch_ends == pl_mod.epoch_ends == [(0, 6, 1), (1, 9, 2), (2, 11, 4)]
    for a, b in zip(rt_mod.state_dict().values(), pl_mod.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="Either remove `accumulate_grad_batches` from the Trainer or remove the "
                                         "callback"):
        make_trainer(tmp_path, accumulate_grad_batches=2, callbacks=[
            rt.callbacks.GradientAccumulationScheduler({1: 2})]).fit(type("M", (Steps, rt.Module), {})(), data())
    with pytest.raises(ValueError, match=r"factors are ints >= 1"):
        rt.callbacks.GradientAccumulationScheduler({1: 0})


def test_a_resume_inside_an_accumulating_epoch_is_exact(tmp_path):
    def fit(name, max_steps, ckpt_path=None):
        module = type("M", (Steps, rt.Module), {})()
        trainer = make_trainer(tmp_path, name=name, max_epochs=3, max_steps=max_steps, enable_checkpointing=True,
                               callbacks=[rt.callbacks.GradientAccumulationScheduler({1: 2, 2: 4}),
                                          rt.callbacks.ModelCheckpoint(save_last=True, save_top_k=0)])
        torch.manual_seed(1)
        trainer.fit(module, data(shuffle=True), ckpt_path=ckpt_path)
        return module
    whole = fit("whole", -1)
    fit("parts", 8)  # 2 of epoch 1's 3 windows
    rest = fit("parts", -1, ckpt_path="last")
    assert rest.epoch_ends[-1] == whole.epoch_ends[-1] == (2, 11, 4)
    for a, b in zip(rest.state_dict().values(), whole.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_lambda_callback_runs_its_functions_where_lightning_does(tmp_path):
    def make(callbacks):
        calls = []
        callback = callbacks.LambdaCallback(
            on_train_epoch_start=lambda trainer, module: calls.append(("epoch start", trainer.current_epoch)),
            on_train_batch_end=lambda trainer, module, outputs, batch, batch_idx: calls.append(
                ("batch end", batch_idx, round(float(outputs["loss"]), 6))),
            on_fit_end=lambda trainer, module: calls.append(("fit end", trainer.global_step)))
        callback.calls = calls
        return [callback]
    (_, _, [ours]), (_, _, [theirs]) = _both(tmp_path, make, max_epochs=1, limit_train_batches=3)
    assert ours.calls == theirs.calls and ours.calls[-1] == ("fit end", 3) and len(ours.calls) == 5
    with pytest.raises(TypeError, match=r"\['on_epoch_strat'\], which are not callback hooks"):
        rt.callbacks.LambdaCallback(on_epoch_strat=print)


def test_device_stats_monitor_logs_what_lightning_logs_when_it_logs(tmp_path):
    """The same keys (``DeviceStatsMonitor.{hook}/cpu_*``), in the same calls, at the same loggers'
    steps as Lightning; values are the machine's (percentages)."""
    from row_loggers import row_loggers

    ours_cls, theirs_cls = row_loggers(pl, keep=lambda k: k.startswith("DeviceStatsMonitor."))
    observed = {}
    for who, base, mod, logger in (("rt", rt.Module, rt, ours_cls()), ("pl", pl.LightningModule, pl, theirs_cls())):
        class M(Steps, base):
            def validation_step(self, batch, batch_idx):
                self.log("val_loss", nn.functional.mse_loss(self.layer(batch[0]), batch[1]))

            test_step = validation_step

        cb = mod.callbacks.DeviceStatsMonitor()
        kw = dict(max_epochs=2, log_every_n_steps=2, callbacks=[cb], logger=logger)
        if who == "rt":
            trainer = make_trainer(tmp_path / who, **kw)
        else:
            trainer = pl.Trainer(accelerator="cpu", enable_progress_bar=False, enable_checkpointing=False,
                                 enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path), **kw)
        trainer.fit(M(), data(8), data(4))
        trainer.test(M(), data(4), verbose=False)
        observed[who] = [(step, sorted(row)) for step, row in logger.rows]
        for _, row in logger.rows:
            assert all(0.0 <= v <= 100.0 for v in row.values()), row
    assert observed["rt"] == observed["pl"]
    hooks = {key.split("/")[0] for _, keys in observed["rt"] for key in keys}
    assert hooks == {f"DeviceStatsMonitor.on_{stage}_batch_{edge}" for stage in ("train", "validation", "test")
                     for edge in ("start", "end")}
    # training: the logging steps; evaluation: every 2nd batch of each run (Lightning's rule), at
    # the loggers' step (the test after the fit: the fit's last)
    assert [(step, keys[0].split("/")[0].split(".")[1]) for step, keys in observed["rt"]][4:8] == [
        (3, "on_validation_batch_start"), (3, "on_validation_batch_end"), (5, "on_train_batch_start"),
        (5, "on_train_batch_end")]
    assert observed["rt"][-1][0] == 8
    assert {key.split("/")[1] for _, keys in observed["rt"] for key in keys} == {
        "cpu_percent", "cpu_vm_percent", "cpu_swap_percent"}
    with pytest.raises(rt.ConfigError, match="DeviceStatsMonitor.*logger=False"):
        make_trainer(tmp_path / "none", callbacks=[rt.callbacks.DeviceStatsMonitor()]).fit(
            type("M", (Steps, rt.Module), {})(), data())


def test_spike_detection_stops_where_lightning_stops_and_names_the_same_batches(tmp_path):
    """A loss 50x its usual at batch 6: both stop there with TrainingSpikeException and write the
    same batches to skip; a NaN loss is a spike too (finite_only); one below the warmup is not."""
    pytest.importorskip("torchmetrics")  # Lightning's SpikeDetection needs it; ours does not

    def fit_both(spike_at, value=50.0, **kw):
        out = {}
        for who, base, mod in (("rt", rt.Module, rt), ("pl", pl.LightningModule, pl)):
            class Spiky(Steps, base):
                def training_step(self, batch, batch_idx):
                    loss = super().training_step(batch, batch_idx)
                    return loss * value if batch_idx == spike_at else loss

            path = tmp_path / f"{who}-{spike_at}-{value}" / "skip.json"
            cb = mod.callbacks.SpikeDetection(exclude_batches_path=str(path), **{"rtol": 10.0, **kw})
            if who == "rt":
                trainer = make_trainer(tmp_path / who, max_epochs=1, callbacks=[cb])
            else:
                trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                                     enable_checkpointing=False, enable_model_summary=False, callbacks=[cb],
                                     default_root_dir=str(tmp_path))
            try:
                trainer.fit(Spiky(), data(16))
                out[who] = ("finished", trainer.global_step, None)
            except RuntimeError as e:
                out[who] = (type(e).__name__, str(e), json.loads(path.read_text()))
        return out

    both = fit_both(spike_at=6)
    assert both["rt"] == both["pl"] == ("TrainingSpikeException", "Training spike detected in batch 6", [5, 6])
    both = fit_both(spike_at=6, rtol=2.0)  # Lightning's default: this data's own jump at batch 4 is one
    assert both["rt"] == both["pl"] == ("TrainingSpikeException", "Training spike detected in batch 4", [3, 4])
    both = fit_both(spike_at=3, value=float("nan"))
    assert both["rt"] == both["pl"] == ("TrainingSpikeException", "Training spike detected in batch 3", [2, 3])
    both = fit_both(spike_at=0, warmup=1)  # batch 0 is inside the warm-up
    assert both["rt"] == both["pl"] == ("finished", 8, None)


def test_a_spike_on_one_rank_stops_every_rank(tmp_path):
    from multirank import GlooContext, run_ranks

    from raytrainer.loop.execute import execute

    def rank_fn(rank, world_size):
        class Spiky(Steps, rt.Module):
            def training_step(self, batch, batch_idx):
                loss = super().training_step(batch, batch_idx)
                return loss * 50 if (batch_idx, self.global_rank) == (3, 1) else loss

        cb = rt.callbacks.SpikeDetection(rtol=10.0, exclude_batches_path=str(tmp_path / "skip.json"))
        try:
            execute(make_trainer(tmp_path, callbacks=[cb]), "fit", Spiky(), None, {"train": data(16)}, None,
                    GlooContext(rank, world_size))
        except rt.callbacks.TrainingSpikeException as e:
            return str(e)
        return "finished"
    assert run_ranks(rank_fn) == ["Training spike detected in batch 3"] * 2
    assert json.loads((tmp_path / "skip.json").read_text()) == [2, 3]  # rank 0 wrote it


def test_on_exception_checkpoint_leaves_the_state_lightning_leaves_and_a_fit_continues_from_it(tmp_path):
    class Boom(RuntimeError):
        pass

    files = {}
    for who, base, mod in (("rt", rt.Module, rt), ("pl", pl.LightningModule, pl)):
        class Failing(Steps, base):
            def training_step(self, batch, batch_idx):
                if (self.current_epoch, batch_idx) == (1, 2):
                    raise Boom("data error")
                return super().training_step(batch, batch_idx)

        cb = mod.callbacks.OnExceptionCheckpoint(dirpath=str(tmp_path / who))
        assert cb.ckpt_path == str(tmp_path / who / "on_exception.ckpt")
        if who == "rt":
            trainer = make_trainer(tmp_path / "runs", max_epochs=2, callbacks=[cb])
        else:
            # (Lightning counts it as a checkpoint callback: enable_checkpointing=False would refuse it)
            trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                                 enable_model_summary=False, callbacks=[cb], default_root_dir=str(tmp_path))
        with pytest.raises(Boom):
            trainer.fit(Failing(), data(8))
        files[who] = torch.load(cb.ckpt_path, weights_only=True)
    assert files["rt"]["global_step"] == files["pl"]["global_step"] == 6  # 4 steps of epoch 0, 2 of epoch 1
    for key, value in files["pl"]["state_dict"].items():
        torch.testing.assert_close(files["rt"]["state_dict"][key], value)
    # the fit continues from it: the failed batch again, then the rest of the epoch
    resumed = make_trainer(tmp_path / "runs", max_epochs=2, name="resumed").fit(
        type("M", (Steps, rt.Module), {})(), data(8), ckpt_path=str(tmp_path / "rt" / "on_exception.ckpt"))
    assert resumed.global_step == 8


def test_on_exception_checkpoint_is_refused_with_several_workers(tmp_path):
    from multirank import GlooContext, run_ranks

    from raytrainer.loop.execute import execute

    def rank_fn(rank, world_size):
        cb = rt.callbacks.OnExceptionCheckpoint(dirpath=str(tmp_path))
        try:
            execute(make_trainer(tmp_path, callbacks=[cb]), "fit", type("M", (Steps, rt.Module), {})(), None,
                    {"train": data(8)}, None, GlooContext(rank, world_size))
        except rt.ConfigError as e:
            return str(e)
    assert all("OnExceptionCheckpoint needs one process; this fit has 2 workers" in m for m in run_ranks(rank_fn))
