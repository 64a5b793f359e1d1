"""Security: no credentials in anything a run writes or prints, and no code run from a config.

The other security checks live next to the code they test:

- a malicious pickle in a checkpoint is refused (``weights_only=True``), with a control showing the
  payload is live: tests/test_checkpoint_integrity.py::test_malicious_pickle_with_valid_hash_is_refused,
  ::test_payload_would_execute_without_weights_only
- the bucket of an S3 run holds no credentials (env and ``storage_options``), with a control that
  catches a planted leak: tests/test_s3_storage.py::test_bucket_holds_no_credentials,
  ::test_storage_options_credentials_are_not_written, ::test_secret_scan_detects_a_leak
- ``--print_config`` leaves ``storage_options`` and secret-looking keys out:
  tests/test_cli.py::test_print_config_round_trips_and_writes_nothing
- the Ray dashboard (which also serves the job-submission API) listens on 127.0.0.1 only and the
  KubeRay dashboards are ClusterIP without ingress: tests/test_cluster_files.py::
  test_dashboard_never_listens_on_all_interfaces, ::test_kuberay_dashboards_are_cluster_internal
"""
from __future__ import annotations

import json
import os
import shlex
import sys

import pytest
import torch
import yaml

import raytrainer as rt
from raytrainer import checkpoint as ckpt_io
from raytrainer import cli

from cli_models import TinyRegressor

pytestmark = pytest.mark.timeout(120)

ENV_SECRETS = {"AWS_SECRET_ACCESS_KEY": "SECRET-xyz-env-5f0c", "AWS_SESSION_TOKEN": "SECRET-token-91ab",
               "WANDB_API_KEY": "SECRET-wandb-77de"}
OPTION_SECRETS = {"key": "AKIASECRETKEYID4242", "secret": "SECRET-xyz-options-c3d1"}
CANARY = "canary-hparam-6b2e"  # not a secret: written on purpose, so the scan must find it


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # cli.main may add the working directory


class CanaryRegressor(TinyRegressor):
    """TinyRegressor with a string hyperparameter that must reach hparams.yaml, TensorBoard and the
    checkpoint: proof that the scan reads the places a leak would land."""

    def __init__(self, note: str = "", lr: float = 0.1):
        super().__init__(lr=lr)
        self.save_hyperparameters()


def _leaks(files: dict[str, bytes], needles) -> dict[str, list[str]]:
    """needle -> the files holding it (as UTF-8 or UTF-16 text)."""
    found = {}
    for needle in needles:
        encodings = {needle.encode(), needle.encode("utf-16-le")}
        hits = sorted(name for name, data in files.items() if any(e in data for e in encodings))
        if hits:
            found[needle] = hits
    return found


def _files_under(root) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(params=["local", "s3"])
def run_storage(request, tmp_path):
    """(storage_path, read_all): read_all() returns every file the run wrote, by name."""
    if request.param == "local":
        root = tmp_path / "runs"
        return str(root), lambda: _files_under(root)
    s3_env = request.getfixturevalue("s3_env")
    s3_server = request.getfixturevalue("s3_server")
    bucket = s3_env.removeprefix("s3://").split("/")[0]
    return s3_env, lambda: s3_server.all_objects(bucket)  # the whole bucket, not only the run


def test_no_credentials_in_files_configs_hparams_checkpoints_or_output(run_storage, tmp_path, monkeypatch, capfd):
    """A CLI fit with secrets in the environment and in ``storage_options`` (given in the YAML
    config), default loggers (TensorBoard + CSV), checkpoints, a resume, then validate: no secret
    is in any file the run wrote (checkpoints, COMMIT.json, metrics.csv, event files, hparams.yaml,
    config.yaml) nor in anything printed. The canary hyperparameter is found in the same files."""
    storage_path, read_all = run_storage
    for var, value in ENV_SECRETS.items():
        monkeypatch.setenv(var, value)
    config = {
        "model": {"class_path": "test_security.CanaryRegressor", "init_args": {"note": CANARY}},
        "data": {"class_path": "cli_models.TinyData", "init_args": {"n": 16, "batch_size": 4}},
        "trainer": {"launcher": "local", "accelerator": "cpu", "max_epochs": 2, "enable_progress_bar": False,
                    "log_every_n_steps": 1, "storage_path": storage_path, "name": "leakcheck",
                    "storage_options": dict(OPTION_SECRETS),
                    "callbacks": [{"class_path": "ModelCheckpoint",
                                   "init_args": {"monitor": "val_loss", "save_top_k": 2, "save_last": True}}]},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["fit", "--config", str(path)]) == 0
    assert cli.main(["fit", "--config", str(path), "--trainer.max_epochs", "3", "--ckpt_path", "last"]) == 0
    assert cli.main(["validate", "--config", str(path), "--ckpt_path", "last"]) == 0
    printed = capfd.readouterr()

    files = read_all()
    names = {name.rsplit("/", 1)[-1].split(".")[0] for name in files}
    assert {"model", "state", "rank-00000", "COMMIT", "metrics", "hparams", "config", "events"} <= names
    secrets = [*ENV_SECRETS.values(), *OPTION_SECRETS.values()]
    assert _leaks(files, secrets) == {}
    assert _leaks({"stdout": printed.out.encode(), "stderr": printed.err.encode()}, secrets) == {}
    # The control: the canary reached hparams.yaml (both loggers), the event files and checkpoints.
    canary_in = _leaks(files, [CANARY])[CANARY]
    assert any(n.endswith("tensorboard/hparams.yaml") for n in canary_in)
    assert any(n.endswith("csv/hparams.yaml") for n in canary_in)
    assert any("tfevents" in n for n in canary_in) and any(n.endswith("state.pt") for n in canary_in)

    saved = yaml.safe_load(next(v for k, v in files.items() if k.endswith("leakcheck/config.yaml")))
    assert "storage_options" not in saved["trainer"] and saved["model"]["init_args"]["note"] == CANARY
    last = ckpt_io.latest_committed(f"{storage_path}/leakcheck/checkpoints", OPTION_SECRETS)
    state = rt.load_checkpoint(last, OPTION_SECRETS)
    assert state["hyper_parameters"] == {"note": CANARY, "lr": 0.1, "hidden": 4, "seed": 0}
    flat = repr({k: v for k, v in state.items() if k not in ("state_dict", "rank_states")})
    assert not [s for s in secrets if s in flat]


