"""W&B and MLflow loggers, offline: what they wrote is read back by the real formats' readers.

W&B runs in offline mode and writes its transaction log (``run-<id>.wandb``: LevelDB-log framed,
CRC-checked protobuf ``Record``s), which ``wandb_files.py`` parses with wandb's own protobuf classes
(wandb >= 0.2x ships no Python reader). MLflow writes a local sqlite store read back with
``MlflowClient``. No network: W&B's service is a local process, and every wait is bounded by the
timeout below.
"""
from __future__ import annotations

import glob
import os
import pickle
import sys
import tempfile

import pytest
import yaml

import raytrainer as rt
from raytrainer.checkpoint import store as ckpt_io
from raytrainer.loggers import MLflowLogger, WandbLogger

from helpers import LinearModel, loader, make_trainer
from wandb_files import offline_runs, series, wandb_records

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
    assert "step=000000004.ckpt" in last
    assert ckpt_io.load(last)["loggers"] == [{"wandb_run_id": wb.run_id},
                                             {"mlflow_run_id": ml.run_id}]

    # A new process would build new loggers: they must find the runs through the checkpoint.
    wb2, ml2 = WandbLogger(project="rt-test", log_checkpoints=True), MLflowLogger(experiment_name="exp")
    assert (wb2.run_id, ml2.run_id) != (wb.run_id, ml.run_id)
    result = _fit(tmp_path, [wb2, ml2], ckpt_path="last")
    assert result.global_step == 8
    assert (wb2.run_id, ml2.run_id) == (wb.run_id, ml.run_id)

    # W&B: one run id in both offline folders (under the run dir), the crash exiting 1.
    first, second = offline_runs(run_dir)
    assert first["id"] == second["id"] == wb.run_id
    assert (first["exit_code"], second["exit_code"]) == (1, 0)
    crashed, resumed = series(first["history"], "train_loss"), series(second["history"], "train_loss")
    assert [s for s, _ in crashed] == [0, 1, 2, 3, 4]  # Lightning's numbering: the steps before
    assert [s for s, _ in resumed] == [4, 5, 6, 7]  # continues after the step-4 checkpoint
    assert resumed[0][1] == pytest.approx(crashed[-1][1], abs=0)  # step 5 again, same loss
    for run in (first, second):
        assert [r["_step"] for r in run["history"]] == list(range(len(run["history"])))
        assert run["config"]["lr"] == 0.1
        assert run["config"]["opt"] == {"name": "sgd", "nesterov": False}
    # log_checkpoints: the newest committed checkpoint, as an artifact, when the run finished
    [(name, kind, paths)] = second["artifacts"]
    assert (name, kind) == (f"model-{wb.run_id}", "model")
    assert set(paths) == {"model.ckpt"}  # the checkpoint file, named as Lightning's WandbLogger names it

    # MLflow: one run in the experiment, FINISHED, every step logged by either attempt.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(ml.tracking_uri)
    assert ml.tracking_uri == f"sqlite:///{run_dir}/mlflow.db"
    exp = client.get_experiment_by_name("exp")
    [run] = client.search_runs([exp.experiment_id])
    assert run.info.run_id == ml.run_id and run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(ml.run_id, "train_loss"))
    assert steps == [0, 1, 2, 3, 4, 4, 5, 6, 7]
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

    [run] = offline_runs(run_dir)
    assert run["id"] == logger.run_id and run["exit_code"] == 0
    assert series(run["history"], "train_loss") == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert series(run["history"], "val_loss") == [(3, 0.5)]
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
    [run] = offline_runs(local)
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

    [run] = offline_runs(run_dir)
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


# ---------------------------------------------------------------- runs of other runs, sweep trials

