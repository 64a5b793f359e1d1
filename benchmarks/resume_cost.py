"""What does resuming mid-epoch cost, early vs late in a long epoch? In-process (launcher="local").

    python benchmarks/resume_cost.py [--samples 20000] [--repeats 11] [--quick] [--json out.json]

A map-style dataset whose ``__getitem__`` costs ~50 us (a busy wait: a stand-in for decoding or
augmentation), batch 32, shuffled. One run checkpoints every tenth of the epoch
(``ModelCheckpoint(every_n_train_steps=...)``) up to 90%. Then, for the checkpoints at 10% and at
90%, ``fit(ckpt_path=<it>, max_steps=<its step + 1>)`` is timed from the call to the first
``on_train_batch_start`` after the restore; the two are measured interleaved (order alternating)
and the medians compared. A resume of this tiny model takes only milliseconds, so one scheduler
hiccup moves a single sample by tens of percent: the repeats are cheap (11 by default). This is
the worst case for the ratio: a real model's restore (megabytes of weights and optimizer state)
adds the same fixed cost to both positions.

Columns: resume = ``fit()`` called -> first ``on_train_batch_start``; restore = ``fit()`` called ->
``on_train_epoch_start`` (setup, checkpoint read, verified and loaded); skip+batch = the rest (the
epoch's iterator rebuilt, consumed batches skipped, the first batch loaded); index skip = drawing
the skipped index batches alone; replay = loading the skipped batches instead.

Resume recreates the epoch's shuffle from the RNG saved at the epoch's start and drops the consumed
batches as *indices* (raytrainer/data.py), so resuming at 90% should cost what resuming at 10% does
(goal: ratio <= 1.2). What still grows with the position is drawing the skipped index batches
from the batch sampler ("index skip", timed on its own). The contrast: replaying the data —
iterating the DataLoader over the skipped batches, as a resume that cannot skip indices must — is
timed once for each position.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import raytrainer as rt


class SlowDataset(Dataset):
    """``n`` samples of 16 features; each ``__getitem__`` busy-waits ``cost_s`` (no sleep: a
    sleep's wake-up jitter is larger than the cost itself)."""

    def __init__(self, n: int, cost_s: float = 50e-6):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 16, generator=g)
        self.y = self.x.sum(1, keepdim=True)
        self.cost_s = cost_s

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        end = time.perf_counter() + self.cost_s
        while time.perf_counter() < end:
            pass
        return self.x[i], self.y[i]


