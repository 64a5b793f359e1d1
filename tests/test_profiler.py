"""Trainer(profiler=...) and the ThroughputMonitor, in-process: the stage table adds up to the fit's
wall time and names a slow data loader; files land in the run folder; the torch trace is a file
TensorBoard's profiler plugin reads; throughput values match the clock."""
from __future__ import annotations

import glob
import json
import os
import re
import time
from types import SimpleNamespace

import pytest
import torch
from helpers import LinearModel, csv_column, csv_path, dataset, loader, make_trainer, read_csv
from torch.utils.data import DataLoader, Dataset

import raytrainer as rt
from raytrainer import profiler as rt_profiler
from raytrainer.callbacks import throughput

DELAY = 0.005  # seconds per sample in SlowDataset


class SlowDataset(Dataset):
    """helpers.dataset, each sample taking ``DELAY`` seconds to load."""

    def __init__(self, n: int):
        self.data = dataset(n)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        time.sleep(DELAY)
        return self.data[i]


class BatchEndCallback(rt.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pass


def table_rows(text: str) -> dict[str, tuple[str, str, float]]:
    """The table as written: action -> (mean, calls, total seconds), the Total row left out."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0] not in ("Action", "Total"):
            rows[cells[0]] = (cells[1], cells[2], float(cells[3]))
    return rows


def test_the_table_adds_up_to_the_fit_and_names_a_slow_loader(tmp_path, rt_log):
    # A first fit pays one-time costs (imports, allocator warm-up) outside the profiled region.
    make_trainer(tmp_path, name="warmup", profiler="simple").fit(LinearModel(), loader(n=8))
    trainer = make_trainer(tmp_path, profiler="simple", max_epochs=3, enable_checkpointing=True,
                           callbacks=[BatchEndCallback()], log_every_n_steps=2)
    t0 = time.perf_counter()
    result = trainer.fit(LinearModel(), DataLoader(SlowDataset(48), batch_size=4), loader(n=8))
    wall = time.perf_counter() - t0  # ~1 s, nearly all of it in the loader's sleeps

    profile = result.profile
    assert profile["slowest"] == rt_profiler.DATA_NEXT
    assert profile["table"] in rt_log.text  # logged on rank 0 at the end of fit
    rows = table_rows(profile["table"])
    # The table's rows (every stage plus "other") sum to the wall time of fit().
    assert sum(total for _, _, total in rows.values()) == pytest.approx(wall, rel=0.10)
    assert profile["fit_s"] == pytest.approx(wall, rel=0.10)
    # Exclusive times: no stage counted twice, so "other" is small and never negative.
    assert 0 <= rows[rt_profiler.OTHER][2] < 0.10 * wall
    # The loader: 36 batches of 4 samples (12 per epoch), each sample DELAY seconds.
    mean, calls, total = rows[rt_profiler.DATA_NEXT]
    assert int(calls) == 36  # a loader with a length: no StopIteration fetch
    assert 144 * DELAY <= total < wall  # a sleep never ends early (late on a loaded machine)
    assert max(rows, key=lambda a: rows[a][2]) == rt_profiler.DATA_NEXT
    for stage, calls in [("forward (training_step)", "36"), ("backward", "36"), ("optimizer step", "36"),
                         ("validation", "3"), ("checkpoint save (snapshot)", "3"),
                         ("hook: on_train_batch_end", "36"), (rt_profiler.DATA_START, "3")]:
        assert rows[stage][1] == calls, stage
    assert "logging" in rows and "hook: on_checkpoint_boundary" in rows


def test_the_table_is_written_to_the_run_folder_and_the_run_is_restored(tmp_path):
    trainer = make_trainer(tmp_path, profiler="simple", max_steps=3)
    result = trainer.fit(LinearModel(), loader(n=12))
    folder = os.path.join(trainer.run_dir, "profiler")
    assert result.profile["path"] == os.path.join(folder, "simple.txt")
    with open(os.path.join(folder, "simple.txt")) as f:
        text = f.read()
    assert text.strip() == result.profile["table"].strip()
    assert re.search(r"\| Action +\| Mean duration \(s\) \| Num calls \| Total time \(s\) \| Percentage % \|", text)
    with open(os.path.join(folder, "simple.json")) as f:
        saved = json.load(f)
    assert saved["rows"] == result.profile["rows"]
    assert [r["action"] for r in saved["rows"]][-1] == rt_profiler.OTHER
    assert sum(r["percent"] for r in saved["rows"]) == pytest.approx(100.0)


def test_without_a_profiler_nothing_is_timed_or_written(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(rt_profiler.SimpleProfiler, "start", lambda *a: started.append(a))
    profilers = []

    class Spy(rt.Callback):  # look at the run while it trains
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            profilers.append(trainer._run.profiler)

    trainer = make_trainer(tmp_path, callbacks=[Spy()], max_steps=2)
    result = trainer.fit(LinearModel(), loader(n=8))
    assert result.profile is None and started == []
    assert profilers and all(type(p) is rt_profiler.NoProfiler for p in profilers)
    # A NoProfiler's region is one shared nullcontext and a wrapped function is the function.
    off = rt_profiler.NoProfiler()
    assert off.region("a") is off.region("b") and off.wrap("a", len) is len
    assert not os.path.exists(os.path.join(trainer.run_dir, "profiler"))


def test_several_workers_add_the_slowest_ranks_data_wait(tmp_path):
    """Rank 0's table plus the slowest rank's data wait (gathered from every rank)."""
    gathered = []

    class TwoRanks:
        world_size, global_rank = 2, 0

        def all_gather_object(self, obj):
            gathered.append(obj)
            return [obj, obj + 2.5]  # rank 1 waited 2.5 s longer for data

    prof = rt_profiler.SimpleProfiler()
    prof.start(TwoRanks(), torch.device("cpu"), SimpleNamespace(run_dir=str(tmp_path), storage_options={}))
    prof._records.update({rt_profiler.DATA_NEXT: [10, 0.75], rt_profiler.DATA_START: [1, 0.25],
                          "backward": [10, 0.5]})
    prof._t0 = time.perf_counter() - 2.0
    report = prof.finish()
    assert gathered == [1.0]  # both data rows: the rank's whole wait for data
    assert report["slowest_rank_data_wait"] == {"rank": 1, "seconds": 3.5}
    assert "slowest rank data wait: rank 1, 3.500 s" in report["table"]
    with open(tmp_path / "profiler" / "simple.txt") as f:
        assert "slowest rank data wait: rank 1" in f.read()


def test_pytorch_profiler_writes_a_tensorboard_trace(tmp_path):
    trainer = make_trainer(tmp_path, profiler="pytorch", max_steps=6)
    result = trainer.fit(LinearModel(), loader(n=40))
    traces = glob.glob(os.path.join(trainer.run_dir, "profiler", "*.pt.trace.json"))
    assert len(traces) == 1 and os.path.basename(traces[0]).startswith("rank0.")
    with open(traces[0]) as f:
        trace = json.load(f)  # Chrome trace format, what TensorBoard's profiler plugin parses
    names = {e.get("name") for e in trace["traceEvents"]}
    # The active window (steps 3-5 of wait=1, warmup=1, active=3) with the stages as ranges.
    assert {"forward (training_step)", "backward", "optimizer step"} <= names
    assert any(str(n).startswith("ProfilerStep#") for n in names)
    assert result.profile["profiler"] == "pytorch"
    assert os.path.exists(os.path.join(trainer.run_dir, "profiler", "pytorch.txt"))


def test_pytorch_profiler_instance_and_a_window_longer_than_the_fit(tmp_path, rt_log):
    prof = rt_profiler.PyTorchProfiler(wait=0, warmup=1, active=2)
    trainer = make_trainer(tmp_path, profiler=prof, max_steps=2)
    trainer.fit(LinearModel(), loader(n=40))
    assert glob.glob(os.path.join(trainer.run_dir, "profiler", "*.pt.trace.json"))  # cut short, still written
    trainer = make_trainer(tmp_path, name="short", profiler="pytorch", max_steps=1)
    trainer.fit(LinearModel(), loader(n=40))
    assert not glob.glob(os.path.join(trainer.run_dir, "profiler", "*.pt.trace.json"))
    assert "wrote no trace" in rt_log.text


def test_a_failed_fit_stops_the_profiler(tmp_path):
    class Fails(LinearModel):
        def training_step(self, batch, batch_idx):
            if batch_idx == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    trainer = make_trainer(tmp_path, profiler="pytorch", max_steps=8)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Fails(), loader(n=40))
    assert torch.autograd.profiler._is_profiler_enabled is False  # torch's profiler was stopped
    # ...so the next profiled fit in this process can start its own.
    trainer = make_trainer(tmp_path, name="again", profiler="pytorch", max_steps=6)
    trainer.fit(LinearModel(), loader(n=40))
    assert glob.glob(os.path.join(trainer.run_dir, "profiler", "*.pt.trace.json"))


@pytest.mark.parametrize("value,match", [
    ("advanced", r"profiler='advanced'.*\['simple', 'pytorch'\]"),
    ("Simple", r"profiler='Simple'"),
    (True, r"profiler=True"),
    (torch.profiler.profile, r"profiler=<class"),
])
def test_invalid_profiler_is_a_config_error(tmp_path, value, match):
    with pytest.raises(rt.ConfigError, match=match):
        make_trainer(tmp_path, profiler=value)


def test_invalid_pytorch_profiler_window_is_a_config_error():
    with pytest.raises(rt.ConfigError, match=r"PyTorchProfiler\(active=0\)"):
        rt_profiler.PyTorchProfiler(active=0)


def test_throughput_monitor_logs_plausible_rates_at_logging_steps(tmp_path):
    logger = rt.loggers.CSVLogger()
    trainer = make_trainer(tmp_path, logger=logger, max_steps=6, log_every_n_steps=2, accumulate_grad_batches=2,
                           callbacks=[rt.callbacks.ThroughputMonitor()])
    t0 = time.perf_counter()
    trainer.fit(LinearModel(), DataLoader(SlowDataset(64), batch_size=4))
    wall = time.perf_counter() - t0
    rows = read_csv(csv_path(trainer))
    samples = csv_column(rows, "throughput/samples_per_sec")
    steps = csv_column(rows, "throughput/steps_per_sec")
    assert [s for s, _ in samples] == [2, 4, 6] and [s for s, _ in steps] == [2, 4, 6]
    # The three windows hold all 12 batches of 4 samples, in less time than the whole fit took
    # (they leave setup out): together faster than that average, and never faster than the loader
    # can produce samples.
    for (_, rate), (_, step_rate) in zip(samples, steps):
        assert rate <= 1 / DELAY
        assert rate == pytest.approx(8 * step_rate)  # 2 batches of 4 per optimizer step
    windows_s = sum(16 / rate for _, rate in samples)
    assert 48 / wall < 48 / windows_s <= 1 / DELAY
    assert not any(k.startswith("throughput/gpu") for k in rows[0])  # CPU run


def test_throughput_is_global_and_leaves_validation_out(monkeypatch):
    clock = iter([100.0, 101.0, 101.5, 102.0, 102.0])  # start, validation start/end, logging step
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    logged = []
    logger = SimpleNamespace(log_metrics=lambda values, step: logged.append((step, values)))
    trainer = SimpleNamespace(world_size=3, loggers=[logger], log_every_n_steps=2, global_step=0,
                              strategy=SimpleNamespace(root_device=torch.device("cpu")))
    monitor = rt.callbacks.ThroughputMonitor()
    monitor.on_train_start(trainer, None)
    batch = (torch.zeros(4, 2), torch.zeros(4, 1))  # 4 samples
    for step in (1, 1, 2):  # three batches (step 1 took two), the last closes step 2
        trainer.global_step = step
        if step == 2:
            monitor.on_validation_start(trainer, None)
            monitor.on_validation_end(trainer, None)
        monitor.on_train_batch_end(trainer, None, None, batch, 0)
    # 3 batches x 4 samples x 3 workers in 2 s, of which 0.5 s validation: 36 / 1.5
    assert logged == [(2, {"throughput/samples_per_sec": 24.0, "throughput/steps_per_sec": 2 / 1.5})]
