"""In-process loop overhead: a hand-written torch loop vs ``rt.Trainer(launcher="local")`` vs
Lightning's Trainer (when ``lightning`` or ``pytorch_lightning`` is importable).

Every contender trains the same network from the same initial weights on the same batches (same
seed, same shuffled DataLoader, Adam, batch 64) for the same number of steps, logs the loss with
one host sync (``.item()``) every ``log_every_n_steps`` steps to a CSV file, and optionally draws a
tqdm bar (written to /dev/null: we time the bar's bookkeeping, not a terminal). The timed region
is the whole fit: trainer construction, setup, every step, teardown. Model and data are built
before the clock starts, identically for everyone.

Numbers are ratios to the raw loop measured in the same process: contenders run interleaved
(raw, raytrainer, lightning, then the next repeat in a rotated order), every ratio pairs runs of
the same repeat, and the median over repeats is reported. ``torch.set_num_threads(1)`` for all,
so the comparison is not at the mercy of other work on the machine's cores.

    python benchmarks/loop_overhead.py                  # full: 1,000 steps, 5 repeats
    python benchmarks/loop_overhead.py --quick          # ~20 s smoke run
    python benchmarks/loop_overhead.py --json out.json  # also write the results as JSON
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt

BATCH = 64
LR = 1e-3
SEED = 0


# ---------------------------------------------------------------------------- model and data
def make_net(kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 10))
    if kind == "cnn":
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    raise ValueError(kind)


def make_dataset(kind: str, n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    shape = (n, 64) if kind == "mlp" else (n, 1, 16, 16)
    return TensorDataset(torch.randn(shape, generator=g), torch.randint(0, 10, (n,), generator=g))


def make_loader(ds: TensorDataset) -> DataLoader:
    # The most common loader: shuffled, in-process (num_workers=0), seeded so every contender
    # sees the same batches in the same order.
    return DataLoader(ds, batch_size=BATCH, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(SEED))


def fresh_net(kind: str) -> nn.Module:
    torch.manual_seed(SEED)
    return make_net(kind)


# ---------------------------------------------------------------------------- contenders
class _Clock:
    """Wall time (what the tables report) and this process's CPU time (less sensitive to other
    work on the machine: with one torch thread and no loader workers the two agree when the
    machine is quiet)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def fit_raw(net: nn.Module, loader: DataLoader, steps: int, log_every: int, bar: bool,
            out_dir: str) -> float:
    """The hand-written loop: the same work a trainer does for this job, nothing more."""
    from tqdm import tqdm
    clock = _Clock()
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    net.train()
    with open(os.path.join(out_dir, "metrics.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "epoch", "train_loss"])
        step, epoch = 0, 0
        while step < steps:
            pbar = tqdm(total=len(loader), desc=f"Epoch {epoch}", file=sys.stderr) if bar else None
            for x, y in loader:
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                if step % log_every == 0:
                    value = loss.item()  # the only host sync, on logging steps only
                    writer.writerow([step, epoch, value])
                    if pbar is not None:
                        pbar.set_postfix(train_loss=f"{value:.4g}", refresh=False)
                if pbar is not None:
                    pbar.update(1)
                if step >= steps:
                    break
            if pbar is not None:
                pbar.close()
            epoch += 1
    return clock.read()


class RTModel(rt.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=LR)


def fit_raytrainer(net: nn.Module, loader: DataLoader, steps: int, log_every: int, bar: bool,
                   out_dir: str) -> float:
    model = RTModel(net)
    clock = _Clock()
    trainer = rt.Trainer(launcher="local", accelerator="cpu", max_steps=steps,
                         logger=rt.loggers.CSVLogger(save_dir=out_dir), enable_checkpointing=False,
                         enable_progress_bar=bar, log_every_n_steps=log_every,
                         storage_path=out_dir, name="rt")
    trainer.fit(model, loader)
    return clock.read()


def _import_lightning():
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            module = __import__(name, fromlist=["Trainer"])
        except ImportError:
            continue
        # Its banners ("GPU available", tips) go through logging handlers bound to the real
        # stderr, which _quiet() cannot redirect.
        for logger in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                       "lightning_fabric"):
            logging.getLogger(logger).setLevel(logging.ERROR)
        return module, name
    return None, None


PL, PL_NAME = _import_lightning()

if PL is not None:
    class PLModel(PL.LightningModule):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=LR)


def fit_lightning(net: nn.Module, loader: DataLoader, steps: int, log_every: int, bar: bool,
                  out_dir: str) -> float:
    model = PLModel(net)
    clock = _Clock()
    trainer = PL.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1,
                         logger=PL.loggers.CSVLogger(save_dir=out_dir), enable_checkpointing=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         enable_progress_bar=bar, log_every_n_steps=log_every,
                         default_root_dir=out_dir)
    trainer.fit(model, loader)
    return clock.read()


CONTENDERS = {"raw": fit_raw, "raytrainer": fit_raytrainer}
if PL is not None:
    CONTENDERS["lightning"] = fit_lightning


