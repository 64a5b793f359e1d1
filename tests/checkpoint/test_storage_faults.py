"""Storage faults on a real S3 API: the loopback moto server is stopped mid-run, and restarted (or
not) on the same port.

In-process (``launcher="local"``), asynchronous checkpoints. An outage that must hit a pending
checkpoint upload is started from inside the checkpoint writer thread, at the moment it begins
writing one checkpoint's file: it always hits the upload, never the training thread. Everything
else is real: s3fs/botocore get connection-refused errors from a closed port, raytrainer's
RetryPolicy (shortened with ``Trainer(checkpoint_retry=...)``) backs off, and what reached the
bucket is read back with boto3.

moto keeps buckets and objects in its in-process backend, not in the server object, so they
survive the stop and the restart (checked: the bucket and earlier checkpoints read back after it).

botocore's own retries are turned off (``AWS_MAX_ATTEMPTS=1``): by default it retries a refused
connection 5 times over ~7 s *inside* each raytrainer attempt (measured with this server), which
would make these tests slow without testing anything of ours. With botocore's default, a
checkpoint write's real retry budget is about attempts x 7 s plus the RetryPolicy's waits.
"""
from __future__ import annotations

import csv
import io
import threading
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt
from raytrainer.checkpoint import format as ckpt_format
from raytrainer.checkpoint import sealed
from raytrainer.checkpoint import store as ckpt_io
from raytrainer.checkpoint.writer import CheckpointUploadError, RetryPolicy

pytestmark = pytest.mark.timeout(60)

STEP_S = 0.005      # a slow SlowNet step sleeps this long: steps are counted in wall-clock time
EVERY = 400         # a checkpoint every EVERY steps (an outage ends long before the next one)


@pytest.fixture
def s3(monkeypatch):
    """A loopback S3 server of this test's own (the test stops and restarts it), configured
    through the standard AWS environment only; yields (server, "s3://bucket/runs")."""
    pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    from s3_server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, S3Server

    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_RETRY_MODE"):
        monkeypatch.delenv(var, raising=False)
    server = S3Server().start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # see the module docstring
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = server.create_bucket()
    try:
        yield server, f"s3://{bucket}/runs"
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


class Outage:
    """Stops the S3 server and restarts it on the same port ``down_s`` seconds after it went
    down (never, with None). Records when the server was really down, and in which thread the
    outage began."""

    def __init__(self, server, down_s: float | None):
        self.server, self.down_s, self.port = server, down_s, server.port
        self.t_down: float | None = None
        self.t_up: float | None = None
        self.thread = ""
        self.restarted = threading.Event()

    def begin(self) -> None:
        if self.t_down is not None:
            return
        self.thread = threading.current_thread().name
        self.server.stop()
        self.t_down = time.monotonic()
        if self.down_s is not None:
            threading.Timer(self.down_s, self._restart).start()

    def _restart(self) -> None:
        self.server.start(port=self.port)
        self.t_up = time.monotonic()
        self.restarted.set()

    def at_checkpoint_write(self, monkeypatch, name: str) -> "Outage":
        """Begin when the checkpoint writer is about to write checkpoint ``name`` (its one file)."""
        real_write = ckpt_io.write_atomically

        def write(fs, path, data):
            if path.endswith(name):
                self.begin()
            return real_write(fs, path, data)

        monkeypatch.setattr(ckpt_io, "write_atomically", write)
        return self


class SlowNet(rt.Module):
    """A linear regressor whose steps from ``slow_from`` on take ``STEP_S`` (the ones before are
    as fast as they go: no test waits for steps it does not measure)."""

    def __init__(self, slow_from: int | None = EVERY):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 1)
        self.slow_from = slow_from

    def training_step(self, batch, batch_idx):
        if self.slow_from is not None and self.global_step >= self.slow_from:
            time.sleep(STEP_S)
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _data(n: int) -> DataLoader:
    """``n`` samples, batch size 1: ``n`` steps per epoch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=1)


class StepClock(rt.Callback):
    """(global_step, time) after every training batch, and the weights at each checkpoint."""

    def __init__(self):
        self.times: list[tuple[int, float]] = []
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append((trainer.global_step, time.monotonic()))

    def on_checkpoint_boundary(self, trainer, pl_module):
        if trainer.global_step % EVERY == 0:
            self.weights[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def steps_between(self, start: float, end: float) -> list[int]:
        return [step for step, t in self.times if start < t < end]


def _trainer(storage_path, callbacks, retry: RetryPolicy, max_steps: int, save_top_k: int,
             logger=False, **kwargs) -> rt.Trainer:
    ckpt = rt.callbacks.ModelCheckpoint(every_n_train_steps=EVERY, save_top_k=save_top_k)
    return rt.Trainer(launcher="local", accelerator="cpu", enable_progress_bar=False, logger=logger,
                      storage_path=storage_path, name="run", max_steps=max_steps, async_checkpoint=True,
                      checkpoint_retry=retry, callbacks=[ckpt, *callbacks], **kwargs)


def _folder(step: int) -> str:
    return ckpt_format.checkpoint_dir_name(step, False)


def _root(storage_path: str) -> str:
    return f"{storage_path}/run/checkpoints"


def _bucket_objects(server, storage_path: str, under: str) -> dict[str, bytes]:
    """The objects under ``{storage_path}/run/{under}/``, read with boto3 (not s3fs or its caches)."""
    bucket, _, prefix = storage_path.removeprefix("s3://").partition("/")
    prefix = f"{prefix}/run/{under}/"
    return {k[len(prefix):]: v for k, v in server.all_objects(bucket).items() if k.startswith(prefix)}


def _assert_seal_matches_bucket(server, storage_path: str, step: int) -> None:
    """Checkpoint ``step`` is one object in the bucket whose bytes match its seal's hash."""
    data = _bucket_objects(server, storage_path, "checkpoints")[_folder(step)]
    assert sealed.verify(data, _folder(step))["global_step"] == step


