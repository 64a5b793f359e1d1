"""THE catalogue of user mistakes: each raises ONE error that names the problem and the fix.

One row per distinct mistake: how it is made, the exception type, a regex the message (with its
notes) must match -- the problem *and* the fix -- and when it is caught:

    construction    Trainer(...) / a callback's constructor; nothing is written
    before launch   fit/validate/test before any probe, data, worker or Ray; nothing is written
    before training after the storage probe and setup, before the first training step
    in training     on the step or boundary where the mistake shows (e.g. a loss, a monitor)

A mistake is caught as early as the information exists: a module's step can only fail on its
first batch, a metric is only missing once the code that should log it ran. Two rows use
``launcher="ray"`` and fail before Ray starts (``ray.init`` is never called).

More exhaustive variants of some rows (every Trainer argument, every configure_optimizers form,
every CLI key) live where the feature is tested: tests/test_config_errors.py (Trainer and
callback arguments, modules, optimizers, self.log, monitors, storage probe), tests/test_cli.py
(YAML keys and command line), tests/test_checkpoint_integrity.py (corrupted, torn, malicious,
another model's checkpoints), tests/test_trainer_args.py (limits on iterable loaders).
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import raytrainer as rt
from raytrainer.cli import main as cli

from helpers import LinearModel, loader

pytestmark = pytest.mark.timeout(60)

STEPS: list[int] = []  # every training_step of the models below (reset per case)


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Any], Any]   # makes the mistake; gets the Env below
    exc: type[BaseException]
    match: str                   # regex over the message and its notes: the problem and the fix
    when: str                    # construction | before launch | before training | in training


class Env:
    """What a case may use: a scratch folder, monkeypatch, and a Trainer factory writing there."""

    def __init__(self, tmp_path, monkeypatch):
        self.tmp_path, self.monkeypatch = tmp_path, monkeypatch
        self.storage = tmp_path / "runs"

    def trainer(self, **kwargs) -> rt.Trainer:
        kwargs.setdefault("launcher", "local")
        kwargs.setdefault("max_epochs", 1)
        kwargs.setdefault("logger", False)
        kwargs.setdefault("enable_progress_bar", False)
        kwargs.setdefault("accelerator", "cpu")
        kwargs.setdefault("storage_path", str(self.storage))
        kwargs.setdefault("name", "run")
        return rt.Trainer(**kwargs)

    def fit(self, model=None, *loaders, **trainer_kwargs):
        return self.trainer(**trainer_kwargs).fit(model or Reg(), *(loaders or (loader(),)))

    def committed_checkpoint(self) -> str:
        """A run with one committed checkpoint (steps 1-3); returns its URI."""
        result = rt.Trainer(launcher="local", max_epochs=1, logger=False, enable_progress_bar=False,
                            accelerator="cpu", storage_path=str(self.tmp_path / "saved"), name="run").fit(
            LinearModel(), loader())
        STEPS.clear()
        return result.last_checkpoint

    def yaml(self, text: str, name: str = "run.yaml") -> str:
        path = self.tmp_path / name
        path.write_text(text)
        return str(path)


# ---------------------------------------------------------------- models and data for the cases

class Reg(LinearModel):
    """LinearModel whose training steps are counted in STEPS."""

    def training_step(self, batch, batch_idx):
        STEPS.append(batch_idx)
        return super().training_step(batch, batch_idx)


def returning(value: Callable[[Reg, Any], Any]) -> Reg:
    """A Reg whose training_step returns ``value(model, batch)``."""
    class Model(Reg):
        def training_step(self, batch, batch_idx):
            STEPS.append(batch_idx)
            return value(self, batch)
    return Model()


def optimizers(value: Callable[[Reg], Any]) -> Reg:
    """A Reg whose configure_optimizers returns ``value(model)``."""
    class Model(Reg):
        def configure_optimizers(self):
            return value(self)
    return Model()


class NoTrainingStep(rt.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NoOptimizers(rt.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()


class LogsATensor(Reg):
    def training_step(self, batch, batch_idx):
        self.log("bad", torch.ones(3))
        return super().training_step(batch, batch_idx)


class Manual(Reg):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


class Plateau(Reg):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
                "monitor": "val_acc"}


class Renamed(LinearModel):
    def __init__(self):
        super().__init__()
        self.head = self.layer
        del self.layer

    def forward(self, x):
        return self.head(x)


class NoneData(rt.DataModule):
    def train_dataloader(self):
        return None


class NoTrainData(rt.DataModule):
    def val_dataloader(self):
        return loader()


class Stream(IterableDataset):
    def __iter__(self):
        return iter(zip(torch.randn(8, 2), torch.randn(8, 1)))


def single_tensor_loader() -> DataLoader:
    """Batches of x only: ``x, y = batch`` fails in the user's own training_step."""
    return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)


