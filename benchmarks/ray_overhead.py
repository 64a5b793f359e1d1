"""Distributed step time and fixed cost: raytrainer's Ray launcher vs a bare Ray TorchTrainer
running a hand-written DDP loop (same model, data, sampler, steps, 2 CPU workers, gloo).

    python benchmarks/ray_overhead.py [--steps 300] [--repeats 2] [--json out.json]

Each worker records wall-clock timestamps of its first step's start and its last step's end;
  start cost = first step start - fit() called;   end cost = fit() returned - last step end;
  step time  = (last step end - first step start) / steps.
Contenders alternate (ABAB...) on one Ray instance; medians are reported, with ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import raytrainer as rt

WIDTH, BATCH = 256, 64


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 1))


def make_data(steps: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * steps * 2, WIDTH, generator=g)  # 2 workers x steps batches
    return TensorDataset(x, x[:, :1])


def bare_loop(config: dict) -> None:
    """A careful user's hand-written Ray Train loop."""
    import ray.train
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    model = DistributedDataParallel(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    data = make_data(config["steps"])
    loader = DataLoader(data, batch_size=BATCH, sampler=DistributedSampler(data, ctx.get_world_size(),
                                                                           ctx.get_world_rank(), shuffle=True))
    first = None
    for i, (x, y) in enumerate(loader):
        if first is None:
            first = time.time()
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (i + 1) % 50 == 0:
            loss.item()  # what logging every 50 steps costs
    last = time.time()
    dist.barrier()
    if ctx.get_world_rank() == 0:
        with open(config["out"], "w") as f:
            json.dump({"first": first, "last": last}, f)
    ray.train.report({"loss": float(loss)})


class Net(rt.Module):
    def __init__(self):
        super().__init__()
        self.net = make_model()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class Stamps(rt.Callback):
    def __init__(self, out: str):
        self.out, self.first, self.last = out, None, None

    def on_train_start(self, trainer, module):
        torch.set_num_threads(1)  # as the bare loop

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.first is None:
            self.first = time.time()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.last = time.time()

    def on_train_end(self, trainer, module):
        if trainer.is_global_zero:
            with open(self.out, "w") as f:
                json.dump({"first": self.first, "last": self.last}, f)


def run_bare(steps: int, out: str, storage: str) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    trainer = TorchTrainer(bare_loop, train_loop_config={"steps": steps, "out": out},
                           scaling_config=ScalingConfig(num_workers=2),
                           run_config=RunConfig(storage_path=storage, name=f"bare-{time.time_ns()}"))
    from raytrainer.runtime.cluster import environment, ray_settings
    start = time.time()
    with environment(ray_settings()):  # the settings raytrainer runs Ray Train with, for both
        trainer.fit()
    return start


def run_raytrainer(steps: int, out: str, storage: str) -> float:
    trainer = rt.Trainer(devices=2, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, log_every_n_steps=50, storage_path=storage,
                         name=f"rt-{time.time_ns()}", callbacks=[Stamps(out)])
    data = DataLoader(make_data(steps), batch_size=BATCH, shuffle=True)
    start = time.time()
    trainer.fit(Net(), data)
    return start


def measure(fn, steps: int, storage: str) -> dict:
    out = os.path.join(storage, f"stamps-{time.time_ns()}.json")
    start = fn(steps, out, storage)
    end = time.time()
    with open(out) as f:
        stamps = json.load(f)
    return {"start_cost_s": stamps["first"] - start, "end_cost_s": end - stamps["last"],
            "step_ms": 1000 * (stamps["last"] - stamps["first"]) / steps, "total_s": end - start}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="100 steps, 1 repeat")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 100, 1
    from raytrainer.runtime.cluster import ensure_ray, ray_settings
    t0 = time.time()
    ensure_ray()  # the same fast settings for both contenders (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S)
    init_s = time.time() - t0
    runs: dict[str, list[dict]] = {"bare TorchTrainer": [], "raytrainer": []}
    with tempfile.TemporaryDirectory() as storage:
        for _ in range(args.repeats):
            runs["bare TorchTrainer"].append(measure(run_bare, args.steps, storage))
            runs["raytrainer"].append(measure(run_raytrainer, args.steps, storage))
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    bare, ours = med["bare TorchTrainer"], med["raytrainer"]
    ratios = {k: ours[k] / bare[k] for k in bare}
    print(f"Ray overhead: 2 CPU workers, {args.steps} steps of a {WIDTH}-wide MLP, batch {BATCH}, "
          f"median of {args.repeats}; ray.init {init_s:.1f} s (not counted); "
          f"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S={ray_settings()['RAY_TRAIN_HEALTH_CHECK_INTERVAL_S']} for both")
    print(f"{'':<20} {'step ms':>8} {'start s':>8} {'end s':>7} {'total s':>8}")
    for name, m in med.items():
        print(f"{name:<20} {m['step_ms']:>8.2f} {m['start_cost_s']:>8.2f} {m['end_cost_s']:>7.2f} {m['total_s']:>8.2f}")
    print(f"{'ratio':<20} {ratios['step_ms']:>8.3f} {ratios['start_cost_s']:>8.3f} {ratios['end_cost_s']:>7.3f} {ratios['total_s']:>8.3f}")
    out = {"steps": args.steps, "runs": runs, "median": med, "ratios": ratios, "ray_init_s": init_s,
           "goal": "step time <= 1.02x bare; fixed cost no worse than bare"}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