# ---------------------------------------------------------------------------- measurement
@contextlib.contextmanager
def _quiet():
    """Progress bars and banners go to /dev/null (Lightning's bar writes to stdout, ours and the
    raw loop's to stderr); warnings about num_workers etc. are the same for every repeat."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
            contextlib.redirect_stderr(devnull), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def time_one(contender: str, kind: str, ds: TensorDataset, steps: int, log_every: int,
             bar: bool) -> tuple[tuple[float, float], nn.Module]:
    net = fresh_net(kind)
    loader = make_loader(ds)
    with tempfile.TemporaryDirectory(prefix=f"bench-{contender}-") as out_dir, _quiet():
        torch.set_num_threads(1)
        gc.collect()
        seconds = CONTENDERS[contender](net, loader, steps, log_every, bar, out_dir)
    if torch.get_num_threads() != 1:
        raise RuntimeError(f"{contender} changed torch's thread count to {torch.get_num_threads()}")
    return seconds, net


def max_weight_diff(a: nn.Module, b: nn.Module) -> float:
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


def settings(models: list[str], log_every: list[int], bars: list[bool]) -> list[dict]:
    return [{"model": m, "log_every_n_steps": n, "progress_bar": b}
            for m in models for n in log_every for b in bars]


def label(s: dict) -> str:
    return f"{s['model']} log/{s['log_every_n_steps']} {'bar' if s['progress_bar'] else 'no bar'}"


def run(args) -> dict:
    torch.set_num_threads(1)
    names = list(CONTENDERS)
    cases = settings(args.models, args.log_every, args.bars)
    datasets = {m: make_dataset(m, args.batches_per_epoch * BATCH) for m in args.models}

    # Warm-up (imports, allocator, first-call costs) and a parity check: after the same steps
    # every contender must hold the same weights, or they did not do the same work.
    parity = {}
    for m in args.models:
        nets = {c: time_one(c, m, datasets[m], min(args.steps, 20), 10, True)[1] for c in names}
        parity[m] = {c: max_weight_diff(nets["raw"], nets[c]) for c in names if c != "raw"}
        for c, diff in parity[m].items():
            if diff > 1e-5:
                raise RuntimeError(f"{c} diverged from the raw loop on {m}: max |dw| = {diff:.3g}")

    # Everything alive now (torch, lightning, datasets) is moved out of the collector's reach,
    # so the gc.collect() before each timed fit is quick and none runs a full pass mid-fit.
    gc.collect()
    gc.freeze()
    samples = {label(s): {c: [] for c in names} for s in cases}
    cpu_samples = {label(s): {c: [] for c in names} for s in cases}
    for r in range(args.repeats):
        # Interleaved: every setting once per repeat, contenders in a rotated order, so slow
        # phases of the machine hit every contender alike.
        order = names[r % len(names):] + names[:r % len(names)]
        for s in cases:
            for c in order:
                (wall, cpu), _ = time_one(c, s["model"], datasets[s["model"]], args.steps,
                                          s["log_every_n_steps"], s["progress_bar"])
                samples[label(s)][c].append(wall)
                cpu_samples[label(s)][c].append(cpu)
        print(f"  repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    rows = []
    for s in cases:
        t, cpu = samples[label(s)], cpu_samples[label(s)]
        row = {**s, "setting": label(s), "steps": args.steps, "raw_s": statistics.median(t["raw"])}
        for c in names[1:]:
            ratios = [a / b for a, b in zip(t[c], t["raw"])]  # paired within a repeat
            row[f"{c}_s"] = statistics.median(t[c])
            row[f"{c}_ratio"] = statistics.median(ratios)
            row[f"{c}_ratio_range"] = [min(ratios), max(ratios)]
            row[f"{c}_cpu_ratio"] = statistics.median(a / b for a, b in zip(cpu[c], cpu["raw"]))
            row[f"{c}_overhead_us_per_step"] = statistics.median(
                (a - b) / args.steps * 1e6 for a, b in zip(t[c], t["raw"]))
        row["samples_s"] = t
        row["cpu_samples_s"] = cpu
        rows.append(row)
    return {
        "benchmark": "loop_overhead",
        "command": "python benchmarks/loop_overhead.py " + " ".join(sys.argv[1:]),
        "config": {"steps": args.steps, "repeats": args.repeats, "batch_size": BATCH,
                   "batches_per_epoch": args.batches_per_epoch, "torch_threads": 1,
                   "logger": "CSV", "optimizer": "Adam", "dataloader": "shuffled, num_workers=0"},
        "contenders": names,
        "lightning": PL_NAME,
        "parity_max_abs_weight_diff": parity,
        "results": rows,
    }


def format_table(result: dict) -> str:
    names = result["contenders"]
    head = ["setting", "raw s"] + [f"{c} s (x raw; cpu x raw)" for c in names[1:]] + \
           [f"{c} overhead us/step" for c in names[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["results"]:
        cells = [row["setting"], f"{row['raw_s']:.3f}"]
        cells += [f"{row[f'{c}_s']:.3f} (**{row[f'{c}_ratio']:.3f}x**; {row[f'{c}_cpu_ratio']:.3f}x)"
                  for c in names[1:]]
        cells += [f"{row[f'{c}_overhead_us_per_step']:.0f}" for c in names[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    cfg = result["config"]
    lines.append("")
    lines.append(f"{cfg['steps']} steps, batch {cfg['batch_size']}, {cfg['batches_per_epoch']} batches "
                 f"per epoch, {cfg['optimizer']}, {cfg['logger']} logger; torch.set_num_threads(1) for "
                 f"every contender; median of {cfg['repeats']} interleaved repeats; ratios paired per "
                 "repeat; whole fit timed (setup included); progress bars written to /dev/null. "
                 "Bold: wall-time ratio; then the same for the process's CPU time (less disturbed "
                 "by other work on the machine).")
    if result["lightning"] is None:
        lines.append("Lightning not importable: `pip install -e '.[bench]'` to compare with it.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches-per-epoch", type=int, default=100,
                   help="dataset size in batches (1,000 steps = 10 epochs by default)")
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    p.add_argument("--log-every", nargs="+", type=int, default=[1, 50])
    p.add_argument("--bars", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--quick", action="store_true", help="a ~20 s run: fewer steps and repeats")
    p.add_argument("--json", help="also write the results to this path")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = min(args.steps, 150), min(args.repeats, 3)
    args.bars = [b == "on" for b in args.bars]
    result = run(args)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
