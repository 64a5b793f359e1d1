"""Every bad argument or bad module fails with a message that names what is wrong."""
from __future__ import annotations

import pytest
import torch

import raytrainer as rt
from helpers import LinearModel, ScriptedValModel, loader, make_trainer

# ---------------------------------------------------------------- Trainer(...) arguments

BAD_TRAINER_ARGS = [
    ({"max_epochs": 0}, r"max_epochs=0"),
    ({"max_epochs": -2}, r"max_epochs=-2"),
    ({"max_epochs": 1.5}, r"max_epochs=1\.5"),
    ({"max_epochs": "10"}, r"max_epochs='10'"),
    ({"max_steps": 0}, r"max_steps=0"),
    ({"max_steps": -5}, r"max_steps=-5"),
    ({"max_steps": 2.0}, r"max_steps=2\.0"),
    ({"max_epochs": -1, "max_steps": -1}, r"max_epochs=-1, max_steps=-1\).*forever"),
    ({"accelerator": "tpu"}, r"accelerator='tpu'.*\['cpu', 'gpu', 'auto'\]"),
    ({"devices": 0}, r"devices=0"),
    ({"devices": "two"}, r"devices='two'"),
    ({"devices": True}, r"devices=True"),
    ({"strategy": "deepspeed"}, r"strategy='deepspeed'.*\['ddp', 'fsdp', 'fsdp_sharded', 'auto'\]"),
    ({"precision": "64"}, r"precision.*'64'.*not supported"),
    ({"precision": "16-true"}, r"precision.*'16-true'"),
    ({"accumulate_grad_batches": 0}, r"accumulate_grad_batches=0"),
    ({"accumulate_grad_batches": 2.5}, r"accumulate_grad_batches=2\.5"),
    ({"gradient_clip_val": -1.0}, r"gradient_clip_val=-1\.0"),
    ({"gradient_clip_val": "big"}, r"gradient_clip_val='big'"),
    ({"gradient_clip_algorithm": "l2"}, r"gradient_clip_algorithm='l2'.*\['norm', 'value'\]"),
    ({"val_check_interval": 0.0}, r"val_check_interval=0\.0"),
    ({"val_check_interval": 1.5}, r"val_check_interval=1\.5"),
    ({"val_check_interval": 0}, r"val_check_interval=0"),
    ({"val_check_interval": "epoch"}, r"val_check_interval='epoch'"),
    ({"check_val_every_n_epoch": 0}, r"check_val_every_n_epoch=0"),
    ({"check_val_every_n_epoch": 1.0}, r"check_val_every_n_epoch=1\.0"),
    ({"log_every_n_steps": 0}, r"log_every_n_steps=0"),
    ({"log_every_n_steps": None}, r"log_every_n_steps=None"),
    ({"limit_train_batches": -1}, r"limit_train_batches=-1"),
    ({"limit_train_batches": 1.5}, r"limit_train_batches=1\.5"),
    ({"limit_val_batches": True}, r"limit_val_batches=True"),
    ({"limit_val_batches": "all"}, r"limit_val_batches='all'"),
    ({"limit_test_batches": -0.5}, r"limit_test_batches=-0\.5"),
    ({"limit_predict_batches": 2.0}, r"limit_predict_batches=2\.0"),
    ({"fast_dev_run": -1}, r"fast_dev_run=-1"),
    ({"fast_dev_run": "yes"}, r"fast_dev_run='yes'"),
    ({"seed": -1}, r"seed=-1"),
    ({"seed": "42"}, r"seed='42'"),
    ({"seed": 4.2}, r"seed=4\.2"),
    ({"deterministic": "yes"}, r"deterministic='yes'"),
    ({"enable_progress_bar": 1}, r"enable_progress_bar=1"),
    ({"enable_checkpointing": None}, r"enable_checkpointing=None"),
    ({"storage_path": 123}, r"storage_path=123"),
    ({"storage_path": "   "}, r"storage_path='   '"),
    ({"storage_options": "key=secret"}, r"storage_options"),
    ({"name": "a/b"}, r"name='a/b'"),
    ({"name": ""}, r"name=''"),
    ({"name": " run"}, r"name=' run'"),
    ({"name": 5}, r"name=5"),
    ({"launcher": "slurm"}, r"launcher='slurm'.*\['ray', 'local'\]"),
    ({"max_failures": -2}, r"max_failures=-2"),
    ({"max_failures": 1.0}, r"max_failures=1\.0"),
    ({"launcher": "local", "max_failures": 2}, r"launcher='local', max_failures"),
    ({"resources_per_worker": {"CPU": -1}}, r"resources_per_worker=\{'CPU': -1\}"),
    ({"resources_per_worker": "CPU=1"}, r"resources_per_worker='CPU=1'"),
    ({"resources_per_worker": {"GPU": True}}, r"resources_per_worker="),
    ({"launcher": "local", "devices": 2}, r"launcher='local', devices=2\).*launcher='ray'"),
    ({"callbacks": "early_stopping"}, r"callbacks='early_stopping'"),
    ({"callbacks": [object()]}, r"callbacks=\[<object"),
    ({"callbacks": [rt.callbacks.EarlyStopping("val_loss"), len]}, r"callbacks=.*rt\.Callback"),
    ({"logger": "tensorboard"}, r"logger='tensorboard'"),
    ({"logger": [rt.loggers.CSVLogger(), "x"]}, r"logger=.*rt\.loggers\.Logger"),
    ({"enable_checkpointing": False, "callbacks": [rt.callbacks.ModelCheckpoint()]},
     r"enable_checkpointing=False.*ModelCheckpoint"),
]


