"""Security: no credentials in anything a run writes or prints, and no code run from a config.

The other security checks live next to the code they test:

- a malicious pickle in a checkpoint is refused (``weights_only=True``), with a control showing the
  payload is live: tests/test_checkpoint_integrity.py::test_malicious_pickle_with_valid_hash_is_refused,
  ::test_payload_would_execute_without_weights_only
- the bucket of an S3 run holds no credentials (env and ``storage_options``), with a control that
  catches a planted leak: tests/test_s3_storage.py::test_bucket_holds_no_credentials,
  ::test_storage_options_credentials_are_not_written, ::test_secret_scan_detects_a_leak
- ``--print_config`` leaves ``storage_options`` out: tests/test_cli.py::
  test_print_config_round_trips_and_writes_nothing; secret-looking values are ``<redacted>`` in it
  and in the W&B config and MLflow params: below and tests/test_wandb_mlflow.py::
  test_wandb_config_holds_no_secret, ::test_mlflow_params_hold_no_secret
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
from raytrainer.checkpoint import store as ckpt_io
from raytrainer.cli import main as cli
from raytrainer.redaction import MARKER

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
    is in any file the run wrote (checkpoint files, metrics.csv, event files, hparams.yaml,
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
    assert {"metrics", "hparams", "config", "events"} <= names and any(n.endswith(".ckpt") for n in files)
    secrets = [*ENV_SECRETS.values(), *OPTION_SECRETS.values()]
    assert _leaks(files, secrets) == {}
    assert _leaks({"stdout": printed.out.encode(), "stderr": printed.err.encode()}, secrets) == {}
    # The control: the canary reached hparams.yaml (both loggers), the event files and checkpoints.
    canary_in = _leaks(files, [CANARY])[CANARY]
    assert any(n.endswith("tensorboard/hparams.yaml") for n in canary_in)
    assert any(n.endswith("csv/hparams.yaml") for n in canary_in)
    assert any("tfevents" in n for n in canary_in) and any(n.endswith(".ckpt") for n in canary_in)

    saved = yaml.safe_load(next(v for k, v in files.items() if k.endswith("leakcheck/config.yaml")))
    assert "storage_options" not in saved["trainer"] and saved["model"]["init_args"]["note"] == CANARY
    last = ckpt_io.latest_committed(f"{storage_path}/leakcheck/checkpoints", OPTION_SECRETS)
    state = rt.load_checkpoint(last, OPTION_SECRETS)
    assert state["hyper_parameters"] == {"note": CANARY, "lr": 0.1, "hidden": 4, "seed": 0}
    flat = repr({k: v for k, v in state.items() if k not in ("state_dict", "rank_states")})
    assert not [s for s in secrets if s in flat]


LITERAL_KEY = "sk-literal-0d9c41"  # in no environment variable: caught by its hparam's name alone


class SecretRegressor(TinyRegressor):
    """A user mistake: credentials as hyperparameters, one read from the environment (under an
    innocent name), one under a secret-looking name; plus a canary that must be written."""

    def __init__(self, note: str = "", api_key: str = "", canary: str = CANARY, lr: float = 0.1):
        super().__init__(lr=lr)
        self.save_hyperparameters()


def _fit_with_secret_hparams(tmp_path):
    from cli_models import TinyData

    trainer = rt.Trainer(launcher="local", accelerator="cpu", max_epochs=1, enable_progress_bar=False,
                         log_every_n_steps=1, storage_path=str(tmp_path / "runs"), name="leaky")
    model = SecretRegressor(note=os.environ["AWS_SECRET_ACCESS_KEY"], api_key=LITERAL_KEY)
    result = trainer.fit(model, datamodule=TinyData(n=8))
    files = _files_under(tmp_path / "runs")
    names = {name.rsplit("/", 1)[-1].split(".")[0] for name in files}
    assert {"hparams", "events", "metrics"} <= names and any(n.endswith(".ckpt") for n in files)
    return model, result, files


def _written_by_every_writer(found: list[str]) -> None:
    for where in ("tensorboard/hparams.yaml", "csv/hparams.yaml", ".ckpt"):
        assert any(n.endswith(where) for n in found), (where, found)
    assert any("tfevents" in n for n in found), found


def test_a_secret_hyperparameter_is_redacted_everywhere_the_run_writes(tmp_path, monkeypatch, capfd):
    """Secrets passed as hparams reach no file the run wrote (checkpoint, both hparams.yaml, event
    files, metrics.csv) nor stdout/stderr: each key is kept with "<redacted>", one warning names
    the keys (never the values) and the fix. The canary hparam is found in every one of those
    files, so the scan reads where a leak would land."""
    secret = ENV_SECRETS["AWS_SECRET_ACCESS_KEY"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with pytest.warns(UserWarning, match="look like credentials") as record:
        model, result, files = _fit_with_secret_hparams(tmp_path)
    printed = capfd.readouterr()

    assert _leaks(files, [secret, LITERAL_KEY]) == {}
    assert _leaks({"stdout": printed.out.encode(), "stderr": printed.err.encode()}, [secret, LITERAL_KEY]) == {}
    _written_by_every_writer(_leaks(files, [CANARY])[CANARY])

    expected = {"note": MARKER, "api_key": MARKER, "canary": CANARY, "lr": 0.1, "hidden": 4, "seed": 0}
    for name in ("leaky/tensorboard/hparams.yaml", "leaky/csv/hparams.yaml"):  # with the datamodule's (Lightning)
        assert yaml.safe_load(files[name]) == {**expected, "batch_size": 4, "n": 8}
    assert rt.load_checkpoint(result.last_checkpoint)["hyper_parameters"] == expected
    assert (model.hparams.note, model.hparams.api_key) == (secret, LITERAL_KEY)  # the module keeps its own

    [warning] = [w for w in record if "look like credentials" in str(w.message)]
    message = str(warning.message)
    assert "'note'" in message and "'api_key'" in message and "'canary'" not in message
    assert "environment" in message and "save_hyperparameters(ignore=[...])" in message
    assert secret not in message and LITERAL_KEY not in message


def test_the_secret_scan_finds_a_planted_secret(tmp_path, monkeypatch):
    """Control for the scans above: with redaction switched off, the same fit leaks both secrets
    into the checkpoint, both hparams.yaml and the event file, and the scan says so."""
    from raytrainer import redaction

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRETS["AWS_SECRET_ACCESS_KEY"])
    monkeypatch.setattr(redaction, "redact_with_paths", lambda value, also=(), environ=None: (value, []))
    _, _, files = _fit_with_secret_hparams(tmp_path)
    leaked = _leaks(files, [ENV_SECRETS["AWS_SECRET_ACCESS_KEY"], LITERAL_KEY])
    assert set(leaked) == {ENV_SECRETS["AWS_SECRET_ACCESS_KEY"], LITERAL_KEY}
    for found in leaked.values():
        _written_by_every_writer(found)


def test_secret_hparams_found_by_the_launcher_stay_redacted_without_its_environment(monkeypatch):
    """A Ray worker may not have the driver's environment: the paths found where fit() was called
    travel with the (pickled) module, so the worker redacts them too."""
    import pickle

    from raytrainer import redaction

    secret = ENV_SECRETS["WANDB_API_KEY"]
    monkeypatch.setenv("WANDB_API_KEY", secret)
    model = SecretRegressor(note=secret)
    with pytest.warns(UserWarning, match=r"SecretRegressor hyperparameter\(s\) 'note' look like"):
        assert redaction.mark_secret_hparams(model) == [("note",)]
    monkeypatch.delenv("WANDB_API_KEY")
    worker_copy = pickle.loads(pickle.dumps(model))
    assert redaction.module_hparams(worker_copy)["note"] == MARKER
    assert worker_copy.hparams.note == secret


def test_cli_config_keeps_secret_keys_as_the_marker_and_refuses_it_back(tmp_path, monkeypatch, capsys):
    """config.yaml / --print_config show a secret init arg as "<redacted>" (the key stays); fed
    back, the marker is refused, naming the key and where it came from, before anything runs."""
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET-token-2b7f")
    config = {"model": {"class_path": "test_security.SecretRegressor",
                        "init_args": {"note": "hf_SECRET-token-2b7f", "api_key": LITERAL_KEY}},
              "trainer": {"launcher": "local", "storage_path": str(tmp_path / "runs")}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["fit", "--config", str(path), "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "hf_SECRET" not in out and LITERAL_KEY not in out
    printed = yaml.safe_load(out)
    assert printed["model"]["init_args"] == {"note": MARKER, "api_key": MARKER}
    again = tmp_path / "printed.yaml"
    again.write_text(out)
    assert cli.main(["fit", "--config", str(again)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"raytrainer: error: {again}: model.init_args.api_key: is '<redacted>' "
                          "(so is model.init_args.note): raytrainer writes credentials that way")
    assert "environment" in err
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- what counts as a secret

SECRET_KEYS = ["password", "db_password", "PASSWD", "passphrase", "secret", "client_secret", "secrets",
               "api_key", "apiKey", "APIKEY", "x-api-key", "openai_api_key", "aws_secret_access_key",
               "AWS_ACCESS_KEY_ID", "secret_key", "private_key", "credentials", "credential", "auth",
               "authorization", "token", "hf_token", "auth_token", "access_token", "session_token",
               "bot_token", "refresh_token", "cookie", "model.init_args.api_key", "opt/password"]
# Near misses: one character or one word away, and ordinary ML hyperparameters.
NOT_SECRET_KEYS = ["max_tokens", "num_tokens", "tokens", "tokenizer", "tokenizer_name", "token_budget",
                   "pad_token", "eos_token", "bos_token", "unk_token", "mask_token", "pad_token_id",
                   "max_token", "key", "sort_key", "keyboard", "monkey", "author", "authority", "passes",
                   "password_length", "api_key_env", "secretary", "credentials_file", "access_key_rotation",
                   "lr", "tokens_per_batch", "model.init_args.tokenizer", "PATH", "PWD", "SSH_AUTH_SOCK",
                   "AWS_SHARED_CREDENTIALS_FILE"]


@pytest.mark.parametrize("name", SECRET_KEYS)
def test_secret_looking_keys(name):
    from raytrainer.redaction import is_secret_key
    assert is_secret_key(name)


@pytest.mark.parametrize("name", NOT_SECRET_KEYS)
def test_near_misses_are_not_secret_keys(name):
    from raytrainer.redaction import is_secret_key
    assert not is_secret_key(name)


def test_secret_environment_variable_names_and_values():
    """Env names are read more widely (FOO_KEY, FOO_PAT); values shorter than 8 characters are
    ignored, so ``AWS_PROFILE=dev``-sized values never redact ordinary hparams."""
    from raytrainer.redaction import is_secret_env_name, secret_values

    for name in ("WANDB_API_KEY", "HF_TOKEN", "AWS_SESSION_TOKEN", "DB_PASSWORD", "STRIPE_KEY", "GH_PAT"):
        assert is_secret_env_name(name), name
    for name in ("PATH", "HOME", "PWD", "SSH_AUTH_SOCK", "TOKENIZERS_PARALLELISM", "AWS_DEFAULT_REGION"):
        assert not is_secret_env_name(name), name
    env = {"HF_TOKEN": "hf_0123456789", "DB_PASSWORD": "short", "HOME": "/home/someone-long",
           "STRIPE_KEY": "sk_live_abcdef"}
    assert secret_values(env) == ["sk_live_abcdef", "hf_0123456789"]


def test_redact_nested_values_keeps_keys_and_structure():
    from raytrainer.redaction import redact, redact_with_paths

    env = {"HF_TOKEN": "hf_0123456789", "DB_PASSWORD": "short", "HOME": "/home/someone-long"}
    params = {"lr": 0.1, "use_auth": True, "password": None, "token": "", "home": "/home/someone-long",
              "db": {"password": "short", "host": "db.local", "port": 5432},
              "hub": {"repo": "me/model", "url": "https://user:hf_0123456789@hf.co/me"},
              "tries": [1, "hf_0123456789", ("keep", {"api_key": 42})], "tup": ("a", "b"),
              "credentials": {"user": "me", "key": "k"}, "tokenizer": "bert-base", "max_tokens": 512}
    before = repr(params)
    out, paths = redact_with_paths(params, environ=env)
    assert out == {"lr": 0.1, "use_auth": True, "password": None, "token": "", "home": "/home/someone-long",
                   "db": {"password": MARKER, "host": "db.local", "port": 5432},
                   "hub": {"repo": "me/model", "url": MARKER},
                   "tries": [1, MARKER, ("keep", {"api_key": MARKER})], "tup": ("a", "b"),
                   "credentials": MARKER, "tokenizer": "bert-base", "max_tokens": 512}
    assert paths == [("db", "password"), ("hub", "url"), ("tries", 1), ("tries", 2, 1, "api_key"),
                     ("credentials",)]
    assert repr(params) == before  # a copy: the caller's values are untouched
    assert redact(out, environ=env) == out  # idempotent: the marker is not reported again
    assert redact_with_paths(out, environ=env)[1] == []
    # paths given by the caller are redacted whatever the environment
    assert redact({"note": "x", "n": [1, 2]}, also=[("note",), ("n", 1)], environ={}) == {"note": MARKER, "n": [1, MARKER]}


def test_an_object_hparam_is_redacted_by_the_text_it_would_be_written_as():
    """Checkpoints store repr() and loggers str() of other objects: a dataclass holding a token."""
    import dataclasses

    from raytrainer.redaction import redact

    @dataclasses.dataclass
    class Hub:
        repo: str
        token: str

    assert redact({"hub": Hub("me/model", "hf_0123456789"), "n": 3}, environ={"HF_TOKEN": "hf_0123456789"}) \
        == {"hub": MARKER, "n": 3}


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


def test_a_datamodules_secret_hparam_is_redacted_where_the_environment_lacks_it(monkeypatch):
    """The datamodule's hparams are logged with the module's (Lightning's merge): the paths of
    secrets found on the driver travel with it, so a Ray worker without the variable redacts them."""
    import warnings as _warnings

    from raytrainer import redaction
    secret = ENV_SECRETS["AWS_SECRET_ACCESS_KEY"]

    class Data(rt.DataModule):
        def __init__(self, source: str = "", batch_size: int = 4):
            super().__init__()
            self.save_hyperparameters()

    data, model = Data(source=secret), SecretRegressor()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with _warnings.catch_warnings(record=True):
        _warnings.simplefilter("always")
        redaction.mark_secret_hparams(model)
        redaction.mark_secret_hparams(data)  # on the driver (runtime/preflight.py)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")  # a worker's environment
    logged = redaction.run_hparams(model, data)
    assert logged["source"] == redaction.MARKER and logged["batch_size"] == 4
    assert data.hparams.source == secret  # the datamodule keeps its own
