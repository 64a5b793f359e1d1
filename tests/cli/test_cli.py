"""The `raytrainer` CLI, in process (launcher local): config merging, overrides, --print_config,
errors that name the key and the file, and fit/validate/test/predict end to end."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import yaml

import raytrainer as rt
from raytrainer.cli import main as cli
from raytrainer.cli.sweep import ModuleFactory

REPO = pathlib.Path(__file__).resolve().parents[2]

TINY = """
model:
  class_path: cli_models.TinyRegressor
  init_args: {{lr: 0.1, hidden: 4}}
data:
  class_path: cli_models.TinyData
  init_args: {{n: 16, batch_size: 4}}
trainer:
  launcher: local
  accelerator: cpu
  max_epochs: 1
  enable_progress_bar: false
  logger: false
  storage_path: {storage}
  name: run
"""


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() may add the working directory


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def tiny(tmp_path, name: str = "run.yaml") -> str:
    return write(tmp_path, name, TINY.format(storage=tmp_path / "runs"))


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def printed(capsys, *argv) -> dict:
    code, out, err = run(capsys, *argv, "--print_config")
    assert code == 0, err
    return yaml.safe_load(out)


# ---------------------------------------------------------------- merging and overrides

def test_later_file_wins_and_mappings_merge_deeply(tmp_path):
    base = tiny(tmp_path)
    over = write(tmp_path, "over.yaml", "trainer: {max_epochs: 3}\nmodel: {init_args: {hidden: 8}}\n")
    config, origins = cli.load_config([base, over])
    assert config["trainer"]["max_epochs"] == 3
    assert config["trainer"]["launcher"] == "local" and config["trainer"]["name"] == "run"
    assert config["model"] == {"class_path": "cli_models.TinyRegressor", "init_args": {"lr": 0.1, "hidden": 8}}
    assert origins.of(("trainer", "max_epochs")) == over
    assert origins.of(("trainer", "launcher")) == base
    assert origins.of(("model", "init_args", "lr")) == base


def test_lists_are_replaced_and_a_new_class_path_drops_old_init_args(tmp_path):
    base = write(tmp_path, "a.yaml", "model: {class_path: cli_models.TinyRegressor, init_args: {hidden: 8}}\n"
                                     "trainer: {callbacks: [{class_path: EarlyStopping, init_args: {monitor: a}}]}\n")
    over = write(tmp_path, "b.yaml", "model: {class_path: cli_models.NeedsWidth, init_args: {width: 3}}\n"
                                     "trainer: {callbacks: [{class_path: LearningRateMonitor}]}\n")
    config, _ = cli.load_config([base, over])
    assert config["model"] == {"class_path": "cli_models.NeedsWidth", "init_args": {"width": 3}}
    assert config["trainer"]["callbacks"] == [{"class_path": "LearningRateMonitor"}]


def test_overrides_are_parsed_as_yaml_values(tmp_path, capsys):
    resolved = printed(
        capsys, "fit", "--config", tiny(tmp_path), "--trainer.max_epochs", "3", "--model.init_args.lr", "0.5",
        "--trainer.enable_progress_bar", "false", "--trainer.limit_train_batches=0.5", "--model.hidden", "8",
        "--data.init_args.batch_size", "2", "--trainer.name=other", "--ckpt_path", "last",
        "--trainer.callbacks", "[{class_path: EarlyStopping, init_args: {monitor: val_loss, patience: 2}}]")
    trainer = resolved["trainer"]
    assert trainer["max_epochs"] == 3 and type(trainer["max_epochs"]) is int
    assert trainer["enable_progress_bar"] is False
    assert trainer["limit_train_batches"] == 0.5
    assert trainer["name"] == "other"
    assert trainer["callbacks"] == [{"class_path": "EarlyStopping", "init_args": {"monitor": "val_loss", "patience": 2}}]
    assert resolved["model"]["init_args"] == {"lr": 0.5, "hidden": 8}
    assert resolved["data"]["init_args"] == {"n": 16, "batch_size": 2}
    assert resolved["ckpt_path"] == "last"


def test_scientific_notation_becomes_a_float_only_where_a_float_is_taken(tmp_path, capsys):
    cfg = write(tmp_path, "sci.yaml", TINY.format(storage=tmp_path) + "  gradient_clip_val: 1e-1\n")
    resolved = printed(capsys, "fit", "--config", cfg, "--model.init_args.lr", "1e-3", "--trainer.name", "1e5")
    assert resolved["model"]["init_args"]["lr"] == pytest.approx(1e-3)
    assert resolved["trainer"]["gradient_clip_val"] == pytest.approx(0.1)
    assert resolved["trainer"]["name"] == "1e5"  # a str argument keeps the string


def test_print_config_round_trips_and_writes_nothing(tmp_path, capsys):
    cfg = write(tmp_path, "run.yaml", TINY.format(storage=tmp_path / "runs")
                + "  storage_options: {key: AKIA-not-real, secret: hunter2}\n")
    code, out, err = run(capsys, "fit", "--config", cfg, "--print_config")
    assert code == 0, err
    resolved = yaml.safe_load(out)
    expected = yaml.safe_load(TINY.format(storage=tmp_path / "runs"))
    assert resolved == expected
    assert "storage_options" not in out and "hunter2" not in out and "AKIA" not in out
    assert not (tmp_path / "runs").exists()
    again = write(tmp_path, "printed.yaml", out)
    assert printed(capsys, "fit", "--config", again) == resolved


# ---------------------------------------------------------------- errors name the key and the place

ERRORS = {
    "unknown top-level key": ("modle: {class_path: x.Y}\n", [], ["bad.yaml", "modle", "unknown top-level key",
                                                                "model, data, trainer"]),
    "unknown Trainer argument": ("trainer: {max_epoch: 3}\n", [], ["bad.yaml", "trainer.max_epoch",
                                 "unknown Trainer argument 'max_epoch'", "max_epochs", "storage_path"]),
    "module does not import": ("model: {class_path: cli_modelz.TinyRegressor}\n", [],
                               ["bad.yaml", "model.class_path", "cannot import module 'cli_modelz'"]),
    "attribute missing": ("model: {class_path: cli_models.Nope}\n", [],
                          ["bad.yaml", "model.class_path", "module 'cli_models' has no attribute 'Nope'"]),
    "not a Module": ("model: {class_path: cli_models.TinyData}\n", [],
                     ["model.class_path", "not a subclass of raytrainer.module.Module"]),
    "not a class": ("model: {class_path: cli_models.NOT_A_CLASS}\n", [], ["model.class_path", "not a subclass"]),
    "short model name": ("model: {class_path: TinyRegressor}\n", [], ["model.class_path", "needs its module"]),
    "extra class key": ("model: {class_path: cli_models.TinyRegressor, args: {}}\n", [],
                        ["bad.yaml", "model.args", "class_path and init_args"]),
    "init_args not accepted": ("model: {class_path: cli_models.TinyRegressor, init_args: {lrr: 1, hiden: 2}}\n", [],
                               ["bad.yaml", "model.init_args.lrr", "TinyRegressor does not accept 'lrr', 'hiden'",
                                "it accepts: lr, hidden, seed"]),
    "init_args required": ("model: {class_path: cli_models.NeedsWidth}\n", [],
                           ["bad.yaml", "model.init_args", "NeedsWidth requires width"]),
    "init raises": ("model: {class_path: cli_models.RejectsWidth, init_args: {width: 0}}\n", [],
                    ["bad.yaml", "model:", "RejectsWidth(**init_args) raised ValueError: width must be >= 1, got 0"]),
    "data init_args": ("data: {class_path: cli_models.TinyData, init_args: {size: 3}}\n", [],
                       ["bad.yaml", "data.init_args.size", "TinyData does not accept 'size'"]),
    "Trainer type in file": ("trainer: {max_epochs: three}\n", [],
                             ["bad.yaml: trainer.max_epochs: Trainer(max_epochs='three') is invalid"]),
    "Trainer type on command line": ("", ["--trainer.max_epochs", "1.5"],
                                     ["command line (--trainer.max_epochs): trainer.max_epochs: "
                                      "Trainer(max_epochs=1.5) is invalid"]),
    "Trainer choice": ("trainer: {accelerator: tpu}\n", [], ["bad.yaml: trainer.accelerator", "'cpu', 'gpu', 'auto'"]),
    "callback short name": ("trainer: {callbacks: [{class_path: ModelCheckpointt}]}\n", [],
                            ["bad.yaml", "trainer.callbacks[0].class_path", "'raytrainer.callbacks' has no attribute",
                             "ModelCheckpoint"]),
    "callback init_args": ("trainer: {callbacks: [{class_path: LearningRateMonitor},\n"
                           "  {class_path: EarlyStopping, init_args: {monitorr: val_loss}}]}\n", [],
                           ["bad.yaml", "trainer.callbacks[1].init_args.monitorr", "EarlyStopping does not accept"]),
    "callback value": ("trainer: {callbacks: [{class_path: ModelCheckpoint, init_args: {mode: sideways}}]}\n", [],
                       ["bad.yaml", "trainer.callbacks[0]", "mode='sideways'"]),
    "logger init_args": ("trainer: {logger: {class_path: CSVLogger, init_args: {flush_every: 3}}}\n", [],
                         ["bad.yaml", "trainer.logger.init_args.flush_every", "CSVLogger does not accept"]),
    "logger base class": ("trainer: {logger: [{class_path: raytrainer.callbacks.EarlyStopping}]}\n", [],
                          ["trainer.logger[0].class_path", "not a subclass of raytrainer.loggers.base.Logger"]),
    "ckpt_path type": ("ckpt_path: 3\n", [], ["bad.yaml", "ckpt_path", "expected 'last', 'best'"]),
    "override into a scalar": ("", ["--trainer.max_epochs.x", "1"], ["trainer.max_epochs", "cannot set a key"]),
    "override unknown section": ("", ["--traner.max_epochs", "1"],
                                 ["command line (--traner.max_epochs): traner", "unknown top-level key"]),
    "override bad YAML": ("", ["--trainer.callbacks", "[{a"], ["--trainer.callbacks", "not valid YAML"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_name_the_key_and_where_it_was_set(case, tmp_path, capsys):
    text, overrides, expected = ERRORS[case]
    base = tiny(tmp_path)
    bad = write(tmp_path, "bad.yaml", text)
    code, out, err = run(capsys, "fit", "--config", base, "--config", bad, *overrides)
    assert code == 2, (out, err)
    assert err.startswith("raytrainer: error: ")
    for piece in expected:
        assert piece in err, (piece, err)
    assert not (tmp_path / "runs").exists()  # nothing trained or written


@pytest.mark.parametrize("argv, expected", [
    (["fit", "--config", "missing.yaml"], "--config missing.yaml: no such file"),
    (["train", "--config", "x.yaml"], "unknown command 'train'"),
    (["fit"], "needs --config FILE"),
    (["fit", "run.yaml"], "unexpected argument 'run.yaml'"),
    (["fit", "--trainer.max_epochs"], "--trainer.max_epochs needs a value"),
    (["fit", "--trainer..x", "1"], "not a dotted config key"),
])
def test_command_line_errors(argv, expected, capsys):
    code, _, err = run(capsys, *argv)
    assert code == 2 and expected in err, err


def test_bad_yaml_files_are_named(tmp_path, capsys):
    broken = write(tmp_path, "broken.yaml", "trainer: {max_epochs: 1\n")
    code, _, err = run(capsys, "fit", "--config", broken)
    assert code == 2 and "broken.yaml: not valid YAML" in err
    listing = write(tmp_path, "list.yaml", "- model\n")
    code, _, err = run(capsys, "fit", "--config", listing)
    assert code == 2 and "list.yaml: expected a mapping" in err
    code, _, err = run(capsys, "fit", "--config", write(tmp_path, "empty.yaml", ""))
    assert code == 2 and "no model" in err


# ---------------------------------------------------------------- running

def test_fit_writes_checkpoints_and_config_next_to_them(tmp_path, capsys):
    cfg = write(tmp_path, "run.yaml", TINY.format(storage=tmp_path / "runs") + """
  storage_options: {auto_mkdir: true}
  callbacks:
    - class_path: ModelCheckpoint
      init_args: {monitor: val_loss, save_top_k: 1, save_last: true}
  logger:
    - class_path: CSVLogger
