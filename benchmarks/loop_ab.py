"""The step loop's own cost in two source trees, interleaved: does a change make the loop slower?

    git worktree add /tmp/before <commit>
    python benchmarks/loop_ab.py /tmp/before .      # before, after

A model so small (``Linear(2, 1)``, batches of 4, already in memory) that the step is nearly all
raytrainer's own work: logging, hooks, the optimizer wrapper, the precision plugin, the profiler's
calls. Each tree runs in fresh processes, alternating, ``--rounds`` times; every process times
``--fits`` fits of ``--steps`` steps by CPU time (less disturbed than wall time by other work on
the machine) after one warm-up fit. Reported: the minimum (the machine at its least disturbed)
and the median, in microseconds per step. The loop_overhead benchmark answers the other question
(raytrainer against a hand-written loop); on a noisy machine an A/B of the same code is the
sharper tool for a refactor.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap

_CHILD = textwrap.dedent("""
    import sys, tempfile, time
    sys.path.insert(0, sys.argv[1])
    import logging
    import torch
    torch.set_num_threads(1)
    import raytrainer as rt
    logging.getLogger("raytrainer").setLevel(logging.WARNING)

    class Tiny(rt.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("loss", loss)
            return loss
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Batches:
        def __init__(self, n):
            g = torch.Generator().manual_seed(0)
            self.batches = [(torch.randn(4, 2, generator=g), torch.randn(4, 1, generator=g)) for _ in range(n)]
        def __iter__(self):
            return iter(self.batches)
        def __len__(self):
            return len(self.batches)

    steps, fits = int(sys.argv[2]), int(sys.argv[3])
    data = Batches(steps)

    def fit():
        trainer = rt.Trainer(launcher="local", max_epochs=1, logger=False, enable_progress_bar=False,
                             enable_checkpointing=False, storage_path=tempfile.mkdtemp(), name="ab",
                             accelerator="cpu")
        start = time.process_time()
        trainer.fit(Tiny(), data)
        return (time.process_time() - start) / steps * 1e6

    fit()  # warm-up: imports, allocator
    print("US_PER_STEP", *(f"{fit():.3f}" for _ in range(fits)))
""")


def measure(root: str, steps: int, fits: int) -> list[float]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, root, str(steps), str(fits)], capture_output=True,
                          text=True, timeout=600, cwd=root)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("US_PER_STEP")), None)
    if line is None:
        raise RuntimeError(f"{root}: {proc.stderr[-2000:]}")
    return [float(x) for x in line.split()[1:]]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--fits", type=int, default=3)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--json")
    args = p.parse_args(argv)
    samples: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for name in ("before", "after"):
            samples[name] += measure(getattr(args, name), args.steps, args.fits)
    result = {name: {"min_us": min(v), "median_us": statistics.median(v), "n": len(v)} for name, v in samples.items()}
    result["after_over_before_min"] = result["after"]["min_us"] / result["before"]["min_us"]
    result["after_over_before_median"] = result["after"]["median_us"] / result["before"]["median_us"]
    for name in ("before", "after"):
        r = result[name]
        print(f"{name:6} {getattr(args, name)}: min {r['min_us']:.1f} us/step, median {r['median_us']:.1f} (n={r['n']})")
    print(f"after / before: min {result['after_over_before_min']:.3f}x, median {result['after_over_before_median']:.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "command": " ".join(["python benchmarks/loop_ab.py", *sys.argv[1:]])}, f, indent=1)
    return result


if __name__ == "__main__":
    main()
