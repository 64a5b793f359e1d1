"""Loggers write real files that real readers (TensorBoard's EventAccumulator, csv) read back."""
from __future__ import annotations

import csv
import glob
import os
import pickle

import fsspec
import pytest
import yaml
from tensorboard.plugins.hparams import plugin_data_pb2

import raytrainer as rt
from raytrainer.loggers import CSVLogger, TensorBoardLogger
from raytrainer.loggers._sync import sync_dir_to_remote

HPARAMS = {"lr": 0.01, "hidden": 64, "opt": {"name": "adam", "betas": (0.9, 0.99)},
           "use_bn": True}


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(log_dir, size_guidance={"scalars": 0}).Reload()  # 0: keep all


def _scalars(ea, tag):
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def _csv_rows(path):
    with open(path, newline="") as f:
        return (reader := csv.DictReader(f)).fieldnames, list(reader)


@pytest.fixture
def memfs():
    """fsspec's in-memory filesystem, emptied after each test (it is process-global)."""
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    yield fs
    fs.store.clear()
    fs.pseudo_dirs[:] = [""]


# ---------------------------------------------------------------- TensorBoard

def test_tensorboard_scalars_and_hparams_read_back(tmp_path):
    logger = TensorBoardLogger()
    assert logger.log_dir is None
    logger.setup(str(tmp_path / "run"))
    assert (logger.name, logger.log_dir) == ("tensorboard", str(tmp_path / "run" / "tensorboard"))
    logger.log_hyperparams(HPARAMS)
    for step in range(1, 6):
        logger.log_metrics({"train_loss": 1.0 / step, "lr": 0.1 * step}, step=step)
    logger.finalize("success")

    # Everything in the run dir itself: add_hparams would have made a sub-folder.
    assert [p.name for p in (tmp_path / "run" / "tensorboard").iterdir() if p.is_dir()] == []
    ea = _events(logger.log_dir)
    assert set(ea.Tags()["scalars"]) == {"train_loss", "lr", "hp_metric"}  # Lightning's placeholder
    loss, lr = _scalars(ea, "train_loss"), _scalars(ea, "lr")
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5]
    assert [v for _, v in loss] == pytest.approx([1.0 / s for s in range(1, 6)], abs=1e-6)
    assert [v for _, v in lr] == pytest.approx([0.1 * s for s in range(1, 6)], abs=1e-6)
    assert [s for s, _ in lr] == [1, 2, 3, 4, 5]

    # The hparams plugin's three summaries, with the flattened params in session_start_info.
    content = ea.PluginTagToContent("hparams")
    assert set(content) == {"_hparams_/experiment", "_hparams_/session_start_info",
                            "_hparams_/session_end_info"}
    data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = {k: getattr(v, v.WhichOneof("kind")) for k, v in data.session_start_info.hparams.items()}
    assert hp == {"lr": 0.01, "hidden": 64, "opt/name": "adam", "use_bn": True,
                  "opt/betas": "(0.9, 0.99)"}  # non-scalars become str()

    with open(os.path.join(logger.log_dir, "hparams.yaml")) as f:
        assert yaml.safe_load(f) == {"lr": 0.01, "hidden": 64, "use_bn": True,
                                     "opt": {"name": "adam", "betas": [0.9, 0.99]}}


