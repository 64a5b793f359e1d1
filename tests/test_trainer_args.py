"""Every Trainer argument does what it says: counted steps, validations, files and weights."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import raytrainer as rt
from helpers import (GradsBeforeStep, LinearModel, LrRecorder, ScriptedValModel, SpySGD, csv_column,
                     csv_path, flat_params, loader, make_trainer, read_csv, tensors)


# ---------------------------------------------------------------- max_epochs / max_steps

def test_max_epochs_runs_every_batch_of_every_epoch(tmp_path):
    model = LinearModel()
    trainer = make_trainer(tmp_path, max_epochs=3)
    result = trainer.fit(model, loader(n=10, batch_size=4))  # 3 batches per epoch
    assert model.train_calls == 9
    assert model.train_batch_sizes == [4, 4, 2] * 3
    assert result.global_step == 9 == trainer.global_step
    assert result.current_epoch == 3


def test_max_steps_stops_mid_epoch(tmp_path):
    model = LinearModel()
    trainer = make_trainer(tmp_path, max_epochs=None, max_steps=5)
    result = trainer.fit(model, loader(n=10, batch_size=4))
    assert model.train_calls == 5
    assert result.global_step == 5
    assert result.current_epoch == 2  # the second epoch's end ran (Lightning); a resume continues it


def test_max_steps_wins_over_max_epochs_and_counts_optimizer_steps(tmp_path):
    model = LinearModel()
    trainer = make_trainer(tmp_path, max_epochs=10, max_steps=3, accumulate_grad_batches=2)
    result = trainer.fit(model, loader(n=16, batch_size=2))  # 8 batches per epoch
    assert result.global_step == 3
    assert model.train_calls == 6  # 3 windows of 2 batches


def test_max_epochs_limits_before_max_steps(tmp_path):
    model = LinearModel()
    result = make_trainer(tmp_path, max_epochs=2, max_steps=100).fit(model, loader(n=10, batch_size=4))
    assert (model.train_calls, result.global_step, result.current_epoch) == (6, 6, 2)


# ---------------------------------------------------------------- accumulate_grad_batches

def test_accumulate_grad_batches_steps_every_k_and_at_epoch_end(tmp_path):
    spy = {}

    def factory(params):
        spy["opt"] = SpySGD(params, lr=0.1)
        return spy["opt"]

    model = LinearModel(optimizer_factory=factory)
    trainer = make_trainer(tmp_path, max_epochs=2, accumulate_grad_batches=2)
    result = trainer.fit(model, loader(n=10, batch_size=2))  # 5 batches: windows [0,1] [2,3] [4]
    assert model.train_calls == 10
    assert spy["opt"].steps == 6  # 3 per epoch, the last (partial) window steps too
    assert result.global_step == 6


def test_accumulated_gradients_are_the_window_mean(tmp_path):
    """Two batches of 2 accumulated == one SGD step on the mean of the two batch losses."""
    dl = loader(n=8, batch_size=2)
    model = LinearModel(lr=0.1)
    reference = copy.deepcopy(model.layer)
    make_trainer(tmp_path, accumulate_grad_batches=2).fit(model, dl)

    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    batches = list(dl)
    for i in range(0, 4, 2):
        opt.zero_grad()
        for x, y in batches[i:i + 2]:
            (nn.functional.mse_loss(reference(x), y) / 2).backward()
        opt.step()
    torch.testing.assert_close(flat_params(model.layer), flat_params(reference))


# ---------------------------------------------------------------- gradient clipping

def _big_gradient_fit(tmp_path, **trainer_kwargs):
    spy, before = {}, GradsBeforeStep()

    def factory(params):
        spy["opt"] = SpySGD(params, lr=1e-4)
        return spy["opt"]

    model = LinearModel(optimizer_factory=factory)
    make_trainer(tmp_path, max_steps=3, callbacks=[before], **trainer_kwargs).fit(
        model, loader(n=12, batch_size=4, scale=50.0))  # large targets: large gradients
    return before.grads, spy["opt"].grads


def test_gradient_clip_norm_scales_total_norm_to_clip_val(tmp_path):
    raw, stepped = _big_gradient_fit(tmp_path, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    assert len(raw) == len(stepped) == 3
    for raw_grads, clipped in zip(raw, stepped):
        raw_norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in raw_grads]))
        assert raw_norm > 5.0  # the hook saw the unclipped gradients
        clipped_norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in clipped]))
        assert clipped_norm.item() == pytest.approx(0.5, rel=1e-4)
        for r, c in zip(raw_grads, clipped):  # same direction, scaled by clip / norm
            torch.testing.assert_close(c, r * (0.5 / (raw_norm + 1e-6)))


def test_gradient_clip_value_clamps_each_element(tmp_path):
    raw, stepped = _big_gradient_fit(tmp_path, gradient_clip_val=0.3, gradient_clip_algorithm="value")
    assert len(stepped) == 3
    assert any((g.abs() > 0.3).any() for grads in raw for g in grads)
    for raw_grads, clipped in zip(raw, stepped):
        for r, c in zip(raw_grads, clipped):
            torch.testing.assert_close(c, r.clamp(-0.3, 0.3))


def test_no_gradient_clip_by_default(tmp_path):
    raw, stepped = _big_gradient_fit(tmp_path)
    for raw_grads, seen in zip(raw, stepped):
        for r, s in zip(raw_grads, seen):
            torch.testing.assert_close(s, r)


# ---------------------------------------------------------------- validation schedule

def test_val_check_interval_float_runs_validation_four_times_per_epoch(tmp_path):
    model = LinearModel()
    make_trainer(tmp_path, max_epochs=2, val_check_interval=0.25).fit(
        model, loader(n=16, batch_size=2), loader(n=4, batch_size=2))  # 8 train batches
    assert [step for _, step in model.val_runs] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert [epoch for epoch, _ in model.val_runs] == [0] * 4 + [1] * 4
    assert model.val_calls == 8 * 2


def test_val_check_interval_int_counts_batches_within_epoch(tmp_path):
    model = LinearModel()
    make_trainer(tmp_path, max_epochs=2, val_check_interval=3).fit(
        model, loader(n=16, batch_size=2), loader(n=4, batch_size=2))
    # batches 3 and 6 of each 8-batch epoch; no extra run at the epoch's end (as Lightning)
    assert [step for _, step in model.val_runs] == [3, 6, 11, 14]


def test_val_check_interval_int_across_epochs_without_check_val_every_n_epoch(tmp_path):
    model = LinearModel()
    make_trainer(tmp_path, max_epochs=3, val_check_interval=5, check_val_every_n_epoch=None).fit(
        model, loader(n=8, batch_size=2), loader(n=4, batch_size=2))  # 4 batches per epoch
    assert model.val_runs == [(1, 5), (2, 10)]


def test_check_val_every_n_epoch(tmp_path):
    model = LinearModel()
    make_trainer(tmp_path, max_epochs=5, check_val_every_n_epoch=2).fit(
        model, loader(n=6, batch_size=2), loader(n=4, batch_size=2))
    assert model.val_runs == [(1, 6), (3, 12)]


# ---------------------------------------------------------------- limits

def test_limit_train_batches_int_and_float(tmp_path):
    model = LinearModel()
    result = make_trainer(tmp_path / "a", max_epochs=2, limit_train_batches=3).fit(
        model, loader(n=16, batch_size=2))
    assert (model.train_calls, result.global_step) == (6, 6)

    model = LinearModel()
    result = make_trainer(tmp_path / "b", max_epochs=2, limit_train_batches=0.25).fit(
        model, loader(n=16, batch_size=2))  # 8 batches * 0.25
    assert (model.train_calls, result.global_step) == (4, 4)


def test_limit_val_batches_int_float_and_zero(tmp_path):
    train, val = loader(n=4, batch_size=2), loader(n=8, batch_size=2)  # 4 val batches
    model = LinearModel()
    make_trainer(tmp_path / "a", max_epochs=2, limit_val_batches=1).fit(model, train, val)
    assert (len(model.val_runs), model.val_calls) == (2, 2)

    model = LinearModel()
    make_trainer(tmp_path / "b", max_epochs=2, limit_val_batches=0.5).fit(model, train, val)
    assert (len(model.val_runs), model.val_calls) == (2, 4)

    model = LinearModel()
    make_trainer(tmp_path / "c", max_epochs=2, limit_val_batches=0).fit(model, train, val)
    assert (model.val_runs, model.val_calls, model.train_calls) == ([], 0, 4)


def test_limit_test_and_predict_batches(tmp_path):
    model = LinearModel()
    trainer = make_trainer(tmp_path, limit_test_batches=2, limit_predict_batches=0.5)
    trainer.test(model, loader(n=10, batch_size=2), verbose=False)
    assert model.test_calls == 2
    x, _ = tensors(loader(n=8))
    preds = trainer.predict(model, torch.utils.data.DataLoader(x, batch_size=2))  # 4 batches
    assert len(preds) == 2


# ---------------------------------------------------------------- fast_dev_run

def test_fast_dev_run_one_batch_each_and_nothing_written(tmp_path):
    model = LinearModel()
    trainer = rt.Trainer(fast_dev_run=True, max_epochs=5, launcher="local", storage_path=str(tmp_path),
                         enable_progress_bar=False, name="dev")  # default logger and checkpointing
    result = trainer.fit(model, loader(n=10, batch_size=2), loader(n=10, batch_size=2))
    assert (model.train_calls, model.val_calls, result.global_step) == (1, 1, 1)
    assert trainer.loggers == [] and trainer.checkpoint_callback is None
    assert result.checkpoints == [] and result.best_checkpoint is None
    assert list(tmp_path.rglob("*")) == []


def test_fast_dev_run_int_runs_n_batches(tmp_path):
    model = LinearModel()
    trainer = rt.Trainer(fast_dev_run=3, launcher="local", storage_path=str(tmp_path),
                         enable_progress_bar=False)
    result = trainer.fit(model, loader(n=20, batch_size=2), loader(n=20, batch_size=2))
    assert (model.train_calls, model.val_calls, result.global_step) == (3, 3, 3)
    assert list(tmp_path.rglob("*")) == []


# ---------------------------------------------------------------- log_every_n_steps

def test_log_every_n_steps_writes_rows_at_multiples(tmp_path):
    model = LinearModel()
    trainer = make_trainer(tmp_path, max_epochs=3, log_every_n_steps=2, logger=rt.loggers.CSVLogger())
    trainer.fit(model, loader(n=10, batch_size=4))  # 9 steps
    rows = read_csv(csv_path(trainer))
    # after optimizer steps 2, 4, 6, 8; a row carries the steps before it (Lightning's numbering)
    assert [s for s, _ in csv_column(rows, "train_loss")] == [1, 3, 5, 7]
    assert [int(r["step"]) for r in rows] == [1, 3, 5, 7]


def test_log_every_n_steps_larger_than_run_logs_no_step_rows(tmp_path):
    model = LinearModel()
    trainer = make_trainer(tmp_path, max_epochs=1, log_every_n_steps=50, logger=rt.loggers.CSVLogger())
    trainer.fit(model, loader(n=10, batch_size=4), loader(n=4, batch_size=4))
    rows = read_csv(csv_path(trainer))
    assert csv_column(rows, "train_loss") == []
    assert [s for s, _ in csv_column(rows, "val_loss")] == [2]  # epoch aggregates still logged


# ---------------------------------------------------------------- seed / deterministic

class _Noisy(LinearModel):
    """Randomness inside fit: dropout on the input, and a shuffled loader."""

    def forward(self, x):
        return self.layer(nn.functional.dropout(x, 0.5, self.training))


def _seeded_weights(tmp_path, seed, **kwargs):
    model = _Noisy(seed=0)  # same initial weights every time
    make_trainer(tmp_path, max_epochs=2, seed=seed, **kwargs).fit(model, loader(n=16, batch_size=4, shuffle=True))
    return flat_params(model)


def test_seed_same_seed_same_weights_different_seed_differs(tmp_path):
    a = _seeded_weights(tmp_path / "a", 7)
    torch.manual_seed(12345)  # global RNG state before fit must not matter
    b = _seeded_weights(tmp_path / "b", 7)
    c = _seeded_weights(tmp_path / "c", 8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_deterministic_turns_on_deterministic_algorithms_only_during_the_run(tmp_path):
    seen = []

    class Model(_Noisy):
        def training_step(self, batch, batch_idx):
            seen.append(torch.are_deterministic_algorithms_enabled())
            return super().training_step(batch, batch_idx)

    before = torch.are_deterministic_algorithms_enabled()
    model = Model(seed=0)
    make_trainer(tmp_path / "d", max_epochs=2, seed=3, deterministic=True).fit(
        model, loader(n=16, batch_size=4, shuffle=True))
    assert seen == [True] * 8
    assert torch.are_deterministic_algorithms_enabled() is before
    # Same numbers as the non-deterministic run with the same seed (CPU kernels are deterministic).
    assert torch.equal(flat_params(model), _seeded_weights(tmp_path / "n", 3))


# ---------------------------------------------------------------- checkpointing on/off

def test_enable_checkpointing_false_writes_no_checkpoints(tmp_path):
    trainer = make_trainer(tmp_path / "off", max_epochs=2, enable_checkpointing=False)
    result = trainer.fit(LinearModel(), loader(), loader())
    assert trainer.checkpoint_callback is None
    assert (result.checkpoints, result.best_checkpoint, result.last_checkpoint) == ([], None, None)
    assert not (tmp_path / "off" / "run" / "checkpoints").exists()

    trainer = make_trainer(tmp_path / "on", max_epochs=2, enable_checkpointing=True)
    result = trainer.fit(LinearModel(), loader(), loader())
    assert isinstance(trainer.checkpoint_callback, rt.callbacks.ModelCheckpoint)
    assert result.last_checkpoint is not None
    assert os.listdir(tmp_path / "on" / "run" / "checkpoints") == [os.path.basename(result.last_checkpoint)]


# ---------------------------------------------------------------- schedulers

def _sched_model(make_sched):
    class Model(LinearModel):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return {"optimizer": opt, "lr_scheduler": make_sched(opt)}
    return Model()


def test_scheduler_interval_step(tmp_path):
    rec = LrRecorder()
    model = _sched_model(lambda opt: {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5),
                                      "interval": "step"})
    make_trainer(tmp_path, max_epochs=2, callbacks=[rec]).fit(model, loader(n=6, batch_size=2))
    assert rec.batch_lrs == pytest.approx([0.1 * 0.5 ** k for k in range(6)])
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 6)


def test_scheduler_interval_epoch_is_the_default(tmp_path):
    rec = LrRecorder()
    model = _sched_model(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, 0.5))
    make_trainer(tmp_path, max_epochs=3, callbacks=[rec]).fit(model, loader(n=6, batch_size=2))
    assert rec.batch_lrs == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025] * 3)
    assert rec.epoch_lrs == pytest.approx([0.1, 0.05, 0.025])


def test_scheduler_frequency_2_by_step_and_by_epoch(tmp_path):
    rec = LrRecorder()
    model = _sched_model(lambda opt: {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5),
                                      "interval": "step", "frequency": 2})
    make_trainer(tmp_path / "s", max_epochs=2, callbacks=[rec]).fit(model, loader(n=6, batch_size=2))
    assert rec.batch_lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])

    rec = LrRecorder()
    model = _sched_model(lambda opt: {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5),
                                      "interval": "epoch", "frequency": 2})
    make_trainer(tmp_path / "e", max_epochs=5, callbacks=[rec]).fit(model, loader(n=2, batch_size=2))
    assert rec.epoch_lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])


def test_reduce_lr_on_plateau_monitors_val_loss(tmp_path):
    class Model(ScriptedValModel):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}

    rec = LrRecorder()
    # improves, improves, flat, flat, improves: lr halves after each non-improving epoch
    model = Model([3.0, 2.0, 2.0, 2.0, 1.0])
    make_trainer(tmp_path, max_epochs=5, callbacks=[rec]).fit(model, loader(n=4, batch_size=2),
                                                               loader(n=2, batch_size=2))
    assert rec.epoch_lrs == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.025])
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.025)


# ---------------------------------------------------------------- validate / test / predict

def test_validate_and_test_return_epoch_metrics_per_loader(tmp_path):
    model = LinearModel()
    trainer = make_trainer(tmp_path)
    dl = loader(n=10, batch_size=4, seed=3)
    x, y = tensors(dl)
    with torch.no_grad():
        expected = nn.functional.mse_loss(model(x), y).item()
    w0 = flat_params(model)
    assert trainer.validate(model, dl, verbose=False) == [{"val_loss": pytest.approx(expected)}]
    assert trainer.test(model, dataloaders=dl, verbose=False) == [{"test_loss": pytest.approx(expected)}]
    assert (model.val_calls, model.test_calls) == (3, 3)
    assert torch.equal(w0, flat_params(model))  # evaluation never steps
    assert model.training  # the module's mode is restored


def test_validate_after_fit_defaults_to_the_fitted_module_and_logs(tmp_path, rt_log):
    model = LinearModel()
    trainer = make_trainer(tmp_path, max_epochs=2)
    result = trainer.fit(model, loader(), loader(seed=4))
    (metrics,) = trainer.validate(dataloaders=loader(seed=4))
    assert metrics["val_loss"] == pytest.approx(result.metrics["val_loss"])
    assert f"validate: val_loss={metrics['val_loss']:.6g}" in rt_log.messages


def test_evaluation_with_a_datamodule(tmp_path):
    class Data(rt.DataModule):
        def val_dataloader(self):
            return loader(n=4, batch_size=2)

        def test_dataloader(self):
            return [loader(n=4, batch_size=2), loader(n=6, batch_size=2)]  # two loaders

    class Model(LinearModel):
        def test_step(self, batch, batch_idx, dataloader_idx=0):
            self.log(f"seen_{dataloader_idx}", float(len(batch[0])), reduce_fx="sum")

    model = Model()
    trainer = make_trainer(tmp_path)
    assert set(trainer.validate(model, datamodule=Data(), verbose=False)[0]) == {"val_loss"}
    # one dict per loader, names suffixed by their loader (Lightning)
    assert trainer.test(model, Data(), verbose=False) == [{"seen_0/dataloader_idx_0": 4.0},
                                                          {"seen_1/dataloader_idx_1": 6.0}]


def test_predict_default_predict_step_is_forward(tmp_path):
    model = LinearModel()
    x = torch.randn(10, 2)
    preds = make_trainer(tmp_path).predict(model, torch.utils.data.DataLoader(x, batch_size=4))
    assert [p.shape for p in preds] == [(4, 1), (4, 1), (2, 1)]
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(preds), model(x))
    assert all(not p.requires_grad for p in preds)


def test_predict_custom_step_and_return_predictions_false(tmp_path):
    class Model(LinearModel):
        def predict_step(self, batch, batch_idx, dataloader_idx=0):
            x, _ = batch
            return {"idx": batch_idx, "y": self(x).squeeze(1)}

    trainer = make_trainer(tmp_path)
    preds = trainer.predict(Model(), loader(n=6, batch_size=4))
    assert [(p["idx"], p["y"].shape) for p in preds] == [(0, (4,)), (1, (2,))]
    assert trainer.predict(Model(), loader(n=6, batch_size=4), return_predictions=False) is None


# ---------------------------------------------------------------- loaders without a length

class _Stream(torch.utils.data.IterableDataset):
    """An IterableDataset of ``n`` samples: the loader has no length, the loop learns the epoch's end
    by looking one batch ahead."""

    def __init__(self, n):
        self.x, self.y = tensors(loader(n=n))

    def __iter__(self):
        return iter(zip(self.x, self.y))


def test_iterable_loader_accumulation_window_closes_at_epoch_end(tmp_path):
    spy = {}

    def factory(params):
        spy["opt"] = SpySGD(params, lr=0.1)
        return spy["opt"]

    model = LinearModel(optimizer_factory=factory)
    stream = torch.utils.data.DataLoader(_Stream(10), batch_size=2)  # 5 batches, no len()
    result = make_trainer(tmp_path, max_epochs=2, accumulate_grad_batches=2).fit(
        model, stream, loader(n=2, batch_size=2))
    assert (model.train_calls, spy["opt"].steps, result.global_step) == (10, 6, 6)
    assert model.val_runs == [(0, 3), (1, 6)]  # validation after each epoch's last batch


def test_iterable_loader_rejects_a_fractional_train_limit(tmp_path):
    stream = torch.utils.data.DataLoader(_Stream(10), batch_size=2)
    with pytest.raises(ValueError, match=r"fractional limit_train_batches needs a train loader with a "
                                         r"length; pass an int"):
        make_trainer(tmp_path, limit_train_batches=0.5).fit(LinearModel(), stream)
    model = LinearModel()
    make_trainer(tmp_path, limit_train_batches=2).fit(model, stream)
    assert model.train_calls == 2


# ---------------------------------------------------------------- devices / accelerator (Ray workers)

@pytest.mark.parametrize("kw, gpus, layout", [
    ({}, 4, (True, 1)),                                          # default: one worker
    ({"devices": "auto"}, 0, (False, 1)),                        # auto on CPUs: one worker
    ({"devices": "auto"}, 4, (True, 4)),                         # auto with GPUs: all of them
    ({"devices": "auto", "accelerator": "gpu"}, 2, (True, 2)),
    ({"devices": "auto", "accelerator": "cpu"}, 4, (False, 1)),  # GPUs there, not wanted
    ({"accelerator": "cpu", "devices": 3}, 0, (False, 3)),
    ({"accelerator": "gpu", "devices": 1}, 8, (True, 1)),
])
def test_devices_and_accelerator_resolve_to_ray_workers(kw, gpus, layout):
    from raytrainer.runtime.ray_train import worker_layout
    assert worker_layout(rt.Trainer(**kw).cfg, gpus) == layout


def test_accelerator_gpu_on_a_cluster_without_gpus_names_the_fix():
    from raytrainer.runtime.ray_train import worker_layout
    with pytest.raises(rt.ConfigError, match=r"the Ray cluster has no GPU; use accelerator='cpu' or 'auto'"):
        worker_layout(rt.Trainer(accelerator="gpu").cfg, 0)
