"""Data ingest inside Ray Train workers: rows/s per worker for the same rows fed as
 - a torch DataLoader over an in-memory TensorDataset (sharded by a DistributedSampler),
 - rt.RayDataLoader over a materialized Ray Dataset (in memory),
 - rt.RayDataLoader over lazily read parquet files (pyarrow), the streaming case.

    python benchmarks/data_ingest.py [--rows 200000] [--batch 1024] [--json out.json]

2 workers; the training step is trivial (one scalar parameter) so the number is the input
pipeline's; the second epoch (warm) is timed. Ratios are against the torch DataLoader.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt

FEATURES = 16


class Sink(rt.Module):
    def __init__(self, out: str):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.out = out
        self.rows = 0
        self.epoch_start = 0.0

    def training_step(self, batch, batch_idx):
        x = batch["x"] if isinstance(batch, dict) else batch[0]
        self.rows += x.shape[0]
        return self.w * x[0, 0]

    def on_train_epoch_start(self):
        self.rows, self.epoch_start = 0, time.perf_counter()

    def on_train_epoch_end(self):
        if self.global_rank == 0 and self.current_epoch == 1:
            with open(self.out, "w") as f:
                json.dump({"rows": self.rows, "seconds": time.perf_counter() - self.epoch_start}, f)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(loader, storage: str) -> dict:
    out = os.path.join(storage, f"ingest-{time.time_ns()}.json")
    trainer = rt.Trainer(devices=2, max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, log_every_n_steps=10_000, storage_path=storage,
                         name=f"ingest-{time.time_ns()}")
    trainer.fit(Sink(out), loader)
    with open(out) as f:
        r = json.load(f)
    return {"rows_per_worker": r["rows"], "rows_per_s": r["rows"] / r["seconds"]}


def main(argv=None) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    from raytrainer.runtime.cluster import ensure_ray
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--quick", action="store_true", help="50,000 rows")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.quick:
        args.rows = 50_000
    ensure_ray()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, FEATURES), dtype=np.float32)
    results = {}
    with tempfile.TemporaryDirectory() as storage:
        parquet_dir = os.path.join(storage, "parquet")
        os.makedirs(parquet_dir)
        for i, part in enumerate(np.array_split(x, 8)):
            pq.write_table(pa.table({"x": list(part)}), os.path.join(parquet_dir, f"part-{i}.parquet"))
        torch_loader = DataLoader(TensorDataset(torch.from_numpy(x)), batch_size=args.batch, shuffle=False)
        results["torch DataLoader (memory)"] = fit(torch_loader, storage)
        in_memory = ray.data.from_numpy(x).rename_columns({"data": "x"}).materialize()
        results["RayDataLoader (materialized)"] = fit(rt.RayDataLoader(in_memory, batch_size=args.batch), storage)
        lazy = ray.data.read_parquet(parquet_dir)
        results["RayDataLoader (lazy parquet)"] = fit(rt.RayDataLoader(lazy, batch_size=args.batch, dtypes=torch.float32), storage)
    base = results["torch DataLoader (memory)"]["rows_per_s"]
    print(f"data ingest: {args.rows} rows x {FEATURES} float32, batch {args.batch}, 2 Ray workers, "
          "warm epoch, rows/s per worker")
    print(f"{'input':<30} {'rows/s/worker':>14} {'vs torch':>9}")
    for name, r in results.items():
        r["ratio_vs_torch"] = r["rows_per_s"] / base
        print(f"{name:<30} {r['rows_per_s']:>14,.0f} {r['ratio_vs_torch']:>9.2f}")
    out = {"rows": args.rows, "batch": args.batch, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