def _retry_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if "retrying in" in line]


def test_server_down_during_upload_retries_and_commits_while_training_goes_on(s3, monkeypatch, rt_log):
    """The server stops as step 400's commit begins and is back 0.6 s later. The writer retries
    (0.1 s, 0.2 s, 0.4 s ...), the checkpoint commits whole after the recovery, and training kept
    stepping the whole time the server was down."""
    server, storage_path = s3
    outage = Outage(server, down_s=0.6).at_checkpoint_write(monkeypatch, _folder(EVERY))
    clock = StepClock()
    retry = RetryPolicy(attempts=8, base_delay_s=0.1, max_delay_s=0.4)  # waits sum to 2.5 s > outage
    result = _trainer(storage_path, [clock], retry, max_steps=2 * EVERY, save_top_k=-1).fit(
        SlowNet(), _data(1000))

    assert result.global_step == 2 * EVERY
    assert outage.restarted.is_set()
    assert outage.thread == "raytrainer-checkpoint"  # the outage hit the pending upload, in its thread

    # Training was not blocked: steps kept finishing, one after another, while the server was down.
    during = clock.steps_between(outage.t_down, outage.t_up)
    possible = (outage.t_up - outage.t_down) / STEP_S
    assert len(during) >= 0.3 * possible, (len(during), possible)
    assert during[0] > EVERY and during == list(range(during[0], during[0] + len(during)))

    # The writer retried with the policy's backoff, each time naming the checkpoint and the cause ...
    retries = _retry_lines(rt_log.text)
    assert 2 <= len(retries) <= 4, retries
    assert all(f"checkpoint {_root(storage_path)}/{_folder(EVERY)} failed (EndpointConnectionError" in line
               for line in retries), retries
    assert [line.rsplit("retrying in ", 1)[1] for line in retries] == ["0.1s", "0.2s", "0.4s", "0.4s"][:len(retries)]

    # ... and the checkpoint committed after the recovery, whole: the object in the bucket has its
    # seal's hash (read with boto3), it loads (hash verified) and holds step 400's weights.
    uris = [f"{_root(storage_path)}/{_folder(n)}" for n in (EVERY, 2 * EVERY)]
    assert ckpt_io.list_committed(_root(storage_path)) == uris
    _assert_seal_matches_bucket(server, storage_path, EVERY)
    state = rt.load_checkpoint(uris[0])
    assert state["global_step"] == EVERY
    for key, value in clock.weights[EVERY].items():
        assert torch.equal(state["state_dict"][key], value), key