def test_a_checkpoint_of_another_run_brings_its_weights_not_its_logger_runs(tmp_path, wandb_offline,
                                                                            mlflow_local):
    """Fine-tuning from run a's checkpoint (or a PBT trial taking a donor's) starts run b's own
    W&B and MLflow runs: b never writes into a's."""
    def fit(name, loggers, ckpt_path=None):
        trainer = make_trainer(tmp_path, name=name, max_steps=4 if ckpt_path is None else 6,
                               max_epochs=2, log_every_n_steps=1, logger=loggers, enable_checkpointing=True,
                               callbacks=[rt.callbacks.ModelCheckpoint(every_n_train_steps=2, save_top_k=-1)])
        trainer.fit(Net(), loader(n=16, batch_size=4), ckpt_path=ckpt_path)
        return ckpt_io.latest_committed(trainer.cfg)

    wb_a, ml_a = WandbLogger(project="p"), MLflowLogger(experiment_name="exp")
    donor = fit("a", [wb_a, ml_a])
    wb_b, ml_b = WandbLogger(project="p"), MLflowLogger(experiment_name="exp")
    own_id = wb_b.run_id
    last_b = fit("b", [wb_b, ml_b], ckpt_path=donor)
    assert ckpt_io.load(last_b)["global_step"] == 6  # the donor's 4 steps were continued
    assert wb_b.run_id == own_id != wb_a.run_id and ml_b.run_id != ml_a.run_id
    assert ckpt_io.load(last_b)["loggers"] == [{"wandb_run_id": wb_b.run_id}, {"mlflow_run_id": ml_b.run_id}]
    [run_a] = offline_runs(tmp_path / "a")
    [run_b] = offline_runs(tmp_path / "b")
    assert (run_a["id"], run_b["id"]) == (wb_a.run_id, wb_b.run_id)
    assert [s for s, _ in series(run_b["history"], "train_loss")] == [4, 5]

    from mlflow.tracking import MlflowClient
    steps = {}
    for name, logger in (("a", ml_a), ("b", ml_b)):
        client = MlflowClient(f"sqlite:///{tmp_path / name}/mlflow.db")
        [run] = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
        assert run.info.run_id == logger.run_id
        steps[name] = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert steps == {"a": [0, 1, 2, 3], "b": [4, 5]}


def test_each_sweep_trial_gets_its_own_run_grouped_under_the_sweep(tmp_path, wandb_offline, mlflow_local):
    """join_sweep, as each trial calls it on its copy of the user's loggers: distinct W&B runs in
    the sweep's group, one MLflow store for the sweep with a run per trial, and a restarted trial
    (before its first checkpoint) back in its own run."""
    import copy

    from mlflow.tracking import MlflowClient

    sweep_dir = str(tmp_path / "lr-sweep")
    user_wb, user_ml = WandbLogger(project="p"), MLflowLogger(experiment_name="exp")
    trials = ["trial_x_00000", "trial_x_00001", "trial_x_00000"]  # the third: trial 0 restarted
    seen = []
    for step, trial in enumerate(trials, start=1):
        wb, ml = copy.deepcopy(user_wb), copy.deepcopy(user_ml)
        for lg in (wb, ml):
            lg.join_sweep(sweep_dir, trial)
            lg.setup(f"{sweep_dir}/{trial}")
            lg.log_metrics({"val_loss": 1.0 / step}, step=step)
            lg.finalize("success")
        seen.append((wb.run_id, ml.run_id))
    assert seen[0] == seen[2] and seen[0][0] != seen[1][0] and seen[0][1] != seen[1][1]

    runs = [r for t in ("trial_x_00000", "trial_x_00001") for r in offline_runs(f"{sweep_dir}/{t}")]
    assert [r["id"] for r in runs] == [seen[0][0], seen[0][0], seen[1][0]]
    groups = {(rec.run.run_group, rec.run.display_name) for t in ("trial_x_00000", "trial_x_00001")
              for f in glob.glob(f"{sweep_dir}/{t}/wandb/offline-run-*/run-*.wandb")
              for rec in wandb_records(f) if rec.WhichOneof("record_type") == "run"}
    assert groups == {("lr-sweep", "trial_x_00000"), ("lr-sweep", "trial_x_00001")}

    client = MlflowClient(f"sqlite:///{sweep_dir}/mlflow.db")  # one store for the whole sweep
    found = client.search_runs([client.get_experiment_by_name("exp").experiment_id],
                               filter_string="tags.`raytrainer.sweep` = 'lr-sweep'", order_by=["attributes.run_name"])
    assert [(r.info.run_name, r.info.run_id) for r in found] == [("trial_x_00000", seen[0][1]),
                                                                 ("trial_x_00001", seen[1][1])]
    assert [m.step for m in client.get_metric_history(seen[0][1], "val_loss")] == [1, 3]

    # A fixed id cannot name several trials: refused by rt.sweep before Ray is touched.
    trainer = make_trainer(tmp_path, name="fixed", logger=[WandbLogger(id="fixed123")])
    with pytest.raises(ValueError, match="every trial into one W&B run"):
        rt.sweep(Net, None, trainer, search_space={"lr": 0.1}, metric="val_loss")