class Regressor(rt.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(16, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class FirstBatchClock(rt.Callback):
    """Timestamps of the resumed fit's milestones (perf_counter); only the first of each."""

    def __init__(self):
        self.epoch_start: float | None = None
        self.first_batch: float | None = None
        self.first_batch_idx: int | None = None

    def on_train_epoch_start(self, trainer, pl_module):
        if self.epoch_start is None:
            self.epoch_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first_batch is None:
            self.first_batch = time.perf_counter()
            self.first_batch_idx = batch_idx


def _loader(samples: int, cost_s: float) -> DataLoader:
    return DataLoader(SlowDataset(samples, cost_s), batch_size=32, shuffle=True)


def _quiet():
    """The launcher prints its resolved configuration at every fit: keep the table readable."""
    return contextlib.redirect_stdout(io.StringIO())


def make_checkpoints(storage_path: str, samples: int, cost_s: float) -> tuple[int, dict[int, str]]:
    """Train to 90% of the first epoch, checkpointing every tenth; {percent: uri} for 10 and 90."""
    batches = len(_loader(samples, cost_s))
    every = batches // 10
    trainer = rt.Trainer(launcher="local", accelerator="cpu", max_steps=9 * every, seed=0, logger=False,
                         enable_progress_bar=False, storage_path=storage_path, name="long-epoch",
                         callbacks=[rt.callbacks.ModelCheckpoint(every_n_train_steps=every, save_top_k=-1)])
    with _quiet():
        result = trainer.fit(Regressor(), _loader(samples, cost_s))
    by_step = {rt.load_checkpoint(u)["global_step"]: u for u in result.checkpoints}
    return batches, {10: by_step[every], 90: by_step[9 * every]}


def resume_once(storage_path: str, uri: str, samples: int, cost_s: float) -> dict:
    step = rt.load_checkpoint(uri)["global_step"]
    clock = FirstBatchClock()
    trainer = rt.Trainer(launcher="local", accelerator="cpu", max_steps=step + 1, seed=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         storage_path=storage_path, name=f"resume-{time.time_ns()}", callbacks=[clock])
    loader = _loader(samples, cost_s)
    start = time.perf_counter()
    with _quiet():
        result = trainer.fit(Regressor(), loader, ckpt_path=uri)
    assert result.global_step == step + 1, (result.global_step, step)
    assert clock.first_batch_idx == step, "the resumed fit did not continue at the checkpoint's batch"
    return {"resume_s": clock.first_batch - start, "restore_s": clock.epoch_start - start,
            "skip_and_first_batch_s": clock.first_batch - clock.epoch_start}


def index_skip_s(samples: int, cost_s: float, batches: int) -> float:
    """Time to draw ``batches`` index batches from the shuffled batch sampler (what resume does)."""
    it = iter(_loader(samples, cost_s).batch_sampler)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return time.perf_counter() - start


def replay_s(samples: int, cost_s: float, batches: int) -> float:
    """Time to iterate ``batches`` batches of the DataLoader (what replaying instead of skipping costs)."""
    it = iter(_loader(samples, cost_s))
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=20_000)
    p.add_argument("--cost-us", type=float, default=50.0, help="busy-wait per __getitem__, microseconds")
    p.add_argument("--repeats", type=int, default=11, help="resumes per position, interleaved")
    p.add_argument("--quick", action="store_true", help="5,000 samples, 5 repeats (~10 s)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.repeats = min(args.samples, 5_000), min(args.repeats, 5)
    cost_s = args.cost_us * 1e-6
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        batches, uris = make_checkpoints(tmp, args.samples, cost_s)
        steps = {pct: rt.load_checkpoint(u)["global_step"] for pct, u in uris.items()}
        for pct in (10, 90):  # warm-up (first-call costs), not recorded
            resume_once(tmp, uris[pct], args.samples, cost_s)
        runs: dict[int, list[dict]] = {10: [], 90: []}
        for r in range(args.repeats):
            for pct in ((10, 90) if r % 2 == 0 else (90, 10)):  # interleaved, alternating order
                runs[pct].append(resume_once(tmp, uris[pct], args.samples, cost_s))
    skips = {pct: statistics.median(index_skip_s(args.samples, cost_s, steps[pct]) for _ in range(args.repeats))
             for pct in (10, 90)}
    replays = {pct: replay_s(args.samples, cost_s, steps[pct]) for pct in (10, 90)}

    results = {}
    for pct in (10, 90):
        med = {k: statistics.median(run[k] for run in runs[pct]) for k in runs[pct][0]}
        results[f"{pct}%"] = {"step": steps[pct], **med, "resume_all_s": [run["resume_s"] for run in runs[pct]],
                              "index_skip_s": skips[pct], "replay_s": replays[pct]}
    ratio = results["90%"]["resume_s"] / results["10%"]["resume_s"]
    print(f"resume cost: {args.samples} samples x {args.cost_us:.0f} us/__getitem__, batch 32 "
          f"({batches} batches/epoch, shuffled); median of {args.repeats} "
          f"interleaved resumes (torch threads: 1)")
    print(f"{'position':<9} {'step':>5} {'resume s':>9} {'restore s':>10} {'skip+batch s':>13} "
          f"{'index skip s':>13} {'replay s':>9}")
    for pct, r in results.items():
        print(f"{pct:<9} {r['step']:>5} {r['resume_s']:>9.4f} {r['restore_s']:>10.4f} "
              f"{r['skip_and_first_batch_s']:>13.4f} {r['index_skip_s']:>13.4f} {r['replay_s']:>9.3f}")
    print(f"resume@90% / resume@10% = {ratio:.3f} (goal <= 1.2); replaying instead would cost "
          f"{results['90%']['replay_s']:.3f} s at 90% ({results['90%']['replay_s'] / results['90%']['resume_s']:.0f}x "
          "the whole resume)")
    out = {"samples": args.samples, "cost_us": args.cost_us, "batch_size": 32, "batches_per_epoch": batches,
           "repeats": args.repeats, "results": results, "ratio": ratio,
           "goal": "resume@90% <= 1.2 x resume@10%", "goal_met": ratio <= 1.2}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