@pytest.mark.parametrize("kwargs,match", BAD_TRAINER_ARGS,
                         ids=[",".join(k) + f"-{i}" for i, (k, _) in enumerate(BAD_TRAINER_ARGS)])
def test_bad_trainer_argument_names_the_argument(tmp_path, kwargs, match):
    kwargs = {"launcher": "local", "storage_path": str(tmp_path), **kwargs}
    with pytest.raises(rt.ConfigError, match=match):
        rt.Trainer(**kwargs)
    assert list(tmp_path.iterdir()) == []  # rejected before anything is written


def test_config_error_is_a_value_error_and_says_what_is_allowed():
    with pytest.raises(ValueError, match=r"Trainer\(max_epochs=0\) is invalid: expected None, -1 \(no "
                                         r"limit\) or an int >= 1"):
        rt.Trainer(max_epochs=0, launcher="local")


# ---------------------------------------------------------------- callbacks' arguments

@pytest.mark.parametrize("make,match", [
    (lambda: rt.callbacks.ModelCheckpoint(mode="best"), r"ModelCheckpoint\(mode='best'\)"),
    (lambda: rt.callbacks.ModelCheckpoint(save_top_k=-2), r"ModelCheckpoint\(save_top_k=-2\)"),
    (lambda: rt.callbacks.ModelCheckpoint(save_top_k=True), r"save_top_k=True"),
    (lambda: rt.callbacks.ModelCheckpoint(save_top_k=3), r"save_top_k=3\) needs a monitor"),
    (lambda: rt.callbacks.ModelCheckpoint(monitor=""), r"ModelCheckpoint\(monitor=''\)"),
    (lambda: rt.callbacks.ModelCheckpoint(every_n_train_steps=0), r"every_n_train_steps=0"),
    (lambda: rt.callbacks.ModelCheckpoint(every_n_epochs=1.5), r"every_n_epochs=1\.5"),
    (lambda: rt.callbacks.ModelCheckpoint(train_time_interval=-3), r"train_time_interval=-3"),
    (lambda: rt.callbacks.ModelCheckpoint(every_n_train_steps=2, every_n_epochs=1),
     r"mutually exclusive"),
    (lambda: rt.callbacks.EarlyStopping(monitor=""), r"EarlyStopping\(monitor=''\)"),
    (lambda: rt.callbacks.EarlyStopping(monitor=None), r"EarlyStopping\(monitor=None\)"),
    (lambda: rt.callbacks.EarlyStopping("val_loss", mode="down"), r"EarlyStopping\(mode='down'\)"),
    (lambda: rt.callbacks.EarlyStopping("val_loss", patience=-1), r"EarlyStopping\(patience=-1\)"),
    (lambda: rt.callbacks.EarlyStopping("val_loss", patience=2.0), r"patience=2\.0"),
    (lambda: rt.callbacks.EarlyStopping("val_loss", min_delta="0.1"), r"min_delta='0\.1'"),
    (lambda: rt.callbacks.LearningRateMonitor(logging_interval="batch"),
     r"LearningRateMonitor\(logging_interval='batch'\).*'step' or 'epoch'"),
])
def test_bad_callback_argument_names_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------- bad modules