def test_the_secret_scan_finds_a_planted_secret(tmp_path, monkeypatch):
    """Control for the scan above: the same fit with a secret passed as a hyperparameter is caught."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRETS["AWS_SECRET_ACCESS_KEY"])
    from cli_models import TinyData

    trainer = rt.Trainer(launcher="local", accelerator="cpu", max_epochs=1, enable_progress_bar=False,
                         storage_path=str(tmp_path / "runs"), name="leaky")
    trainer.fit(CanaryRegressor(note=os.environ["AWS_SECRET_ACCESS_KEY"]), datamodule=TinyData(n=8))
    leaked = _leaks(_files_under(tmp_path / "runs"), [ENV_SECRETS["AWS_SECRET_ACCESS_KEY"]])
    assert leaked and any(n.endswith("state.pt") for n in leaked[ENV_SECRETS["AWS_SECRET_ACCESS_KEY"]])


# ---------------------------------------------------------------- YAML: safe loading only

def _payload(marker) -> str:
    return f"!!python/object/apply:os.system [{json.dumps('touch ' + shlex.quote(str(marker)))}]"


def test_payload_would_run_with_an_unsafe_loader(tmp_path):
    """Control: the YAML payload below is live (PyYAML's unsafe loader runs it)."""
    marker = tmp_path / "control-pwned"
    yaml.unsafe_load(f"trainer: {_payload(marker)}\n")
    assert marker.exists()


@pytest.mark.parametrize("where", ["file", "override"])
def test_yaml_tags_that_build_python_objects_are_refused(tmp_path, capsys, where):
    marker = tmp_path / "pwned"
    base = tmp_path / "run.yaml"
    base.write_text("model: {class_path: cli_models.TinyRegressor}\n"
                    f"trainer: {{launcher: local, storage_path: {tmp_path / 'runs'}}}\n")
    if where == "file":
        evil = tmp_path / "evil.yaml"
        evil.write_text(f"trainer:\n  max_epochs: {_payload(marker)}\n")
        argv = ["fit", "--config", str(base), "--config", str(evil)]
        source = str(evil)
    else:
        argv = ["fit", "--config", str(base), "--trainer.max_epochs", _payload(marker)]
        source = "command line (--trainer.max_epochs)"
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"raytrainer: error: {source}")
    assert "python/object/apply:os.system" in err
    assert "tags that build Python objects are refused (configs are read with yaml.safe_load)" in err
    assert "class_path" in err  # the fix: a class is written as class_path + init_args
    assert not marker.exists(), "the YAML payload ran"
    assert not (tmp_path / "runs").exists()


def test_torch_load_in_checkpoints_is_weights_only(tmp_path, monkeypatch):
    """Every checkpoint read goes through torch.load(weights_only=True) (the refusal itself is
    tested with a live payload in test_checkpoint_integrity.py)."""
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    from cli_models import TinyData
    trainer = rt.Trainer(launcher="local", accelerator="cpu", max_epochs=1, enable_progress_bar=False,
                         logger=False, storage_path=str(tmp_path), name="r")
    result = trainer.fit(TinyRegressor(), datamodule=TinyData(n=8))
    monkeypatch.setattr(torch, "load", spy)
    rt.load_checkpoint(result.last_checkpoint)
    trainer.fit(TinyRegressor(), datamodule=TinyData(n=8), ckpt_path="last")
    assert calls and all(c is True for c in calls), calls