""")
    code, out, err = run(capsys, "fit", "--config", cfg, "--trainer.max_epochs", "2")
    assert code == 0, err
    run_dir = tmp_path / "runs" / "run"
    committed = [u.rsplit("/", 1)[1] for u in rt.checkpoint.list_committed(str(run_dir / "checkpoints"))]
    assert committed and committed[-1] == "step=000000008.ckpt"  # 2 epochs x 4 batches
    assert f"config: {run_dir / 'config.yaml'}" in out
    text = (run_dir / "config.yaml").read_text()
    assert "storage_options" not in text and "auto_mkdir" not in text
    saved = yaml.safe_load(text)
    assert saved["trainer"]["max_epochs"] == 2 and saved["trainer"]["name"] == "run"
    assert saved["model"] == {"class_path": "cli_models.TinyRegressor", "init_args": {"lr": 0.1, "hidden": 4}}
    assert saved["trainer"]["callbacks"][0]["class_path"] == "ModelCheckpoint"
    assert (run_dir / "csv" / "metrics.csv").exists()

    # The saved config reruns the same run: validate/test/predict from its last checkpoint.
    saved_cfg = str(run_dir / "config.yaml")
    code, out, err = run(capsys, "test", "--config", saved_cfg, "--ckpt_path", "last")
    assert code == 0 and "test_loss=" in out, err
    code, out, err = run(capsys, "validate", "--config", saved_cfg, "--ckpt_path", "best")
    assert code == 0 and "val_loss=" in out, err
    code, out, err = run(capsys, "predict", "--config", saved_cfg)
    assert code == 0 and "predict finished: 4 batches" in out, err


def test_a_generated_run_name_is_recorded_in_config_yaml(tmp_path, capsys):
    cfg = write(tmp_path, "run.yaml", TINY.format(storage=tmp_path / "runs").replace("  name: run\n", ""))
    code, _, err = run(capsys, "fit", "--config", cfg, "--trainer.enable_checkpointing", "false")
    assert code == 0, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["name"] == run_dir.name


def test_config_yaml_is_written_through_fsspec(capsys, tmp_path):
    import fsspec
    cfg = tiny(tmp_path)
    code, _, err = run(capsys, "fit", "--config", cfg, "--trainer.storage_path", "memory://cli-test/runs",
                       "--trainer.enable_checkpointing", "false")
    assert code == 0, err
    fs = fsspec.filesystem("memory")
    try:
        saved = yaml.safe_load(fs.cat_file("/cli-test/runs/run/config.yaml"))
        assert saved["trainer"]["storage_path"] == "memory://cli-test/runs"
    finally:
        fs.rm("/cli-test", recursive=True)


# ---------------------------------------------------------------- sweep: only the parsed arguments

SWEEP = """
sweep:
  search_space:
    lr: {type: loguniform, lower: 1e-4, upper: 0.1}
    hidden: {type: choice, values: [2, 4, 8]}
    seed: {type: randint, lower: 0, upper: 10}
    trainer.gradient_clip_val: {type: uniform, lower: 0.5, upper: 1.0}
    data.batch_size: {type: grid_search, values: [2, 4]}
  metric: val_loss
  mode: min
  num_samples: 6
  scheduler: asha
  grace_period: 2
  max_concurrent_trials: 1
