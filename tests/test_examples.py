"""The expected results stated in examples/README.md, checked: each test runs an example the way
the README does (in this process) and asserts the number it promises.

In-process runs (launcher="local") are quick; the Ray ones (``-m ray``, minutes on 2 cores) run
the examples on an embedded Ray with 2 workers.
"""
from __future__ import annotations

import importlib
import pathlib
import re
import sys

import pytest
import torch

import raytrainer as rt

from raytrainer.cli import main as cli

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "configs"


@pytest.fixture(autouse=True)
def _repo_importable(monkeypatch):
    """``examples.*`` imports from the repository root, as when the README's commands run there;
    sys.path is restored after (cli.main may add the working directory too)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.chdir(REPO)


def _example(name: str):
    return importlib.import_module(f"examples.{name}")


def _metric(out: str, prefix: str, key: str) -> float:
    """``key=value`` from the line starting with ``prefix`` (the CLI's summary lines)."""
    lines = [line for line in out.splitlines() if line.startswith(prefix) and f"{key}=" in line]
    assert lines, f"no line starting with {prefix!r} in:\n{out}"
    match = re.search(rf"\b{key}=([0-9.eE+-]+|nan)", lines[-1])
    assert match, f"{key} missing from {lines[-1]!r}"
    return float(match.group(1))


# ---------------------------------------------------------------- digits, in this process

def test_digits_script_local_reaches_the_readme_accuracy(tmp_path, rt_log):
    """README: `python examples/digits.py --launcher local --max-epochs 8`: test_acc >= 0.95."""
    pytest.importorskip("sklearn")
    out = _example("digits").main(["--launcher", "local", "--max-epochs", "8",
                                   "--storage-path", str(tmp_path), "--name", "digits-local"])
    assert "launcher=local" in rt_log.text  # the resolved configuration, logged first
    fit, test = out["fit"], out["test"]
    assert fit.current_epoch == 8
    assert fit.metrics["val_acc"] >= 0.95
    assert test["test_acc"] >= 0.95, test
    assert fit.best_checkpoint and rt.checkpoint.read_marker(fit.best_checkpoint) is not None  # committed


def _cli(capsys, command: str, storage, *extra: str) -> str:
    argv = [command, "--config", str(CONFIGS / "digits.yaml"), "--config", str(CONFIGS / "digits_local.yaml"),
            "--trainer.max_epochs", "8", "--trainer.enable_progress_bar", "false",
            "--trainer.storage_path", str(storage), *extra]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_digits_cli_local_configs_fit_test_and_resume(tmp_path, capsys, rt_log):
    """README (digits_local.yaml): fit reaches val_acc >= 0.95 and `test --ckpt_path best`
    test_acc >= 0.95 (after 8 of the config's 15 epochs already); the run folder holds committed
    checkpoints, tensorboard/, csv/metrics.csv and config.yaml; fitting again resumes and, with
    every epoch done, stops at once."""
    pytest.importorskip("sklearn")
    # The CLI builds the model before Trainer(seed=0) seeds anything: pin its initial weights,
    # or they depend on what earlier tests drew from torch's RNG.
    torch.manual_seed(0)
    out = _cli(capsys, "fit", tmp_path)
    assert "launcher=local" in rt_log.text
    assert _metric(out, "[raytrainer] fit finished", "epochs") == 8
    assert _metric(out, "[raytrainer] fit finished", "val_acc") >= 0.95

    run = tmp_path / "digits-local"
    assert rt.checkpoint.list_committed(str(run / "checkpoints"))
    assert (run / "csv" / "metrics.csv").exists() and (run / "config.yaml").exists()
    assert any((run / "tensorboard").rglob("events.out.tfevents.*"))

    out = _cli(capsys, "test", tmp_path, "--ckpt_path", "best")
    assert _metric(out, "[raytrainer] test:", "test_acc") >= 0.95

    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    out = _cli(capsys, "fit", tmp_path)  # ckpt_path: last -> resumes, nothing left to train
    assert _metric(out, "[raytrainer] fit finished", "epochs") == 8
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == steps  # no new checkpoint


# ---------------------------------------------------------------- ray_data_parquet, without Ray

def test_ray_data_parquet_files_and_batches(tmp_path):
    """The parquet files the example writes (read back with pyarrow), and one batch shaped as
    Ray Data delivers it (a dict of float32 column tensors) through the model's loss."""
    pq = pytest.importorskip("pyarrow.parquet")
    ex = _example("ray_data_parquet")
    train_dir, val_dir = ex.write_dataset(str(tmp_path))
    files = sorted(pathlib.Path(train_dir).glob("*.parquet"))
    assert len(files) == 8 and len(list(pathlib.Path(val_dir).glob("*.parquet"))) == 1
    table = pq.read_table(train_dir)
    assert table.num_rows == 8 * 1024
    assert table.column_names == ex.FEATURES + ["y"]
    assert {str(t) for t in table.schema.types} == {"float"}
    stamp = files[0].stat().st_mtime_ns
    ex.write_dataset(str(tmp_path))  # present files are reused, not rewritten
    assert files[0].stat().st_mtime_ns == stamp

    batch = {name: torch.tensor(table[name].to_numpy()[:64]) for name in table.column_names}
    model = ex.TabularMLP()
    loss = model._loss(batch)
    assert loss.ndim == 0 and loss.requires_grad
    assert ex.driver_mse(model, val_dir) > 1.0  # untrained: far from the README's < 0.05


# ---------------------------------------------------------------- on Ray (2 workers)

@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_digits_script_on_ray_two_workers(ray_cluster, tmp_path, rt_log):
    """README: `python examples/digits.py` (2 DDP workers, 15 epochs): test_acc >= 0.95, and the
    resolved configuration says launcher=ray workers=2."""
    pytest.importorskip("sklearn")
    out = _example("digits").main(["--storage-path", str(tmp_path), "--name", "digits"])
    assert "launcher=ray workers=2" in rt_log.text
    assert out["fit"].metrics["val_acc"] >= 0.95
    assert out["test"]["test_acc"] >= 0.95, out["test"]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_data_parquet_example_on_ray(ray_cluster, tmp_path, rt_log):
    """README: `python examples/ray_data_parquet.py`: final val_loss < 0.05 after 10 epochs on
    2 workers, and the same value recomputed in the driver from the returned weights."""
    pytest.importorskip("pyarrow.parquet")
    out = _example("ray_data_parquet").main(["--storage-path", str(tmp_path / "runs"),
                                             "--data-dir", str(tmp_path / "data")])
    assert "launcher=ray workers=2" in rt_log.text
    fit = out["fit"]
    assert fit.current_epoch == 10
    assert fit.metrics["val_loss"] < 0.05, fit.metrics
    # The last validation ran after the last step: its loss is the returned weights' loss.
    assert out["driver_val_mse"] == pytest.approx(fit.metrics["val_loss"], rel=1e-4)
    assert len(list((tmp_path / "data" / "train").glob("*.parquet"))) == 8


def test_s3_example_config_writes_its_run_into_the_bucket(s3_env, s3_server, monkeypatch):
    """examples/configs/digits_s3.yaml, pointed at the loopback S3 server (AWS env vars only)."""
    from raytrainer.cli import main as cli
    monkeypatch.chdir(REPO)
    code = cli.main(["fit", "--config", "examples/configs/digits.yaml", "--config", "examples/configs/digits_s3.yaml",
                     "--config", "examples/configs/digits_local.yaml", "--trainer.storage_path", s3_env,
                     "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"])
    assert code == 0
    bucket, prefix = s3_env[len("s3://"):].split("/", 1)
    keys = set(s3_server.all_objects(bucket))
    assert any(k.startswith(f"{prefix}/") and "/checkpoints/step=" in k and k.endswith(".ckpt") for k in keys)
    assert any(k.endswith("/config.yaml") for k in keys)  # the resolved config beside the checkpoints


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sweep_example_config_runs(ray_cluster, tmp_path, monkeypatch, capsys):
    """examples/configs/digits_sweep.yaml, made small: an ASHA sweep that ends with a best checkpoint."""
    from raytrainer.cli import main as cli
    monkeypatch.chdir(REPO)
    code = cli.main(["sweep", "--config", "examples/configs/digits.yaml", "--config", "examples/configs/digits_sweep.yaml",
                     "--trainer.max_epochs", "2", "--sweep.num_samples", "2", "--sweep.max_t", "2",
                     "--sweep.grace_period", "1", "--trainer.storage_path", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "sweep finished: best checkpoint" in out and "/trial_" in out
    assert any(rt.checkpoint.list_committed(str(d)) for d in tmp_path.glob("digits-sweep/trial_*/checkpoints"))
