"""``storage_path="s3://bucket/prefix"`` against a real S3 API (moto's server on loopback).

S3 is configured only through the standard AWS environment (the ``s3_env`` fixture sets
``AWS_ENDPOINT_URL``, the key pair and the region): raytrainer is never told about the test server.
What reached the bucket is read back with boto3 (independent of s3fs and its caches).
"""
from __future__ import annotations

import csv
import io
import os

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

import raytrainer as rt
from raytrainer.checkpoint import format as ckpt_format
from raytrainer.checkpoint import sealed
from raytrainer.checkpoint import store as ckpt_io

from helpers import NoisyData
from s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY

STEPS_PER_EPOCH = 5  # 40 samples, batch_size 8




class Net(rt.Module):
    def __init__(self, hidden: int = 16, lr: float = 0.01, optimizer: str = "sgd"):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(6, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


HPARAMS = {"hidden": 16, "lr": 0.01, "optimizer": "sgd"}


class StartStep(rt.Callback):
    def __init__(self):
        self.starts: list[int] = []

    def on_train_start(self, trainer, pl_module):
        self.starts.append(trainer.global_step)


def _fit(storage_path, *, name="run", callbacks=(), ckpt_path=None, **kwargs):
    kwargs.setdefault("max_epochs", 2)
    ckpt = rt.callbacks.ModelCheckpoint(monitor="val_loss", save_top_k=2, save_last=True)
    torch.manual_seed(0)
    model = Net()
    trainer = rt.Trainer(launcher="local", enable_progress_bar=False, accelerator="cpu", seed=3,
                         storage_path=str(storage_path), name=name, log_every_n_steps=1,
                         callbacks=[ckpt, *callbacks], **kwargs)
    result = trainer.fit(model, DataLoader(NoisyData(40), batch_size=8, shuffle=True),
                         DataLoader(NoisyData(16), batch_size=8), ckpt_path=ckpt_path)
    return model, result, ckpt


def _bucket_and_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def _objects(s3_server, uri: str) -> dict[str, bytes]:
    """Every object under ``uri``: key relative to it -> bytes."""
    bucket, prefix = _bucket_and_key(uri)
    return {k[len(prefix) + 1:]: v for k, v in s3_server.all_objects(bucket).items()
            if k.startswith(prefix + "/")}


def _download(objects: dict[str, bytes], under: str, dest) -> str:
    for key, data in objects.items():
        if key.startswith(under + "/"):
            path = os.path.join(dest, key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
    return os.path.join(dest, under)


def _step(n: int) -> str:
    return ckpt_format.checkpoint_dir_name(n, False)


def test_fit_on_s3_commits_checkpoints_and_uploads_logs(s3_env, s3_server, tmp_path):
    model, result, ckpt = _fit(s3_env)
    run = f"{s3_env}/run"
    uris = [f"{run}/checkpoints/{_step(n)}" for n in (STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH)]
    assert result.checkpoints == uris
    assert ckpt.last_model_path == uris[-1] and ckpt.best_model_path in uris
    assert result.log_dir == f"{run}/tensorboard"

    objects = _objects(s3_server, run)
    assert sorted(k for k in objects if k.startswith("checkpoints/")) == [u[len(run) + 1:] for u in uris]
    for uri in uris:  # one object each, whose bytes match the hash in its seal
        meta = sealed.verify(objects[uri[len(run) + 1:]], uri)
        assert (meta["global_step"], meta["epoch"]) == (int(uri.rsplit("=", 1)[1][:9]), uris.index(uri))
    assert not [k for k in objects if ".tmp" in k]

    # the final checkpoint holds the final weights, read as Lightning users read a checkpoint
    final = torch.load(io.BytesIO(objects[f"checkpoints/{_step(10)}"]), weights_only=True)["state_dict"]
    for key, value in model.state_dict().items():
        assert torch.equal(final[key], value), key

    # TensorBoard event files reached the bucket and read back with TensorBoard's own reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb_dir = _download(objects, "tensorboard", tmp_path / "tb")
    ea = EventAccumulator(tb_dir, size_guidance={"scalars": 0}).Reload()
    assert {"train_loss", "val_loss"} <= set(ea.Tags()["scalars"])
    val_tb = [(e.step, e.value) for e in ea.Scalars("val_loss")]
    assert [s for s, _ in val_tb] == [4, 9]  # Lightning's steps: the optimizer steps before the row's
    assert [s for s, _ in ((e.step, e.value) for e in ea.Scalars("train_loss"))] == list(range(10))
    assert yaml.safe_load(objects["tensorboard/hparams.yaml"]) == HPARAMS

    # csv/metrics.csv too, with the same values.
    rows = list(csv.DictReader(io.StringIO(objects["csv/metrics.csv"].decode())))
    val_csv = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    assert [s for s, _ in val_csv] == [4, 9]
    assert [v for _, v in val_csv] == pytest.approx([v for _, v in val_tb], rel=1e-6)
    assert val_csv[-1][1] == pytest.approx(result.metrics["val_loss"], rel=1e-6)
    assert yaml.safe_load(objects["csv/hparams.yaml"]) == HPARAMS


def test_load_checkpoint_reads_s3(s3_env):
    model, result, ckpt = _fit(s3_env, max_epochs=1)
    uri = result.checkpoints[-1]
    assert uri.startswith("s3://")
    state = rt.load_checkpoint(uri)
    assert (state["global_step"], state["epoch"]) == (STEPS_PER_EPOCH, 0)
    assert state["hyper_parameters"] == HPARAMS
    for key, value in model.state_dict().items():
        assert torch.equal(state["state_dict"][key], value), key
    assert set(state["rank_states"]) == {0}
    # the checkpoint is usable elsewhere: a fresh module validated from it scores as the trained one
    def validate(module, ckpt_path=None):
        trainer = rt.Trainer(launcher="local", enable_progress_bar=False, accelerator="cpu", seed=3,
                             logger=False, storage_path=s3_env, name="eval", enable_checkpointing=False)
        return trainer.validate(module, DataLoader(NoisyData(16), batch_size=8), ckpt_path=ckpt_path,
                                verbose=False)[0]["val_loss"]

    fresh = Net()
    assert not torch.equal(fresh.net[0].weight, model.net[0].weight)
    assert validate(fresh, ckpt_path=uri) == validate(model)
    with pytest.raises(rt.CheckpointError, match="does not exist"):
        rt.load_checkpoint(f"{s3_env}/run/checkpoints/{_step(999)}")


def test_resume_last_from_s3_is_bit_identical(s3_env, s3_server, tmp_path):
    total, stop = 13, 7  # stop mid-epoch 1, finish mid-epoch 2
    straight, straight_result, _ = _fit(tmp_path, name="straight", max_steps=total, max_epochs=None,
                                        logger=False)

    _, first, _ = _fit(s3_env, max_steps=stop, max_epochs=None)
    assert first.global_step == stop
    assert ckpt_io.latest_committed(f"{s3_env}/run/checkpoints") == f"{s3_env}/run/checkpoints/{_step(stop)}"

    starts = StartStep()
    resumed, result, ckpt = _fit(s3_env, max_steps=total, max_epochs=None, ckpt_path="last",
                                 callbacks=[starts])
    assert starts.starts == [stop]  # global_step continues from the S3 checkpoint
    assert result.global_step == total
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{key} differs after resuming from S3"
    assert result.metrics["val_loss"] == straight_result.metrics["val_loss"]
    assert ckpt.last_model_path == f"{s3_env}/run/checkpoints/{_step(total)}"
    # retention on S3: the first run's 'last' (step 7) was deleted once step 10 took over; steps 5
    # and 10 are the top 2 by val_loss, 13 is 'last'
    assert result.checkpoints == [f"{s3_env}/run/checkpoints/{_step(n)}" for n in (5, 10, 13)]
    on_s3 = {k.split("/")[1] for k in _objects(s3_server, f"{s3_env}/run") if k.startswith("checkpoints/")}
    assert on_s3 == {_step(5), _step(10), _step(13)}

    # the metrics file on S3 continues the first run's: every step once, in order
    rows = list(csv.DictReader(io.StringIO(_objects(s3_server, f"{s3_env}/run")["csv/metrics.csv"].decode())))
    steps = [int(r["step"]) for r in rows if r.get("train_loss")]
    assert steps == list(range(total))


def _assert_no_secret(objects: dict[str, bytes]) -> None:
    assert objects
    for needle in (SECRET_ACCESS_KEY, ACCESS_KEY_ID):
        for encoded in {needle.encode(), needle.encode("utf-16-le")}:
            leaked = [key for key, data in objects.items() if encoded in data]
            assert not leaked, f"{needle!r} was written to {leaked}"


def test_bucket_holds_no_credentials(s3_env, s3_server):
    _fit(s3_env, max_steps=7, max_epochs=None)
    _fit(s3_env, max_steps=13, max_epochs=None, ckpt_path="last")  # a resume writes too (staged logs, checkpoints)
    bucket, _ = _bucket_and_key(s3_env)
    objects = s3_server.all_objects(bucket)  # every object in the bucket, not just under the run
    kinds = {k.rsplit("/", 1)[-1].split(".")[0] for k in objects}
    assert {"metrics", "hparams", "events"} <= kinds and any(k.endswith(".ckpt") for k in objects)
    _assert_no_secret(objects)

    # the places a configuration would land, checked as parsed data too
    for key in [k for k in objects if k.endswith("hparams.yaml")]:
        hp = yaml.safe_load(objects[key])
        assert hp == HPARAMS
    state = rt.load_checkpoint(ckpt_io.latest_committed(f"{s3_env}/run/checkpoints"))
    assert state["hyper_parameters"] == HPARAMS
    flat = repr({k: v for k, v in state.items() if k not in ("state_dict", "rank_states")})
    assert SECRET_ACCESS_KEY not in flat and ACCESS_KEY_ID not in flat


def test_secret_scan_detects_a_leak(s3_env, s3_server, monkeypatch):
    """Control for the scan above: a module that puts the secret in its own hparams is redacted
    (nothing in the bucket); with redaction switched off the same fit is caught (in hparams.yaml,
    the event file and the checkpoint), so a clean scan means something."""
    from raytrainer import redaction

    class Leaky(Net):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters({"oops": os.environ["AWS_SECRET_ACCESS_KEY"]})

    def fit(name):
        torch.manual_seed(0)
        trainer = rt.Trainer(launcher="local", enable_progress_bar=False, accelerator="cpu", max_epochs=1,
                             storage_path=s3_env, name=name)
        trainer.fit(Leaky(), DataLoader(NoisyData(40), batch_size=8))
        return s3_server.all_objects(_bucket_and_key(s3_env)[0])

    with pytest.warns(UserWarning, match="'oops' look like credentials"):
        _assert_no_secret(fit("redacted"))
    monkeypatch.setattr(redaction, "redact_with_paths", lambda value, also=(), environ=None: (value, []))
    with pytest.raises(AssertionError) as err:
        _assert_no_secret(fit("leaky"))
    for where in ("hparams.yaml", "tfevents", ".ckpt"):
        assert where in str(err.value)


def _credentials_only_in_storage_options(monkeypatch, s3_server, endpoint_in_options: bool) -> dict:
    import s3fs

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    options = {"key": ACCESS_KEY_ID, "secret": SECRET_ACCESS_KEY}
    if endpoint_in_options:
        monkeypatch.delenv("AWS_ENDPOINT_URL")
        options["endpoint_url"] = s3_server.endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    return options


def test_storage_options_credentials_are_not_written(s3_env, s3_server, monkeypatch):
    """Credentials given in ``storage_options`` (no AWS env at all) reach S3 but never the bucket."""
    options = _credentials_only_in_storage_options(monkeypatch, s3_server, endpoint_in_options=True)
    _, result, _ = _fit(s3_env, max_epochs=1, logger=False, storage_options=options)
    assert result.checkpoints == [f"{s3_env}/run/checkpoints/{_step(STEPS_PER_EPOCH)}"]
    objects = s3_server.all_objects(_bucket_and_key(s3_env)[0])
    assert any(k.endswith(".ckpt") for k in objects)
    _assert_no_secret(objects)
    assert rt.load_checkpoint(result.checkpoints[0], options)["global_step"] == STEPS_PER_EPOCH


def test_storage_options_credentials_reach_the_loggers(s3_env, s3_server, monkeypatch):
    options = _credentials_only_in_storage_options(monkeypatch, s3_server, endpoint_in_options=False)
    _fit(s3_env, max_epochs=1, storage_options=options)
    objects = _objects(s3_server, f"{s3_env}/run")
    assert "csv/metrics.csv" in objects and any("tfevents" in k for k in objects)
    _assert_no_secret(objects)


def test_named_checkpoints_on_s3_are_server_side_copies_of_sealed_files(s3_env, s3_server):
    """ModelCheckpoint(dirpath=s3://..., filename=...): the kept files appear under Lightning's
    names in the bucket, each the committed checkpoint's sealed bytes; evicted names go."""
    named_dir = f"{s3_env}/named"
    ckpt = rt.callbacks.ModelCheckpoint(dirpath=named_dir, filename="{epoch}-{val_loss:.3f}", monitor="val_loss",
                                        save_top_k=1, save_last=True)
    _, result, _ = _fit(s3_env, max_epochs=3, callbacks=[ckpt], logger=False)
    objects = _objects(s3_server, named_dir)
    best = ckpt.best_model_path.rsplit("/", 1)[1]
    assert sorted(objects) == sorted({best, "last.ckpt"}) and best.startswith("epoch=")
    last_run_file = _objects(s3_server, f"{s3_env}/run/checkpoints")[result.checkpoints[-1].rsplit("/", 1)[1]]
    assert objects["last.ckpt"] == last_run_file  # the same sealed bytes
    assert sealed.verify(objects[best], best)["global_step"] == rt.load_checkpoint(ckpt.best_model_path)["global_step"]
