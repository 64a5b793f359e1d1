"""The step loop's shortcuts behave like the plain code they replace (see BENCHMARKS.md): hooks
resolved once per run, batches already on the device not copied, metric specs resolved once."""
from __future__ import annotations

import dataclasses
from collections import namedtuple

import torch
from helpers import LinearModel, loader, make_trainer

import raytrainer as rt
from raytrainer.utilities import infer_batch_size, move_to_device

META = torch.device("meta")  # a second device on any machine: tensors there have no data


def test_hooks_overridden_in_the_class_or_set_on_the_instance_are_called(tmp_path):
    calls = []

    class OnlyBatchEnd(rt.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            calls.append(("class", batch_idx))

    on_instance = rt.Callback()
    on_instance.on_train_batch_start = lambda trainer, pl_module, batch, batch_idx: calls.append(
        ("callback instance", batch_idx))
    model = LinearModel()
    # Lightning's -1 from on_train_batch_start ends the epoch, also from a function on the instance.
    model.on_train_batch_start = lambda batch, batch_idx: -1 if batch_idx == 1 else None
    make_trainer(tmp_path, callbacks=[OnlyBatchEnd(), on_instance]).fit(model, loader(n=12))
    assert calls == [("callback instance", 0), ("class", 0), ("callback instance", 1)]
    assert model.train_calls == 1


def test_a_batch_on_the_device_is_returned_as_is():
    x, y = torch.ones(4, 2), torch.zeros(4)
    for batch in ([x, y], (x, y), {"x": x, "y": y, "name": "a"}, [[x], {"y": y}], x):
        assert move_to_device(batch, torch.device("cpu")) is batch


def test_moving_rebuilds_every_container_kind():
    Pair = namedtuple("Pair", "x y")

    @dataclasses.dataclass
    class Batch:
        x: torch.Tensor
        tag: str

    x = torch.ones(4, 2)
    moved = move_to_device([Pair(x, {"z": x}), Batch(x, "t"), (x, 3)], META)
    assert type(moved[0]) is Pair and moved[0].x.is_meta and moved[0].y["z"].is_meta
    assert type(moved[1]) is Batch and moved[1].x.is_meta and moved[1].tag == "t"
    assert type(moved[2]) is tuple and moved[2][0].is_meta and moved[2][1] == 3
    # A dataclass is rebuilt even when already on the device (it may define its own semantics).
    batch = Batch(x, "t")
    assert move_to_device(batch, torch.device("cpu")) is not batch


def test_infer_batch_size():
    x = torch.ones(5, 2)
    assert infer_batch_size(x) == 5
    assert infer_batch_size({"a": [x, torch.ones(3)]}) == 5
    assert infer_batch_size(([], x)) == 1  # the first element decides, as in Lightning
    assert infer_batch_size(torch.tensor(2.0)) == 1
    assert infer_batch_size({}) == 1
    assert infer_batch_size("text") == 1


def test_metric_logged_with_equivalent_arguments_and_one_that_appears_later(tmp_path):
    class Model(LinearModel):
        def training_step(self, batch, batch_idx):
            loss = self.loss(batch)
            # "mean" and torch.mean are the same reduction: not a change of arguments.
            self.log("m", loss, reduce_fx="mean" if batch_idx % 2 else torch.mean)
            if self.global_step >= 2:
                self.log("late", loss)  # a new metric mid-run reaches the loggers too
            return loss

    logger = rt.loggers.CSVLogger(save_dir=str(tmp_path / "logs"))
    trainer = make_trainer(tmp_path, logger=logger, log_every_n_steps=1, max_steps=4)
    trainer.fit(Model(), loader(n=16))
    assert set(trainer.logged_metrics) == {"m", "late"}  # no "epoch" key, as in Lightning
