"""How long does a checkpoint block training? Async (snapshot, then commit in the background) vs
sync (serialize + write + commit), for a ~100 MB state, on local disk and on a loopback S3 server
(moto's server mode, as in the tests). Ratios are measured in the same run.

    python benchmarks/checkpoint_blocking.py [--mb 100] [--checkpoints 4] [--json out.json]

Blocked time per checkpoint = time inside the checkpoint call at the boundary (the snapshot, plus
any wait for the previous commit); the rest of the commit overlaps with training steps.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt
from raytrainer.loop import run as run_module


class Big(rt.Module):
    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Linear(width, width)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.net(x).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-6)  # no optimizer state: size = weights


def _timed_saves():
    """Wrap Run.save_checkpoint to record the time training spends in it."""
    original = run_module.Run.save_checkpoint
    blocked: list[float] = []

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            blocked.append(time.perf_counter() - start)
    run_module.Run.save_checkpoint = timed
    return blocked, lambda: setattr(run_module.Run, "save_checkpoint", original)


def measure(storage_path: str, width: int, every: int, checkpoints: int, asynchronous: bool) -> dict:
    torch.manual_seed(0)
    model = Big(width)
    data = DataLoader(TensorDataset(torch.randn(64 * every * checkpoints, width)), batch_size=64)
    blocked, restore = _timed_saves()
    trainer = rt.Trainer(launcher="local", max_steps=every * checkpoints, logger=False,
                         enable_progress_bar=False, async_checkpoint=asynchronous,
                         storage_path=storage_path, name=f"bench-{'async' if asynchronous else 'sync'}-{time.time_ns()}",
                         callbacks=[rt.callbacks.ModelCheckpoint(every_n_train_steps=every, save_top_k=-1)])
    start = time.perf_counter()
    try:
        trainer.fit(model, data)
    finally:
        restore()
    return {"blocked_s": statistics.median(blocked), "fit_s": time.perf_counter() - start,
            "saves": len(blocked)}


def _start_s3():
    import logging

    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    import boto3
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="bench")
    return server


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=float, default=100.0)
    p.add_argument("--checkpoints", type=int, default=4)
    p.add_argument("--every", type=int, default=30, help="training steps between checkpoints")
    p.add_argument("--quick", action="store_true", help="20 MiB, 3 checkpoints every 10 steps")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.quick:
        args.mb, args.checkpoints, args.every = 20.0, 3, 10
    width = int((args.mb * 2**20 / 4) ** 0.5)  # a width x width fp32 weight of ~mb MiB
    torch.set_num_threads(1)
    server = _start_s3()
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for where, path in (("local disk", tmp), ("loopback S3", "s3://bench/runs")):
                sync = measure(path, width, args.every, args.checkpoints, asynchronous=False)
                asyn = measure(path, width, args.every, args.checkpoints, asynchronous=True)
                results[where] = {"sync": sync, "async": asyn,
                                  "ratio": asyn["blocked_s"] / sync["blocked_s"]}
    finally:
        server.stop()
    state_mb = width * width * 4 / 2**20
    print(f"checkpoint blocking: state {state_mb:.0f} MiB, {args.checkpoints} checkpoints every "
          f"{args.every} steps, median blocked time per checkpoint (torch threads: 1)")
    print(f"{'storage':<12} {'sync s':>8} {'async s':>8} {'async/sync':>11} {'fit sync s':>11} {'fit async s':>12}")
    for where, r in results.items():
        print(f"{where:<12} {r['sync']['blocked_s']:>8.3f} {r['async']['blocked_s']:>8.3f} "
              f"{r['ratio']:>11.3f} {r['sync']['fit_s']:>11.2f} {r['async']['fit_s']:>12.2f}")
    out = {"state_mb": state_mb, "results": results, "goal": "async blocked <= 0.20 x sync"}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