"""


def _sweep_plan(tmp_path, extra: str = "") -> cli.Plan:
    config, origins = cli.load_config([tiny(tmp_path), write(tmp_path, "sweep.yaml", SWEEP + extra)])
    return cli.prepare("sweep", config, origins)


def test_sweep_section_becomes_rt_sweep_arguments(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform
    kwargs = cli.sweep_kwargs(_sweep_plan(tmp_path, "  max_t: 5\n"))
    assert set(kwargs) == {"module", "data", "trainer", "search_space", "metric", "mode", "num_samples",
                           "scheduler", "grace_period", "max_concurrent_trials", "max_t"}
    assert (kwargs["metric"], kwargs["mode"], kwargs["num_samples"]) == ("val_loss", "min", 6)
    assert (kwargs["scheduler"], kwargs["grace_period"], kwargs["max_concurrent_trials"], kwargs["max_t"]) == \
        ("asha", 2, 1, 5)
    space = kwargs["search_space"]
    assert set(space) == {"lr", "hidden", "seed", "trainer.gradient_clip_val", "data.batch_size"}
    assert space["data.batch_size"] == {"grid_search": [2, 4]}
    assert isinstance(space["trainer.gradient_clip_val"], Float)
    assert isinstance(space["lr"], Float) and isinstance(space["lr"].get_sampler(), LogUniform)
    assert (space["lr"].lower, space["lr"].upper) == (1e-4, 0.1)
    assert isinstance(space["hidden"], Categorical) and space["hidden"].categories == [2, 4, 8]
    assert isinstance(space["seed"], Integer) and (space["seed"].lower, space["seed"].upper) == (0, 10)
    assert isinstance(kwargs["data"], rt.DataModule) and kwargs["data"].hparams.batch_size == 4
    assert isinstance(kwargs["trainer"], rt.Trainer) and kwargs["trainer"].cfg.launcher == "local"
    # The config's fixed init_args under the sampled ones, whichever way the trial calls it.
    factory = kwargs["module"]
    assert isinstance(factory, ModuleFactory)
    by_dict = factory({"lr": 0.01, "hidden": 2, "seed": 1, "trainer.gradient_clip_val": 0.7})
    by_kwargs = factory(lr=0.02, hidden=8, seed=1)
    assert (by_dict.hparams.lr, by_dict.hparams.hidden) == (0.01, 2)
    assert (by_kwargs.hparams.lr, by_kwargs.hparams.hidden) == (0.02, 8)


def test_sweep_without_fixed_init_args_passes_the_class(tmp_path):
    config, origins = cli.load_config([tiny(tmp_path), write(tmp_path, "s.yaml", SWEEP)],
                                      [("model.init_args", "{}")])
    assert cli.sweep_kwargs(cli.prepare("sweep", config, origins))["module"] is \
        __import__("cli_models").TinyRegressor


def test_sweep_command_calls_run_sweep_once_with_the_parsed_arguments(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "run_sweep", lambda kwargs: calls.append(kwargs))
    code, _, err = run(capsys, "sweep", "--config", tiny(tmp_path), "--config", write(tmp_path, "s.yaml", SWEEP),
                       "--sweep.num_samples", "2")
    assert code == 0, err
    (kwargs,) = calls
    assert kwargs["num_samples"] == 2 and "lr" in kwargs["search_space"]
    saved = yaml.safe_load((tmp_path / "runs" / "run" / "config.yaml").read_text())
    assert saved["sweep"]["search_space"]["lr"] == {"type": "loguniform", "lower": 1e-4, "upper": 0.1}


@pytest.mark.parametrize("extra, expected", [
    ("  searchspace: {}\n", ["sweep.searchspace", "unknown sweep argument", "search_space"]),
    ("  search_space: {lr: {type: logarithmic, lower: 1, upper: 2}}\n",
     ["sweep.search_space.lr.type", "unknown search-space type 'logarithmic'", "loguniform"]),
    ("  search_space: {lr: {type: loguniform, lower: 1e-4, upper: 0.1, step: 2}}\n",
     ["sweep.search_space.lr.step", "does not take 'step'"]),
    ("  search_space: {lr: {type: loguniform, lower: small, upper: 0.1}}\n",
     ["sweep.search_space.lr.lower", "expected a number"]),
    ("  search_space: {lr: {type: loguniform, lower: 0, upper: 0.1}}\n", ["sweep.search_space.lr", "loguniform(lower=0"]),
    ("  search_space: {lr: [0.1, 0.2]}\n", ["sweep.search_space.lr", "{type: choice, values: [...]}"]),
    ("  search_space: {hidden: {type: choice, values: []}}\n", ["sweep.search_space.hidden", "non-empty list"]),
    ("  search_space: {width: {type: choice, values: [1]}}\n",
     ["sweep.search_space.width", "TinyRegressor has no init argument 'width'"]),
    ("  search_space: {trainer.max_epoch: {type: choice, values: [1]}}\n",
     ["sweep.search_space.trainer.max_epoch", "Trainer has no init argument 'max_epoch'"]),
    ("  search_space: {data.size: {type: choice, values: [1]}}\n",
     ["sweep.search_space.data.size", "TinyData has no init argument 'size'"]),
    ("  search_space: {optim.lr: {type: choice, values: [1]}}\n", ["sweep.search_space.optim.lr", "trainer.<argument>"]),
    ("  scheduler: {class_path: NoSuchScheduler}\n", ["sweep.scheduler.class_path", "ray.tune.schedulers"]),
    ("  mode: up\n", ["sweep.mode", "'min' or 'max'"]),
    ("  num_samples: 0\n", ["sweep.num_samples", "int >= 1"]),
    ("  scheduler: hyperband\n", ["sweep.scheduler", "asha, pbt, fifo"]),
    ("ckpt_path: last\n", ["ckpt_path", "not used by `raytrainer sweep`"]),
])
def test_sweep_errors_name_the_key(extra, expected, tmp_path):
    with pytest.raises(cli.CLIError) as info:
        _sweep_plan(tmp_path, extra)
    for piece in expected:
        assert piece in str(info.value), (piece, str(info.value))
    assert "sweep.yaml" in str(info.value)


def test_sweep_needs_its_section_and_required_keys(tmp_path):
    config, origins = cli.load_config([tiny(tmp_path)])
    with pytest.raises(cli.CLIError, match="needs a sweep: section"):
        cli.prepare("sweep", config, origins)
    config, origins = cli.load_config([tiny(tmp_path), write(tmp_path, "s.yaml", "sweep: {metric: val_loss}\n")])
    with pytest.raises(cli.CLIError, match=r"s\.yaml: sweep: missing search_space"):
        cli.prepare("sweep", config, origins)


def test_sweep_scheduler_and_search_alg_may_be_tune_classes(tmp_path):
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator
    kwargs = _sweep_plan(tmp_path, "  scheduler: {class_path: FIFOScheduler}\n"
                                   "  search_alg: {class_path: ray.tune.search.BasicVariantGenerator,"
                                   " init_args: {random_state: 0}}\n").sweep
    assert isinstance(kwargs["scheduler"], FIFOScheduler)
    assert isinstance(kwargs["search_alg"], BasicVariantGenerator)


# ---------------------------------------------------------------- the shipped examples

EXAMPLE_COMBINATIONS = [
    ("fit", ["digits.yaml"]),
    ("fit", ["digits.yaml", "digits_local.yaml"]),
    ("fit", ["digits.yaml", "digits_s3.yaml"]),
    ("fit", ["digits.yaml", "multi_worker.yaml"]),
    ("sweep", ["digits.yaml", "digits_sweep.yaml"]),
]


@pytest.mark.parametrize("command, files", EXAMPLE_COMBINATIONS)
def test_example_configs_validate(command, files, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = [command] + [a for f in files for a in ("--config", f"examples/configs/{f}")]
    resolved = printed(capsys, *argv)
    assert resolved["model"]["class_path"] == "examples.digits.DigitsCNN"


def test_digits_example_config_trains_locally(tmp_path, capsys, monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.chdir(REPO)
    code, out, err = run(capsys, "fit", "--config", "examples/configs/digits.yaml", "--config",
                         "examples/configs/digits_local.yaml", "--trainer.max_epochs", "1",
                         "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
                         "--trainer.enable_progress_bar", "false", "--trainer.storage_path", str(tmp_path))
    assert code == 0, err
    assert rt.checkpoint.list_committed(str(tmp_path / "digits-local" / "checkpoints"))
    assert (tmp_path / "digits-local" / "config.yaml").exists()


def test_python_dash_m_raytrainer(tmp_path):
    help_ = subprocess.run([sys.executable, "-m", "raytrainer", "--help"], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    assert help_.returncode == 0, help_.stderr
    assert all(c in help_.stdout for c in ("fit", "validate", "test", "predict", "sweep"))
    bad = subprocess.run([sys.executable, "-m", "raytrainer", "fit", "--config", str(tmp_path / "none.yaml")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "none.yaml: no such file" in bad.stderr
