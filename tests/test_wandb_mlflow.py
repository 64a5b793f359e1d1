"""W&B and MLflow loggers, offline: what they wrote is read back by the real formats' readers.

W&B runs in offline mode and writes its transaction log (``run-<id>.wandb``: LevelDB-log framed,
CRC-checked protobuf ``Record``s), which ``_wandb_run`` parses with wandb's own protobuf classes
(wandb >= 0.2x ships no Python reader). MLflow writes a local sqlite store read back with
``MlflowClient``. No network: W&B's service is a local process, and every wait is bounded by the
timeout below.
"""
from __future__ import annotations

import glob
import json
import os
import time
import pickle
import struct
import sys
import tempfile
import zlib

import pytest
import yaml

import raytrainer as rt
from raytrainer import checkpoint as ckpt_io
from raytrainer.loggers import MLflowLogger, WandbLogger

from helpers import LinearModel, loader, make_trainer

pytestmark = pytest.mark.timeout(120)

HPARAMS = {"lr": 0.01, "hidden": 64, "opt": {"name": "adam", "betas": (0.9, 0.99)}}


@pytest.fixture
def clean_env():
    """Both libraries read (and wandb may set) process environment: restore it whole."""
    saved = dict(os.environ)
    for var in [v for v in os.environ if v.startswith(("WANDB_", "MLFLOW_"))]:
        del os.environ[var]
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def wandb_offline(tmp_path, clean_env, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # wandb.init wraps it process-wide
    home = tmp_path / "wandb-home"
    clean_env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(home),
                     WANDB_CACHE_DIR=str(home / "cache"), WANDB_DATA_DIR=str(home / "data"),
                     WANDB_CONFIG_DIR=str(home / "config"), WANDB_ARTIFACT_DIR=str(home / "art"),
                     # no stdout/stderr capture (pytest owns them), no git or system probing
                     WANDB_CONSOLE="off", WANDB_DISABLE_GIT="true", WANDB_DISABLE_CODE="true",
                     WANDB_X_DISABLE_STATS="true", WANDB_INIT_TIMEOUT="60")
    yield wandb
    wandb.teardown()  # stop the service process this test started


@pytest.fixture
def mlflow_local(clean_env):
    return pytest.importorskip("mlflow")


# ---------------------------------------------------------------- readers