def test_tensorboard_hparams_metrics_link_dashboard_columns(tmp_path):
    logger = TensorBoardLogger(save_dir=str(tmp_path))
    logger.log_hyperparams({"lr": 0.1}, metrics={"hp_metric": -1.0})
    logger.finalize("success")
    ea = _events(logger.log_dir)
    exp = plugin_data_pb2.HParamsPluginData.FromString(
        ea.PluginTagToContent("hparams")["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in exp.metric_infos] == ["hp_metric"]
    assert [h.name for h in exp.hparam_infos] == ["lr"]
    assert _scalars(ea, "hp_metric") == [(0, -1.0)]


def test_tensorboard_save_dir_and_file_uri(tmp_path):
    logger = TensorBoardLogger(save_dir=f"file://{tmp_path}/logs", name="tb")
    logger.setup(str(tmp_path / "ignored_run_dir"))  # save_dir wins over the run dir
    assert logger.log_dir == f"{tmp_path}/logs/tb/version_0"  # Lightning's first version folder
    logger.log_metrics({"x": 3.0}, step=7)
    logger.save()  # local: a best-effort flush, the writer stays open
    logger.log_metrics({"x": 4.0}, step=8)
    logger.finalize("success")
    assert _scalars(_events(logger.log_dir), "x") == [(7, 3.0), (8, 4.0)]
    assert len(glob.glob(os.path.join(logger.log_dir, "events.out.tfevents.*"))) == 1
    assert not (tmp_path / "ignored_run_dir").exists()


def test_tensorboard_pickles_without_writer_and_copy_keeps_logging(tmp_path):
    logger = TensorBoardLogger(flush_secs=1)
    logger.setup(str(tmp_path))
    logger.log_metrics({"m": 1.0}, step=1)
    blob = pickle.dumps(logger)
    assert len(blob) < 2000  # no writer, file handles or threads travel
    copy = pickle.loads(blob)
    assert copy._writer is None and copy.log_dir == logger.log_dir
    copy.log_metrics({"m": 2.0}, step=2)
    logger.finalize("success")
    copy.finalize("success")
    # Two writers, two event files (unique suffix: no clobbering within the same second).
    assert len(glob.glob(os.path.join(logger.log_dir, "events.out.tfevents.*"))) == 2
    assert _scalars(_events(logger.log_dir), "m") == [(1, 1.0), (2, 2.0)]


def test_tensorboard_resume_purges_steps_after_checkpoint(tmp_path):
    first = TensorBoardLogger()
    first.setup(str(tmp_path))
    for step in range(1, 4):
        first.log_metrics({"m": float(step)}, step=step)
    state = first.state_dict()  # checkpoint at step 3
    assert state == {"step": 3}
    first.log_metrics({"m": 99.0}, step=4)  # logged after the checkpoint, then "crash"
    first.finalize("failed")

    resumed = TensorBoardLogger()
    resumed.setup(str(tmp_path))
    resumed.load_state_dict(state)
    resumed.log_metrics({"m": 4.0}, step=4)
    resumed.finalize("success")
    assert _scalars(_events(resumed.log_dir), "m") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]


# ---------------------------------------------------------------- CSV

def test_csv_rows_columns_merge_and_new_column(tmp_path):
    logger = CSVLogger(flush_logs_every_n_steps=2)
    logger.setup(str(tmp_path))
    assert logger.log_dir == str(tmp_path / "csv")
    logger.log_metrics({"train_loss": 0.5, "acc": 0.1}, step=1)
    logger.log_metrics({"train_loss": 0.4}, step=2)  # 2nd call: periodic flush
    path = tmp_path / "csv" / "metrics.csv"
    header, rows = _csv_rows(path)
    assert header == ["step", "acc", "train_loss"]
    assert [r["step"] for r in rows] == ["1", "2"]
    assert rows[1]["acc"] == ""  # missing value: empty cell

    logger.log_metrics({"val_loss": 0.3}, step=2)  # same step as a flushed row: merged
    logger.log_metrics({"train_loss": 0.2}, step=3)
    logger.log_metrics({"epoch": 0.0}, step=3)  # same step in the buffer: merged
    logger.save()
    header, rows = _csv_rows(path)
    assert header == ["step", "acc", "epoch", "train_loss", "val_loss"]  # new columns, sorted
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert float(rows[0]["train_loss"]) == 0.5 and float(rows[0]["acc"]) == 0.1
    assert rows[0]["val_loss"] == "" and rows[0]["epoch"] == ""
    assert float(rows[1]["train_loss"]) == 0.4 and float(rows[1]["val_loss"]) == 0.3
    assert float(rows[2]["train_loss"]) == 0.2 and float(rows[2]["epoch"]) == 0.0

    logger.log_hyperparams(HPARAMS)
    logger.finalize("success")
    with open(tmp_path / "csv" / "hparams.yaml") as f:
        assert yaml.safe_load(f)["opt"] == {"name": "adam", "betas": [0.9, 0.99]}


def test_csv_buffers_until_flush_interval(tmp_path):
    logger = CSVLogger(save_dir=str(tmp_path), flush_logs_every_n_steps=3)
    path = tmp_path / "csv" / "version_0" / "metrics.csv"
    logger.log_metrics({"a": 1.0}, step=1)
    logger.log_metrics({"a": 2.0}, step=2)
    assert not path.exists()  # buffered
    logger.log_metrics({"a": 3.0}, step=3)
    assert [r["a"] for r in _csv_rows(path)[1]] == ["1.0", "2.0", "3.0"]
    logger.log_metrics({"a": 4.0}, step=4)
    assert len(_csv_rows(path)[1]) == 3
    logger.finalize("success")
    assert [r["step"] for r in _csv_rows(path)[1]] == ["1", "2", "3", "4"]


def test_csv_resume_appends_after_existing_rows(tmp_path):
    first = CSVLogger()
    first.setup(str(tmp_path))
    first.log_metrics({"loss": 1.0}, step=1)
    first.log_metrics({"loss": 0.5}, step=2)
    first.finalize("success")

    second = CSVLogger()  # a resumed run: same run dir, fresh process
    second.setup(str(tmp_path))
    second.log_metrics({"loss": 0.25, "val_loss": 0.3}, step=3)
    second.finalize("success")
    header, rows = _csv_rows(tmp_path / "csv" / "metrics.csv")
    assert header == ["step", "loss", "val_loss"]
    assert [(r["step"], r["loss"], r["val_loss"]) for r in rows] == [
        ("1", "1.0", ""), ("2", "0.5", ""), ("3", "0.25", "0.3")]


def test_csv_resume_from_checkpoint_drops_rows_past_it(tmp_path):
    first = CSVLogger(flush_logs_every_n_steps=1)
    first.setup(str(tmp_path))
    for step in (1, 2):
        first.log_metrics({"loss": float(step)}, step=step)
    state = first.state_dict()
    first.log_metrics({"loss": 99.0}, step=3)  # after the checkpoint, then "crash"

    resumed = CSVLogger()
    resumed.load_state_dict(state)  # before setup: applied when the file is opened
    resumed.setup(str(tmp_path))
    resumed.log_metrics({"loss": 3.0}, step=3)
    resumed.finalize("success")
    rows = _csv_rows(tmp_path / "csv" / "metrics.csv")[1]
    assert [(r["step"], r["loss"]) for r in rows] == [("1", "1.0"), ("2", "2.0"), ("3", "3.0")]


def test_csv_pickles_cheaply_and_copy_continues_file(tmp_path):
    logger = CSVLogger(flush_logs_every_n_steps=1000)
    logger.setup(str(tmp_path))
    for step in range(1, 51):
        logger.log_metrics({"loss": float(step)}, step=step)
    logger.save()
    blob = pickle.dumps(logger)
    assert len(blob) < 1000  # no rows travel with the object
    copy = pickle.loads(blob)
    assert copy.log_dir == logger.log_dir
    copy.log_metrics({"loss": 51.0, "acc": 1.0}, step=51)
    copy.finalize("success")
    header, rows = _csv_rows(tmp_path / "csv" / "metrics.csv")
    assert header == ["step", "acc", "loss"]
    assert [int(r["step"]) for r in rows] == list(range(1, 52))
    assert float(rows[-1]["acc"]) == 1.0 and float(rows[-1]["loss"]) == 51.0


# ---------------------------------------------------------------- remote staging

def test_remote_run_dir_is_staged_and_uploaded(tmp_path, memfs):
    run_dir = "memory://bucket/runs/exp1"
    tb, csv_logger = TensorBoardLogger(), CSVLogger()
    for lg in (tb, csv_logger):
        lg.setup(run_dir)
        lg.log_hyperparams({"lr": 0.1})
        for step in (1, 2, 3):
            lg.log_metrics({"loss": 1.0 / step}, step=step)
    assert tb.log_dir == f"{run_dir}/tensorboard"
    assert csv_logger.log_dir == f"{run_dir}/csv"
    assert not memfs.exists("/bucket/runs/exp1/csv/metrics.csv")  # nothing uploaded yet
    csv_logger.save()
    assert memfs.exists("/bucket/runs/exp1/csv/metrics.csv")
    tb.save()  # closes the event file, so what is uploaded is complete
    first = memfs.glob("/bucket/runs/exp1/tensorboard/events.out.tfevents.*")
    assert len(first) == 1
    tb.log_metrics({"loss": 0.25}, step=4)  # a new event file after the save
    for lg in (tb, csv_logger):
        lg.finalize("success")

    text = memfs.cat_file("/bucket/runs/exp1/csv/metrics.csv").decode()
    assert text.splitlines() == ["step,loss", "1,1.0", "2,0.5", "3,0.3333333333333333"]
    assert yaml.safe_load(memfs.cat_file("/bucket/runs/exp1/csv/hparams.yaml")) == {"lr": 0.1}
    events = memfs.glob("/bucket/runs/exp1/tensorboard/events.out.tfevents.*")
    assert len(events) == 2 and first[0] in events
    assert memfs.exists("/bucket/runs/exp1/tensorboard/hparams.yaml")

    # The uploaded event files are complete: download them and read them with TensorBoard.
    local = tmp_path / "download"
    memfs.get(events, str(local) + "/")
    assert sorted(os.listdir(local)) == sorted(os.path.basename(e) for e in events)
    assert [(s, round(v, 6)) for s, v in _scalars(_events(str(local)), "loss")] == [
        (1, 1.0), (2, 0.5), (3, 0.333333), (4, 0.25)]


def test_remote_csv_resume_continues_remote_file(memfs):
    run_dir = "memory://bucket/runs/exp2"
    for step in (1, 2):  # the 2nd logger has a new staging dir: it must fetch and continue
        logger = CSVLogger()
        logger.setup(run_dir)
        logger.log_metrics({"loss": float(step)}, step=step)
        logger.finalize("success")
    text = memfs.cat_file("/bucket/runs/exp2/csv/metrics.csv").decode()
    assert text.splitlines() == ["step,loss", "1,1.0", "2,2.0"]


def test_sync_dir_to_remote_skips_unchanged_files(tmp_path, memfs):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub" / "b.txt").write_text("b")
    seen: dict = {}
    assert sync_dir_to_remote(str(tmp_path), "memory://r/x", seen) == ["a.txt", "sub/b.txt"]
    assert memfs.cat_file("/r/x/sub/b.txt") == b"b"
    (tmp_path / "a.txt").write_text("aa")
    assert sync_dir_to_remote(str(tmp_path), "memory://r/x", seen) == ["a.txt"]
    assert memfs.cat_file("/r/x/a.txt") == b"aa"



def test_lightnings_logger_arguments_lay_out_and_name_as_lightning_does(tmp_path):
    """TensorBoardLogger/CSVLogger(save_dir, name, version, prefix, sub_dir, default_hp_metric):
    the same folders under save_dir and the same metric names as pytorch-lightning's loggers."""
    pl = pytest.importorskip("pytorch_lightning")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def run(loggers_mod, root):
        tb = loggers_mod.TensorBoardLogger(str(root), name="exp", version=3, prefix="p", sub_dir="s")
        csv_logger = loggers_mod.CSVLogger(str(root), name="tab", version="v", prefix="p")
        for lg in (tb, csv_logger):
            if hasattr(lg, "setup"):
                lg.setup(str(root / "unused"))
            lg.log_hyperparams({"lr": 0.1})
            lg.log_metrics({"loss": 1.5}, 2)
            lg.save()
            lg.finalize("success")
        tags = set(EventAccumulator(tb.log_dir).Reload().Tags()["scalars"])
        with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as f:
            header = set(f.readline().strip().split(","))
        return (os.path.relpath(tb.log_dir, root), os.path.relpath(csv_logger.log_dir, root), tags,
                header - {"epoch"}, (tb.version, csv_logger.version))

    ours, theirs = run(rt.loggers, tmp_path / "ours"), run(pl.loggers, tmp_path / "theirs")
    assert ours == theirs
    assert ours[:3] == (os.path.join("exp", "version_3", "s"), os.path.join("tab", "v"), {"p-loss", "p-hp_metric"})


def test_versions_on_remote_storage_and_in_sweep_trials(memfs):
    """The next version is found on any fsspec storage (listed there, not on local disk); a sweep
    trial logging to a shared save_dir gets its trial's name as version, so trials running at
    once never race for the same version_N."""
    first = CSVLogger("memory://bucket/logs", name="tab")
    first.log_metrics({"a": 1.0}, step=0)
    first.finalize("success")
    assert memfs.exists("/bucket/logs/tab/version_0/metrics.csv")
    assert CSVLogger("memory://bucket/logs", name="tab").log_dir == "memory://bucket/logs/tab/version_1"

    trial = TensorBoardLogger("memory://bucket/logs", name="tb")
    trial.join_sweep("memory://bucket/sweep", "trial_00002")
    assert trial.log_dir == "memory://bucket/logs/tb/trial_00002"
    chosen = TensorBoardLogger("memory://bucket/logs", name="tb", version=4)
    chosen.join_sweep("memory://bucket/sweep", "trial_00002")  # a version given by the user stays
    assert chosen.version == 4