def dict_loader() -> DataLoader:
    """Batches of dicts: ``x, y = batch`` on a dict of tensors."""
    return DataLoader([{"x": torch.randn(2), "y": torch.randn(1)} for _ in range(8)], batch_size=4)


def _flip_a_byte(uri: str) -> None:
    from raytrainer import storage
    fs, path = storage.filesystem(uri)
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(path, bytes(data))


def _uncommit(uri: str) -> str:
    from raytrainer import storage
    fs, path = storage.filesystem(uri)
    data = fs.cat_file(path)
    fs.pipe_file(path, data[: len(data) // 2])  # as a copy cut short leaves it: no seal at its end
    return uri


def _blocked_storage(env: Env) -> str:
    """A storage path under a *file*: nothing can be written there."""
    blocker = env.tmp_path / "not-a-dir"
    blocker.write_text("a file where the run folder should go")
    return str(blocker / "runs")


def _unreachable_s3(env: Env) -> rt.Trainer:
    pytest.importorskip("s3fs")
    import s3fs
    mp = env.monkeypatch
    mp.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    for var, value in (("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "y"),
                       ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_MAX_ATTEMPTS", "1")):
        mp.setenv(var, value)
    s3fs.S3FileSystem.clear_instance_cache()
    return env.trainer(storage_path="s3://nobucket/runs")


def _cli(env: Env, text: str, command: str = "fit"):
    base = env.yaml("model: {class_path: cli_models.TinyRegressor}\n"
                    f"trainer: {{launcher: local, storage_path: {env.storage}}}\n", "base.yaml")
    return cli.prepare(command, *cli.load_config([base, env.yaml(text)]))


# ---------------------------------------------------------------- the catalogue

TRAINER = "construction"
CASES = [
    # -- Trainer arguments
    Case("trainer-max-epochs-zero", lambda e: e.trainer(max_epochs=0), rt.ConfigError,
         r"Trainer\(max_epochs=0\) is invalid: expected None, -1 \(no limit\) or an int >= 1", TRAINER),
    Case("trainer-trains-forever", lambda e: e.trainer(max_epochs=-1, max_steps=-1), rt.ConfigError,
         r"max_steps=-1\) would train forever: set one of them", TRAINER),
    Case("trainer-unknown-accelerator", lambda e: e.trainer(accelerator="tpu"), rt.ConfigError,
         r"accelerator='tpu'\) is invalid: expected one of \['cpu', 'gpu', 'auto'\]", TRAINER),
    Case("trainer-unknown-strategy", lambda e: e.trainer(strategy="deepspeed"), rt.ConfigError,
         r"strategy='deepspeed'\) is invalid: expected one of \['ddp', 'fsdp', 'fsdp_sharded', 'auto'\] "
         r"or rt\.FSDPStrategy\(state_dict_type='full' \| 'sharded'\)", TRAINER),
    Case("trainer-unsupported-precision", lambda e: e.trainer(precision="64"), rt.ConfigError,
         r"precision='64' is not supported; use one of \['32-true', '16-mixed', 'bf16-mixed'\]", TRAINER),
    Case("trainer-local-launcher-several-devices", lambda e: e.trainer(devices=2), rt.ConfigError,
         r"devices=2\): the local launcher runs one process.*use launcher='ray' for several workers", TRAINER),
    Case("trainer-local-launcher-max-failures", lambda e: e.trainer(max_failures=2), rt.ConfigError,
         r"worker restarts need launcher='ray'; resume a local run with fit\(\.\.\., ckpt_path='last'\)", TRAINER),
    Case("trainer-callbacks-not-a-list", lambda e: e.trainer(callbacks="early_stopping"), rt.ConfigError,
         r"callbacks='early_stopping'\) is invalid: expected a list of rt\.Callback instances", TRAINER),
    Case("trainer-logger-by-name", lambda e: e.trainer(logger="tensorboard"), rt.ConfigError,
         r"logger='tensorboard'\) is invalid: expected True, False, an rt\.loggers\.Logger or a list", TRAINER),
    Case("trainer-checkpointing-off-with-a-modelcheckpoint",
         lambda e: e.trainer(enable_checkpointing=False, callbacks=[rt.callbacks.ModelCheckpoint()]),
         rt.ConfigError, r"enable_checkpointing=False\) conflicts with the ModelCheckpoint in callbacks; remove one",
         TRAINER),
    Case("trainer-storage-options-not-a-dict", lambda e: e.trainer(storage_options="key=secret"), rt.ConfigError,
         r"storage_options=\.\.\.\) is invalid: expected a dict of fsspec filesystem options", TRAINER),
    Case("trainer-run-name-with-a-slash", lambda e: e.trainer(name="exp/1"), rt.ConfigError,
         r"name='exp/1'\) is invalid: expected a non-empty run name without '/'", TRAINER),
    Case("trainer-checkpoint-retry-unknown-key", lambda e: e.trainer(checkpoint_retry={"tries": 3}), rt.ConfigError,
         r"checkpoint_retry=\{'tries': 3\}\) is invalid: unknown keys \['tries'\]; expected .*attempts \(int >= 1\)",
         TRAINER),
    # -- callback arguments
    Case("modelcheckpoint-top-k-without-monitor", lambda e: rt.callbacks.ModelCheckpoint(save_top_k=3), ValueError,
         r"save_top_k=3\) needs a monitor to rank checkpoints; set monitor='val_loss'", TRAINER),
    Case("modelcheckpoint-two-schedules",
         lambda e: rt.callbacks.ModelCheckpoint(every_n_train_steps=2, every_n_epochs=1), ValueError,
         r"mutually exclusive; set one", TRAINER),
    Case("earlystopping-without-monitor", lambda e: rt.callbacks.EarlyStopping(monitor=None), ValueError,
         r"EarlyStopping\(monitor=None\) is invalid: expected a metric name", TRAINER),
    Case("lr-monitor-bad-interval", lambda e: rt.callbacks.LearningRateMonitor(logging_interval="batch"),
         ValueError, r"logging_interval='batch'\) is invalid: .*'step' or 'epoch'", TRAINER),
    # -- the module
    Case("fit-a-plain-nn-module", lambda e: e.fit(nn.Linear(2, 1)), TypeError,
         r"expected an rt\.Module .*got Linear\. A LightningModule only needs its import changed", "before launch"),
    Case("module-without-training-step", lambda e: e.fit(NoTrainingStep()), TypeError,
         r"NoTrainingStep does not define training_step\(self, batch, batch_idx\)", "before launch"),
    Case("module-without-configure-optimizers", lambda e: e.fit(NoOptimizers()), TypeError,
         r"NoOptimizers does not define configure_optimizers\(\)", "before launch"),
    Case("configure-optimizers-returns-nothing", lambda e: e.fit(optimizers(lambda m: None)), TypeError,
         r"configure_optimizers\(\) returned None\. configure_optimizers\(\) must return an optimizer", "before training"),
    Case("configure-optimizers-returns-garbage", lambda e: e.fit(optimizers(lambda m: "adam")), TypeError,
         r"configure_optimizers\(\) returned str: 'adam'\. configure_optimizers\(\) must return an optimizer",
         "before training"),
    Case("two-optimizers-with-automatic-optimization",
         lambda e: e.fit(optimizers(lambda m: [torch.optim.SGD(m.parameters(), lr=0.1),
                                               torch.optim.Adam(m.parameters())])), ValueError,
         r"several optimizers: set self\.automatic_optimization = False in __init__", "before training"),
    Case("manual-optimization-with-trainer-clipping", lambda e: e.fit(Manual(), gradient_clip_val=1.0), ValueError,
         r"gradient_clip_val=1\.0\) is not supported with manual optimization .*call self\.clip_gradients",
         "before training"),
    Case("training-step-returns-a-string", lambda e: e.fit(returning(lambda m, b: "loss")), TypeError,
         r"training_step returned str; return the loss tensor, a dict with 'loss', or None", "in training"),
    Case("training-step-returns-a-float", lambda e: e.fit(returning(lambda m, b: m.loss(b).item())), TypeError,
         r"training_step returned float; return the loss tensor", "in training"),
    Case("training-step-loss-not-a-scalar", lambda e: e.fit(returning(lambda m, b: (m(b[0]) - b[1]) ** 2)),
         ValueError, r"loss has shape \(4, 1\); it must be a scalar \(reduce it with \.mean\(\) or \.sum\(\)\)",
         "in training"),
    Case("training-step-loss-detached", lambda e: e.fit(returning(lambda m, b: m.loss(b).detach())), ValueError,
         r"loss does not require grad \(was it detached.*return the loss tensor itself", "in training"),
    Case("training-step-dict-without-loss", lambda e: e.fit(returning(lambda m, b: {"out": m.loss(b)})), ValueError,
         r"dict without a 'loss' key \(keys: \['out'\]\); return the loss tensor, a dict with 'loss'", "in training"),
    Case("log-a-non-scalar", lambda e: e.fit(LogsATensor()), ValueError,
         r"self\.log\('bad'\): expected a scalar, got a tensor of shape \(3,\); reduce it first", "in training"),
    # -- a monitor that is never logged: the error lists what was logged
    Case("earlystopping-monitor-never-logged",
         lambda e: e.fit(Reg(), loader(), loader(), callbacks=[rt.callbacks.EarlyStopping("val_acc")]), KeyError,
         r"EarlyStopping\(monitor='val_acc'\) found no such metric; logged metrics: \['train_loss', 'val_loss'\]\. "
         r"Log it with self\.log\('val_acc', \.\.\.\)", "in training"),
    Case("modelcheckpoint-monitor-never-logged",
         lambda e: e.fit(Reg(), loader(), loader(), callbacks=[rt.callbacks.ModelCheckpoint(monitor="val_acc")]),
         KeyError, r"ModelCheckpoint\(monitor='val_acc'\) found no such metric; logged metrics: "
                   r"\['train_loss', 'val_loss'\]\. Log it with self\.log\('val_acc', \.\.\.\)", "in training"),
    Case("scheduler-monitor-never-logged", lambda e: e.fit(Plateau(), loader(), loader()), KeyError,
         r"ReduceLROnPlateau monitors 'val_acc', which was not logged; logged metrics: \['train_loss', 'val_loss'\]\. "
         r"Log it with self\.log\('val_acc', \.\.\.\)", "in training"),
    # -- data
    Case("batch-structure-single-tensor", lambda e: e.fit(Reg(), single_tensor_loader()), ValueError,
         r"not enough values to unpack.*the batch was list\[Tensor\(4, 2\)\]\. If training_step expected another "
         r"structure, make the loader yield it", "in training"),
    Case("batch-structure-dict", lambda e: e.fit(Reg(), dict_loader()), KeyError,
         r"the batch was dict\{'x': Tensor\(4, 2\), 'y': Tensor\(4, 1\)\}\. If training_step expected another "
         r"structure, make the loader yield it", "in training"),
    Case("datamodule-returns-no-loader", lambda e: e.trainer().fit(Reg(), datamodule=NoneData()), ValueError,
         r"NoneData\.train_dataloader\(\) returned None; return a torch DataLoader", "before training"),
    Case("datamodule-without-train-dataloader", lambda e: e.trainer().fit(Reg(), datamodule=NoTrainData()),
         ValueError, r"fit needs data: pass train_dataloaders=, a datamodule with train_dataloader\(\)",
         "before launch"),
    Case("loaders-and-a-datamodule", lambda e: e.trainer().fit(Reg(), loader(), datamodule=NoTrainData()),
         ValueError, r"pass either train_dataloaders= or datamodule=, not both", "before launch"),
    Case("train-loader-not-iterable", lambda e: e.fit(Reg(), 5), TypeError,
         r"train loader #0 is a int, which is not iterable; expected a torch DataLoader", "before training"),
    Case("fractional-limit-on-a-loader-without-length",
         lambda e: e.fit(Reg(), DataLoader(Stream(), batch_size=4), limit_train_batches=0.5), ValueError,
         r"fractional limit_train_batches needs a train loader with a length; pass an int", "before training"),
    # -- checkpoints
    Case("ckpt-path-does-not-exist", lambda e: e.trainer().fit(Reg(), loader(), ckpt_path=str(e.tmp_path / "nope")),
         rt.CheckpointError, r"checkpoint /\S+/nope does not exist: pass a checkpoint "
                             r"\(\.\.\./checkpoints/step=\.\.\.\.ckpt\), 'last' or 'best'", "before launch"),
    Case("ckpt-path-does-not-exist-ray", lambda e: e.trainer(launcher="ray").fit(
        Reg(), loader(), ckpt_path=str(e.tmp_path / "nope")), rt.CheckpointError,
        r"checkpoint /\S+/nope does not exist: pass a checkpoint ", "before launch"),
    Case("ckpt-path-half-written", lambda e: e.trainer().fit(Reg(), loader(),
                                                             ckpt_path=_uncommit(e.committed_checkpoint())),
         rt.CheckpointError, r"is not committed \(no commit seal\): the save that wrote it did not "
                             r"finish; use an earlier checkpoint", "before launch"),
    Case("ckpt-corrupted", lambda e: e.trainer().validate(
        Reg(), loader(), ckpt_path=(lambda u: (_flip_a_byte(u), u)[1])(e.committed_checkpoint()),
        verbose=False), rt.CheckpointError,
        r"step=000000003-epoch_end\.ckpt is corrupted: its content does not match the hash in its commit seal; "
        r"load an earlier checkpoint", "before training"),
    Case("ckpt-from-another-model-keys", lambda e: e.trainer().test(
        Renamed(), loader(), ckpt_path=e.committed_checkpoint(), verbose=False), rt.CheckpointError,
        r"does not fit Renamed: missing keys \['head\.bias', 'head\.weight'\]; unexpected keys \['layer\.bias', "
        r"'layer\.weight'\]\. Was it saved from another model .*Load it into the model that saved it",
        "before training"),
    Case("ckpt-from-another-model-shapes", lambda e: e.trainer().fit(
        LinearModel(features=3), loader(features=3), ckpt_path=e.committed_checkpoint()), rt.CheckpointError,
        r"shape mismatch layer\.weight: checkpoint \(1, 2\) vs model \(1, 3\)\. Was it saved from another model",
        "before training"),
    # -- storage: probed before anything runs
    Case("storage-path-unwritable", lambda e: e.fit(Reg(), storage_path=_blocked_storage(e)), rt.ConfigError,
         r"storage_path=.*not-a-dir/runs'\) is not writable: writing .* failed with .*Check the path, its permissions",
         "before launch"),
    Case("storage-path-unwritable-ray", lambda e: e.fit(Reg(), launcher="ray", storage_path=_blocked_storage(e)),
         rt.ConfigError, r"is not writable: .*Check the path, its permissions", "before launch"),
    Case("storage-s3-endpoint-unreachable", lambda e: _unreachable_s3(e).fit(Reg(), loader()), rt.ConfigError,
         r"storage_path='s3://nobucket/runs'\) is not writable: .*EndpointConnectionError.*for s3:// the bucket, "
         r"endpoint and AWS credentials", "before launch"),
    # -- YAML configs (the CLI): errors name the file, the key and what is valid
    Case("yaml-unknown-top-level-key", lambda e: _cli(e, "modle: {class_path: x.Y}\n"), cli.CLIError,
         r"run\.yaml: modle: unknown top-level key 'modle'; valid keys: model, data, trainer", "before launch"),
    Case("yaml-unknown-trainer-argument", lambda e: _cli(e, "trainer: {max_epoch: 3}\n"), cli.CLIError,
         r"run\.yaml: trainer\.max_epoch: unknown Trainer argument 'max_epoch'; valid arguments: .*max_epochs",
         "before launch"),
    Case("yaml-unknown-model-argument", lambda e: _cli(e, "model: {init_args: {lrr: 0.1}}\n"), cli.CLIError,
         r"run\.yaml: model\.init_args\.lrr: TinyRegressor does not accept 'lrr'; it accepts: lr, hidden, seed",
         "before launch"),
    Case("yaml-python-object-tag", lambda e: _cli(e, "trainer: !!python/object/apply:os.getcwd []\n"), cli.CLIError,
         r"run\.yaml: could not determine a constructor for the tag .*python/object/apply:os\.getcwd.*tags that "
         r"build Python objects are refused .*class_path", "before launch"),
    Case("yaml-not-a-mapping", lambda e: _cli(e, "- model\n"), cli.CLIError,
         r"run\.yaml: expected a mapping with keys model, data, trainer", "before launch"),
]


@pytest.fixture
def no_ray_start(monkeypatch):
    """Fails any attempt to start (or connect to) Ray; says whether one was running already."""
    ray = pytest.importorskip("ray")
    was_running = ray.is_initialized()

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called: the mistake was not caught before Ray started")

    monkeypatch.setattr(ray, "init", refuse)
    return ray, was_running


def test_the_catalogue_has_at_least_30_distinct_mistakes():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30
    assert {c.when for c in CASES} == {"construction", "before launch", "before training", "in training"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_mistake_raises_one_clear_error(case: Case, tmp_path, monkeypatch, request):
    if case.id.startswith("batch-structure") and sys.version_info < (3, 11):
        pytest.skip("the batch is described in an exception note (Python >= 3.11)")
    if case.id.endswith("-ray"):
        ray, was_running = request.getfixturevalue("no_ray_start")
    STEPS.clear()
    env = Env(tmp_path, monkeypatch)
    with pytest.raises(Exception) as info:
        case.make(env)
    err = info.value
    assert isinstance(err, case.exc), f"{type(err).__name__}: {err}"
    text = "\n".join([str(err), *getattr(err, "__notes__", [])])
    assert re.search(case.match, text, re.S), text
    if case.when in ("construction", "before launch"):
        assert not env.storage.exists(), "something was written before the mistake was caught"
    if case.when != "in training":
        assert STEPS == [], "a training step ran before the mistake was caught"
    else:
        assert len(STEPS) <= 4, STEPS  # caught on the first step / boundary where it shows
    if case.id.endswith("-ray"):
        assert ray.is_initialized() == was_running  # no Ray was started for it


def test_the_catalogue_count_in_reliability_md():
    """RELIABILITY.md states how many mistakes the catalogue covers."""
    import pathlib

    text = (pathlib.Path(__file__).resolve().parents[1] / "RELIABILITY.md").read_text()
    assert re.search(rf"\b{len(CASES)} distinct user mistakes\b", text), len(CASES)
