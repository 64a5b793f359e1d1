"""Sweep efficiency: ASHA vs running every trial to completion (FIFO), same search space, same
run, same Ray instance. Reports wall time of each, their ratio, and the best metric each found.

    python benchmarks/sweep_efficiency.py [--trials 8] [--epochs 10] [--json out.json]

Each validation sleeps --epoch-delay seconds, standing in for a real epoch's compute so that the
comparison is about trials' training time, not only their start-up.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import raytrainer as rt  # noqa: E402
from sweep_models import Reg, RegData  # noqa: E402


def run(scheduler: str, lrs: list[float], epochs: int, delay: float, storage: str) -> dict:
    trainer = rt.Trainer(max_epochs=epochs, storage_path=storage, name=scheduler, logger=False)
    start = time.time()
    result = rt.sweep(Reg, RegData(), trainer, search_space={"lr": rt.tune.grid_search(lrs), "val_delay": delay},
                      metric="val_loss", mode="min", scheduler=scheduler, grace_period=1,
                      reduction_factor=2, verbose=False)
    wall = time.time() - start
    return {"wall_s": wall, "best_val_loss": result.best.best, "best_lr": result.best.config["lr"],
            "epochs_trained": sum(t.iterations for t in result.trials),
            "early_stopped": sum(t.status == "early-stopped" for t in result.trials)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--epoch-delay", type=float, default=1.0)
    p.add_argument("--quick", action="store_true", help="4 trials x 4 epochs")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.epochs, args.epoch_delay = 4, 4, 0.5
    # log-spaced learning rates, interleaved good and bad so both schedulers see a fair order
    lrs = [round(10 ** (-4 + 3 * i / (args.trials - 1)), 6) for i in range(args.trials)]
    lrs = lrs[::2][::-1] + lrs[1::2]
    with tempfile.TemporaryDirectory() as storage:
        asha = run("asha", lrs, args.epochs, args.epoch_delay, storage)
        fifo = run("fifo", lrs, args.epochs, args.epoch_delay, storage)
    ratio = asha["wall_s"] / fifo["wall_s"]
    print(f"sweep efficiency: {args.trials} learning rates x {args.epochs} epochs (+{args.epoch_delay} s per "
          f"validation), 2 CPUs, trials run in the Tune trial actor")
    print(f"{'':<6} {'wall s':>7} {'epochs trained':>15} {'stopped early':>14} {'best val_loss':>14} {'best lr':>8}")
    for name, r in (("ASHA", asha), ("FIFO", fifo)):
        print(f"{name:<6} {r['wall_s']:>7.1f} {r['epochs_trained']:>15} {r['early_stopped']:>14} "
              f"{r['best_val_loss']:>14.3g} {r['best_lr']:>8g}")
    print(f"ASHA / FIFO wall time: {ratio:.3f}")
    out = {"asha": asha, "fifo": fifo, "wall_ratio": ratio, "trials": args.trials, "epochs": args.epochs}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