def _wandb_records(path):
    """Every protobuf Record of a ``.wandb`` file, each chunk's CRC verified."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", path
    pos, pending, records = 7, b"", []  # after the 7-byte file header
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768  # chunks never cross 32 KiB blocks; the tail is zero padding
        if room < 7:
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc, f"corrupt chunk at {pos}"
        pending += chunk
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            records.append(pb.Record.FromString(pending))
            pending = b""
    return records


def _wandb_run(path) -> dict:
    """id, config, history rows, exit code and artifacts of one offline run file."""
    out = {"id": None, "config": {}, "history": [], "exit_code": None, "artifacts": []}
    for rec in _wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["id"] = rec.run.run_id
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in rec.history.item})
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
        elif kind == "artifact":
            out["artifacts"].append((rec.artifact.name, rec.artifact.type,
                                     sorted(c.path for c in rec.artifact.manifest.contents)))
    out["config"].pop("_wandb", None)
    return out


def _offline_runs(save_dir, timeout_s: float = 20.0) -> list[dict]:
    """Every offline run under ``save_dir``, read once its file is complete: W&B's service process
    writes the file after ``finish()`` returns, and on a loaded machine the read can come first."""
    deadline = time.monotonic() + timeout_s
    while True:
        files = glob.glob(os.path.join(str(save_dir), "wandb", "offline-run-*", "run-*.wandb"))
        runs = [_wandb_run(f) for f in sorted(files, key=os.path.getmtime)]
        if all(r["id"] is not None and r["exit_code"] is not None for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)


def _series(rows, key) -> list[tuple[int, float]]:
    return [(r["trainer/global_step"], r[key]) for r in rows if key in r]


# ---------------------------------------------------------------- a fit that is killed, then resumed

class Net(LinearModel):
    def __init__(self, lr: float = 0.1, opt: dict | None = None):
        super().__init__(lr=lr)
        self.save_hyperparameters()


class Kill(rt.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        # Before step 6 is logged or checkpointed: step 5 was logged, the last checkpoint is step 4.
        if trainer.global_step == 6:
            raise RuntimeError("simulated kill at step 6")


def _fit(tmp_path, loggers, *callbacks, ckpt_path=None):
    trainer = make_trainer(tmp_path, max_steps=8, max_epochs=2, log_every_n_steps=1, logger=loggers,
                           enable_checkpointing=True, seed=0,
                           callbacks=[rt.callbacks.ModelCheckpoint(every_n_train_steps=2,
                                                                   save_top_k=-1), *callbacks])
    return trainer.fit(Net(opt={"name": "sgd", "nesterov": False}), loader(n=16, batch_size=4),
                       ckpt_path=ckpt_path)


def test_kill_and_resume_continues_one_wandb_and_one_mlflow_run(tmp_path, wandb_offline,
                                                                mlflow_local):
    run_dir = tmp_path / "run"
    wb, ml = WandbLogger(project="rt-test"), MLflowLogger(experiment_name="exp")
    with pytest.raises(RuntimeError, match="simulated kill"):
        _fit(tmp_path, [wb, ml], Kill())
    last = ckpt_io.latest_committed(make_trainer(tmp_path).cfg)
    assert "step=000000004" in last
    assert ckpt_io.load(last)["loggers"] == [{"wandb_run_id": wb.run_id},
                                             {"mlflow_run_id": ml.run_id}]

    # A new process would build new loggers: they must find the runs through the checkpoint.
    wb2, ml2 = WandbLogger(project="rt-test", log_checkpoints=True), MLflowLogger(experiment_name="exp")
    assert (wb2.run_id, ml2.run_id) != (wb.run_id, ml.run_id)
    result = _fit(tmp_path, [wb2, ml2], ckpt_path="last")
    assert result.global_step == 8
    assert (wb2.run_id, ml2.run_id) == (wb.run_id, ml.run_id)

    # W&B: one run id in both offline folders (under the run dir), the crash exiting 1.
    first, second = _offline_runs(run_dir)
    assert first["id"] == second["id"] == wb.run_id
    assert (first["exit_code"], second["exit_code"]) == (1, 0)
    crashed, resumed = _series(first["history"], "train_loss"), _series(second["history"], "train_loss")
    assert [s for s, _ in crashed] == [1, 2, 3, 4, 5]
    assert [s for s, _ in resumed] == [5, 6, 7, 8]  # continues after the step-4 checkpoint
    assert resumed[0][1] == pytest.approx(crashed[-1][1], abs=0)  # step 5 again, same loss
    for run in (first, second):
        assert [r["_step"] for r in run["history"]] == list(range(len(run["history"])))
        assert run["config"]["lr"] == 0.1
        assert run["config"]["opt"] == {"name": "sgd", "nesterov": False}
    # log_checkpoints: the newest committed checkpoint, as an artifact, when the run finished
    [(name, kind, paths)] = second["artifacts"]
    assert (name, kind) == (f"model-{wb.run_id}", "model")
    assert {"COMMIT.json", "model.pt", "state.pt"} <= set(paths)

    # MLflow: one run in the experiment, FINISHED, every step logged by either attempt.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(ml.tracking_uri)
    assert ml.tracking_uri == f"sqlite:///{run_dir}/mlflow.db"
    exp = client.get_experiment_by_name("exp")
    [run] = client.search_runs([exp.experiment_id])
    assert run.info.run_id == ml.run_id and run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(ml.run_id, "train_loss"))
    assert steps == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    assert run.data.params == {"lr": "0.1", "opt/name": "sgd", "opt/nesterov": "False"}
    assert exp.artifact_location.endswith(os.path.join("run", "mlartifacts"))


# ---------------------------------------------------------------- W&B alone

def test_wandb_metrics_hparams_and_resolved_config(tmp_path, wandb_offline):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_epochs": 3}}))
    logger = WandbLogger(project="p", name="first", group="g")
    logger.setup(str(run_dir))
    logger.log_hyperparams(HPARAMS)
    for step in (1, 2, 3):
        logger.log_metrics({"train_loss": 1.0 / step}, step=step)
    logger.log_metrics({"val_loss": 0.5}, step=3)  # a second call at the same step
    assert logger.log_dir == str(run_dir)
    logger.finalize("success")
    logger.finalize("success")  # idempotent: the run is already closed

    [run] = _offline_runs(run_dir)
    assert run["id"] == logger.run_id and run["exit_code"] == 0
    assert _series(run["history"], "train_loss") == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert _series(run["history"], "val_loss") == [(3, 0.5)]
    assert run["config"]["opt"] == {"name": "adam", "betas": [0.9, 0.99]}
    assert (run["config"]["lr"], run["config"]["hidden"]) == (0.01, 64)
    assert run["config"]["resolved_config"] == {"trainer": {"max_epochs": 3}}


def test_wandb_pickles_without_run_and_remote_run_dir_uses_local_folder(tmp_path, wandb_offline,
                                                                        monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the local folder lands in tmp_path
    logger = WandbLogger(project="p", id="fixedid1")
    logger.setup("memory://bucket/run")
    logger.log_metrics({"a": 1.0}, step=1)
    local = logger.log_dir
    assert os.path.dirname(local) == str(tmp_path) and os.path.isdir(local)
    clone = pickle.loads(pickle.dumps(logger))
    assert clone._run is None and clone.run_id == "fixedid1"
    assert len(pickle.dumps(logger)) < 2000
    logger.finalize("failed")
    # An explicit id= wins over a checkpoint's.
    clone.load_state_dict({"wandb_run_id": "other123"})
    assert clone.run_id == "fixedid1"
    [run] = _offline_runs(local)
    assert (run["id"], run["exit_code"]) == ("fixedid1", 1)


# ---------------------------------------------------------------- MLflow alone

def test_mlflow_metrics_and_params_read_back(tmp_path, mlflow_local):
    from mlflow.tracking import MlflowClient

    logger = MLflowLogger(run_name="r1", tags={"team": "ml"})
    logger.setup(str(tmp_path / "run"))
    params = {**HPARAMS, "long": "x" * 7000, "bad:key?": 1}
    logger.log_hyperparams(params)
    logger.log_hyperparams(params)  # a resume logs them again: a no-op
    for step in (1, 2, 3):
        logger.log_metrics({"train_loss": 1.0 / step, "lr": 0.1 * step}, step=step)
    logger.finalize("success")

    client = MlflowClient(f"sqlite:///{tmp_path}/run/mlflow.db")
    run = client.get_run(logger.run_id)
    assert (run.info.status, run.info.run_name, run.data.tags["team"]) == ("FINISHED", "r1", "ml")
    history = client.get_metric_history(logger.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert [m.step for m in client.get_metric_history(logger.run_id, "lr")] == [1, 2, 3]
    assert run.data.params == {"lr": "0.01", "hidden": "64", "opt/name": "adam",
                               "opt/betas": "(0.9, 0.99)", "long": "x" * 6000, "bad_key_": "1"}


def test_mlflow_failed_status_pickling_and_explicit_file_uri(tmp_path, mlflow_local, clean_env):
    from mlflow.tracking import MlflowClient

    clean_env["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 gates its file store behind this
    uri = f"file:{tmp_path}/mlruns"
    logger = MLflowLogger(tracking_uri=uri)
    logger.setup(str(tmp_path / "run"))
    logger.log_metrics({"a": 1.0}, step=7)
    clone = pickle.loads(pickle.dumps(logger))
    assert clone._client is None and clone.run_id == logger.run_id
    logger.finalize("failed")
    run = MlflowClient(uri).get_run(logger.run_id)
    assert run.info.status == "FAILED"
    assert [m.step for m in MlflowClient(uri).get_metric_history(logger.run_id, "a")] == [7]
    assert not (tmp_path / "run" / "mlflow.db").exists()


def test_mlflow_remote_run_dir_needs_a_tracking_uri(clean_env, mlflow_local):
    logger = MLflowLogger()
    logger.setup("s3://bucket/run")
    with pytest.raises(ValueError, match="tracking_uri="):
        logger.log_metrics({"a": 1.0}, step=1)


# ---------------------------------------------------------------- no credentials (issue #8)

ENV_SECRET, LITERAL_SECRET = "hf_SECRET-env-3e1a", "SECRET-literal-8c2d"
SECRET_HPARAMS = {"lr": 0.1, "note": ENV_SECRET, "hub": {"repo": "me/m", "token": LITERAL_SECRET}}


def _files_holding(root, needles) -> list[str]:
    hits = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                data = f.read()
            hits += [name for n in needles if n.encode() in data or n.encode("utf-16-le") in data]
    return hits


def test_wandb_config_holds_no_secret(tmp_path, wandb_offline, clean_env):
    """Secret hparams (by env value and by key) and a secret in config.yaml reach W&B's config as
    "<redacted>", keys kept; no file W&B wrote holds them. The canary lr does reach it."""
    clean_env["HF_TOKEN"] = ENV_SECRET
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"password": LITERAL_SECRET}}}))
    logger = WandbLogger(project="p")
    logger.setup(str(run_dir))
    logger.log_hyperparams(SECRET_HPARAMS)
    logger.finalize("success")

    [run] = _offline_runs(run_dir)
    assert run["config"]["note"] == "<redacted>" and run["config"]["lr"] == 0.1
    assert run["config"]["hub"] == {"repo": "me/m", "token": "<redacted>"}
    assert run["config"]["resolved_config"] == {"model": {"init_args": {"password": "<redacted>"}}}
    assert _files_holding(run_dir / "wandb", [ENV_SECRET, LITERAL_SECRET]) == []
    assert _files_holding(run_dir / "wandb", ["me/m"])  # control: the scan reads W&B's files


def test_mlflow_params_hold_no_secret(tmp_path, mlflow_local, clean_env):
    from mlflow.tracking import MlflowClient

    clean_env["HF_TOKEN"] = ENV_SECRET
    logger = MLflowLogger()
    logger.setup(str(tmp_path / "run"))
    logger.log_hyperparams(SECRET_HPARAMS)
    logger.finalize("success")
    run = MlflowClient(f"sqlite:///{tmp_path}/run/mlflow.db").get_run(logger.run_id)
    assert run.data.params == {"lr": "0.1", "note": "<redacted>", "hub/repo": "me/m", "hub/token": "<redacted>"}
    assert _files_holding(tmp_path / "run", [ENV_SECRET, LITERAL_SECRET]) == []
    assert _files_holding(tmp_path / "run", ["me/m"])  # control: the scan reads MLflow's store


# ---------------------------------------------------------------- missing packages

@pytest.mark.parametrize("make,modules,extra", [
    (lambda: WandbLogger(), ["wandb"], "raytrainer[wandb]"),
    (lambda: MLflowLogger(), ["mlflow", "mlflow.tracking"], "raytrainer[mlflow]"),
])
def test_missing_package_names_the_extra(tmp_path, monkeypatch, clean_env, make, modules, extra):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    logger = make()
    logger.setup(str(tmp_path / "run"))
    with pytest.raises(ImportError, match=extra.replace("[", r"\[").replace("]", r"\]")):
        logger.log_metrics({"a": 1.0}, step=1)