class _NoTrainingStep(rt.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _NoOptimizers(rt.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()


def test_module_without_training_step(tmp_path):
    with pytest.raises(TypeError, match=r"_NoTrainingStep does not define training_step"):
        make_trainer(tmp_path).fit(_NoTrainingStep(), loader())


def test_module_without_configure_optimizers(tmp_path):
    with pytest.raises(TypeError, match=r"_NoOptimizers does not define configure_optimizers"):
        make_trainer(tmp_path).fit(_NoOptimizers(), loader())


def test_fit_rejects_a_plain_nn_module(tmp_path):
    with pytest.raises(TypeError, match=r"expected an rt\.Module .* got Linear"):
        make_trainer(tmp_path).fit(torch.nn.Linear(2, 1), loader())


def _returning(value_factory):
    class Model(LinearModel):
        def configure_optimizers(self):
            return value_factory(self)
    return Model()


@pytest.mark.parametrize("factory,exc,match", [
    (lambda m: None, TypeError, r"configure_optimizers\(\) returned None"),
    (lambda m: "adam", TypeError, r"configure_optimizers\(\) returned str: 'adam'"),
    (lambda m: [], TypeError, r"returned an empty list"),
    (lambda m: [torch.optim.SGD(m.parameters(), lr=0.1), "sgd"], TypeError, r"returned list"),
    (lambda m: {"lr_scheduler": None}, TypeError, r"dict has no 'optimizer' key"),
    (lambda m: {"optimizer": torch.optim.SGD(m.parameters(), lr=0.1), "scheduler": 1}, TypeError,
     r"unknown keys \['scheduler'\]"),
    (lambda m: {"optimizer": "sgd"}, TypeError, r"returned str where a torch\.optim\.Optimizer"),
    (lambda m: ([torch.optim.SGD(m.parameters(), lr=0.1)], ["step"]), TypeError,
     r"lr_scheduler str is not a torch LR scheduler"),
    (lambda m: (lambda o: {"optimizer": o, "lr_scheduler": {
        "scheduler": torch.optim.lr_scheduler.StepLR(o, 1), "interval": "batch"}})(
        torch.optim.SGD(m.parameters(), lr=0.1)), ValueError, r"interval='batch'"),
    (lambda m: (lambda o: {"optimizer": o, "lr_scheduler": {
        "scheduler": torch.optim.lr_scheduler.StepLR(o, 1), "frequency": 0}})(
        torch.optim.SGD(m.parameters(), lr=0.1)), ValueError, r"frequency=0"),
    (lambda m: (lambda o: {"optimizer": o, "lr_scheduler": {"interval": "step"}})(
        torch.optim.SGD(m.parameters(), lr=0.1)), TypeError, r"needs a 'scheduler' key"),
    (lambda m: (lambda o: {"optimizer": o, "lr_scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(o)})(
        torch.optim.SGD(m.parameters(), lr=0.1)), ValueError, r"ReduceLROnPlateau needs a metric"),
    (lambda m: [torch.optim.SGD(m.parameters(), lr=0.1), torch.optim.SGD(m.parameters(), lr=0.1)],
     ValueError, r"several optimizers: set self\.automatic_optimization = False"),
], ids=["none", "str", "empty", "mixed-list", "dict-no-optimizer", "dict-unknown-key", "dict-str-opt",
        "bad-scheduler", "bad-interval", "bad-frequency", "sched-no-scheduler", "plateau-no-monitor",
        "two-optimizers-automatic"])
def test_bad_configure_optimizers(tmp_path, factory, exc, match):
    model = _returning(factory)
    with pytest.raises(exc, match=match):
        make_trainer(tmp_path).fit(model, loader())
    assert model.train_calls == 0  # rejected before the first step


def test_reduce_lr_on_plateau_monitor_never_logged_lists_metrics(tmp_path):
    class Model(LinearModel):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
                    "monitor": "val_acc"}

    with pytest.raises(KeyError, match=r"monitors 'val_acc', which was not logged; logged metrics: "
                                       r"\['train_loss', 'val_loss'\]"):
        make_trainer(tmp_path).fit(Model(), loader(), loader())


def _stepping(returned):
    class Model(LinearModel):
        def training_step(self, batch, batch_idx):
            self.train_calls += 1
            return returned(self, batch)
    return Model()


@pytest.mark.parametrize("returned,exc,match", [
    (lambda m, b: "loss", TypeError, r"training_step returned str"),
    (lambda m, b: 1.0, TypeError, r"training_step returned float"),
    (lambda m, b: (m(b[0]) - b[1]) ** 2, ValueError, r"loss has shape \(4, 1\); it must be a scalar"),
    (lambda m, b: m.loss(b).detach(), ValueError, r"loss does not require grad .*detached"),
    (lambda m, b: {"out": m.loss(b)}, ValueError, r"dict without a 'loss' key \(keys: \['out'\]\)"),
    (lambda m, b: {"loss": "x"}, TypeError, r"training_step returned str"),
], ids=["str", "float", "non-scalar", "detached", "dict-without-loss", "dict-loss-str"])
def test_bad_training_step_return(tmp_path, returned, exc, match):
    model = _stepping(returned)
    with pytest.raises(exc, match=match):
        make_trainer(tmp_path).fit(model, loader(n=10, batch_size=4))
    assert model.train_calls == 1  # failed on the first step


def test_training_step_returning_none_skips_the_batch(tmp_path):
    """Not an error (Lightning's convention): no backward for that batch; the optimizer is still
    stepped (nothing moves without gradients) and counted, as in Lightning."""
    model = _stepping(lambda m, b: None if m.train_calls % 2 == 0 else m.loss(b))
    result = make_trainer(tmp_path).fit(model, loader(n=16, batch_size=4))
    assert (model.train_calls, result.global_step) == (4, 4)
    never = _stepping(lambda m, b: None)
    before = [p.detach().clone() for p in never.parameters()]
    make_trainer(tmp_path, name="none").fit(never, loader(n=8, batch_size=4))
    assert all(torch.equal(a, b) for a, b in zip(before, never.parameters()))


@pytest.mark.parametrize("value,match", [
    (torch.ones(3), r"self\.log\('bad'\): expected a scalar, got a tensor of shape \(3,\)"),
    ("high", r"self\.log\('bad'\): expected a number or a scalar tensor, got str"),
    ([1.0, 2.0], r"got list"),
])
def test_log_rejects_non_scalar_values(tmp_path, value, match):
    class Model(LinearModel):
        def training_step(self, batch, batch_idx):
            self.log("bad", value)
            return self.loss(batch)

    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path).fit(Model(), loader())


def test_log_rejects_bad_reduce_fx_and_changed_arguments(tmp_path):
    class BadReduce(LinearModel):
        def training_step(self, batch, batch_idx):
            self.log("m", 1.0, reduce_fx="median")
            return self.loss(batch)

    with pytest.raises(ValueError, match=r"self\.log\('m'\): reduce_fx must be one of"):
        make_trainer(tmp_path / "a").fit(BadReduce(), loader())

    class Changing(LinearModel):
        def training_step(self, batch, batch_idx):
            self.log("m", 1.0, prog_bar=batch_idx == 1)
            return self.loss(batch)

    with pytest.raises(ValueError, match=r"self\.log\('m'\) was called with different arguments"):
        make_trainer(tmp_path / "b").fit(Changing(), loader())


def test_log_outside_a_run():
    with pytest.raises(RuntimeError, match=r"self\.log\('x'\) was called outside of a Trainer run"):
        LinearModel().log("x", 1.0)


def test_early_stopping_monitor_never_logged_lists_logged_metrics(tmp_path):
    es = rt.callbacks.EarlyStopping(monitor="val_acc")
    with pytest.raises(KeyError, match=r"EarlyStopping\(monitor='val_acc'\) found no such metric; logged "
                                       r"metrics: \['train_loss', 'val_loss'\]"):
        make_trainer(tmp_path, max_epochs=3, callbacks=[es]).fit(LinearModel(), loader(), loader())


def test_early_stopping_strict_false_ignores_missing_monitor(tmp_path):
    es = rt.callbacks.EarlyStopping(monitor="val_acc", strict=False, patience=0)
    result = make_trainer(tmp_path, max_epochs=3, callbacks=[es]).fit(LinearModel(), loader(), loader())
    assert result.current_epoch == 3 and es.stopped_epoch == 0


def test_model_checkpoint_monitor_never_logged_lists_logged_metrics(tmp_path):
    mc = rt.callbacks.ModelCheckpoint(monitor="val_acc")
    with pytest.raises(KeyError, match=r"ModelCheckpoint\(monitor='val_acc'\) found no such metric; "
                                       r"logged metrics: \['train_loss', 'val_loss'\]"):
        make_trainer(tmp_path, enable_checkpointing=True, callbacks=[mc]).fit(
            LinearModel(), loader(), loader())


def test_fit_with_no_data_anywhere(tmp_path):
    with pytest.raises(ValueError, match=r"fit needs data: pass train_dataloaders="):
        make_trainer(tmp_path).fit(LinearModel())


def test_fit_with_both_loaders_and_datamodule(tmp_path):
    class Data(rt.DataModule):
        def train_dataloader(self):
            return loader()

    with pytest.raises(ValueError, match=r"pass either train_dataloaders= or datamodule=, not both"):
        make_trainer(tmp_path).fit(LinearModel(), loader(), datamodule=Data())


def test_train_loader_that_is_not_iterable(tmp_path):
    with pytest.raises(TypeError, match=r"train loader #0 is a int, which is not iterable"):
        make_trainer(tmp_path).fit(LinearModel(), 5)


def test_validate_and_test_need_their_step(tmp_path):
    class NoEval(rt.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

    trainer = make_trainer(tmp_path)
    with pytest.raises(TypeError, match=r"NoEval has no validation_step"):
        trainer.validate(NoEval(), loader(), verbose=False)
    with pytest.raises(TypeError, match=r"NoEval has no test_step"):
        trainer.test(NoEval(), loader(), verbose=False)


def test_validate_without_a_model_before_any_fit(tmp_path):
    with pytest.raises(ValueError, match=r"pass the model"):
        make_trainer(tmp_path).validate(dataloaders=loader())


def test_scripted_module_errors_surface_from_inside_fit(tmp_path):
    """A user exception inside a step propagates unchanged (no wrapping that hides the type)."""
    class Boom(ScriptedValModel):
        def validation_step(self, batch, batch_idx):
            raise ZeroDivisionError("user bug")

    with pytest.raises(ZeroDivisionError, match="user bug"):
        make_trainer(tmp_path).fit(Boom([1.0]), loader(), loader())


def test_unwritable_storage_path_fails_before_training(tmp_path):
    """A probe write runs before any data is loaded or cluster started."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the run folder should go")
    calls = []

    class Spy(rt.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(1, 1)

        def setup(self, stage):
            calls.append(stage)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = rt.Trainer(launcher="local", max_steps=1, storage_path=str(blocked / "runs"), name="x",
                         enable_progress_bar=False)
    with pytest.raises(rt.ConfigError, match=r"storage_path=.*is not writable"):
        trainer.fit(Spy(), DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2))
    assert calls == []  # nothing ran


def test_unreachable_s3_endpoint_fails_before_training(tmp_path, monkeypatch):
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()

    class M(rt.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = rt.Trainer(launcher="local", max_steps=1, storage_path="s3://nobucket/runs", name="x",
                         enable_progress_bar=False, storage_options={"connect_timeout": 2, "config_kwargs": {"retries": {"max_attempts": 1}}})
    with pytest.raises(rt.ConfigError, match="is not writable"):
        trainer.fit(M(), DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2))
    s3fs.S3FileSystem.clear_instance_cache()