@pytest.mark.parametrize("max_steps", [2 * EVERY + 50, 3 * EVERY], ids=["final-checkpoint", "mid-run"])
def test_server_down_past_the_retry_budget_raises_and_keeps_the_last_commit(s3, monkeypatch, rt_log, max_steps):
    """The server goes down as checkpoint 800 is being written and stays down. fit raises
    CheckpointUploadError naming that checkpoint
    and the attempts -- when fit waits for it at the end, or at the next checkpoint boundary
    (mid-run: step 1200, before that one touches storage) -- not the loggers' upload error from
    the cleanup after it. Checkpoint 400 is intact: retention (save_top_k=1) did not delete it, its
    seal verifies, it holds step 400's weights; nothing of 800 is in the bucket (one PUT: whole or
    absent)."""
    server, storage_path = s3
    good, failing = EVERY, 2 * EVERY
    outage = Outage(server, down_s=None).at_checkpoint_write(monkeypatch, _folder(failing))
    clock = StepClock()
    retry = RetryPolicy(attempts=3, base_delay_s=0.1, max_delay_s=0.2)
    trainer = _trainer(storage_path, [clock], retry, max_steps=max_steps, save_top_k=1,
                       logger=[rt.loggers.CSVLogger(), rt.loggers.TensorBoardLogger()])
    with pytest.raises(CheckpointUploadError) as err:
        trainer.fit(SlowNet(slow_from=None), _data(2000))
    failed_uri = f"{_root(storage_path)}/{_folder(failing)}"
    assert str(err.value).startswith(f"checkpoint {failed_uri} failed after 3 attempts: EndpointConnectionError")
    assert outage.thread == "raytrainer-checkpoint"
    out = rt_log.text
    assert len(_retry_lines(out)) == 2 and all(failed_uri in line for line in _retry_lines(out))
    # The loggers' last upload (rows logged after step 800) failed too, and said so without
    # replacing the error.
    assert f"uploading logs to {storage_path}/run/csv failed (EndpointConnectionError" in out
    # Training went on after the failed commit until the next boundary, or the end.
    assert clock.times[-1][0] == max_steps

    server.start(port=outage.port)  # storage is back: inspect what the outage left behind
    # Nothing of 800 (one PUT: whole or absent) and, mid-run, the error was raised before the
    # next checkpoint wrote anything.
    assert sorted(_bucket_objects(server, storage_path, "checkpoints")) == [_folder(good)]
    with pytest.raises(rt.CheckpointError, match="does not exist"):
        rt.load_checkpoint(failed_uri)
    good_uri = f"{_root(storage_path)}/{_folder(good)}"
    assert ckpt_io.list_committed(_root(storage_path)) == [good_uri]
    _assert_seal_matches_bucket(server, storage_path, good)
    state = rt.load_checkpoint(good_uri)
    assert state["global_step"] == good
    for key, value in clock.weights[good].items():
        assert torch.equal(state["state_dict"][key], value), key


class OutageAtEpochEnd(rt.Callback):
    def __init__(self, outage: Outage):
        self.outage = outage

    def on_train_epoch_end(self, trainer, pl_module):
        self.outage.begin()  # the loggers upload right after this hook, at the epoch's end


def test_log_uploads_failing_during_an_outage_do_not_stop_training(s3, rt_log, tmp_path):
    """The server is down when the CSV and TensorBoard loggers upload at the end of epoch 0 (step
    500). The failure is printed, training goes on, the next checkpoint (step 800, after the
    recovery) commits, and the final upload brings the logs up complete."""
    server, storage_path = s3
    outage = Outage(server, down_s=1.0)
    clock = StepClock()
    trainer = _trainer(storage_path, [clock, OutageAtEpochEnd(outage)], RetryPolicy(), max_steps=2 * EVERY,
                       save_top_k=-1, log_every_n_steps=10,
                       logger=[rt.loggers.CSVLogger(), rt.loggers.TensorBoardLogger()])
    result = trainer.fit(SlowNet(), _data(500))
    assert result.global_step == 2 * EVERY
    assert outage.thread == "MainThread" and outage.restarted.is_set()
    out = rt_log.text
    for logger in ("csv", "tensorboard"):
        assert f"uploading logs to {storage_path}/run/{logger} failed (EndpointConnectionError" in out
    during = clock.steps_between(outage.t_down, outage.t_up)
    assert len(during) >= 0.3 * (outage.t_up - outage.t_down) / STEP_S and during[0] == 501
    assert "retrying in" not in out  # no checkpoint write met the outage

    assert ckpt_io.list_committed(_root(storage_path)) == [f"{_root(storage_path)}/{_folder(n)}"
                                                           for n in (EVERY, 2 * EVERY)]
    logs = _bucket_objects(server, storage_path, "csv")
    rows = list(csv.DictReader(io.StringIO(logs["metrics.csv"].decode())))
    assert [int(r["step"]) for r in rows if r.get("train_loss")] == list(range(9, 2 * EVERY, 10))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = _bucket_objects(server, storage_path, "tensorboard")
    events = [name for name in tb if "tfevents" in name]
    assert len(events) >= 2  # one event file per save: the one closed during the outage arrived later
    steps = []
    for i, name in enumerate(events):  # each file alone: the reader drops "out of order" steps
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / name.rsplit("/", 1)[-1]).write_bytes(tb[name])
        ea = EventAccumulator(str(tmp_path / str(i)), size_guidance={"scalars": 0}).Reload()
        steps += [e.step for e in ea.Scalars("train_loss")] if "train_loss" in ea.Tags()["scalars"] else []
    assert sorted(steps) == list(range(9, 2 * EVERY, 10))
