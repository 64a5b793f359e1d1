"""FSDP checkpoints, full vs sharded, on 2 ranks: what rank 0 writes, how much memory the saves
add to its peak, how long they block training, and how long a resume takes.

    python benchmarks/sharded_checkpoint.py [--width 2048] [--layers 6] [--json out.json]

Two gloo processes (torch.multiprocessing, no Ray: the checkpoint path alone) shard an MLP with
FSDP2 (``FSDP2Strategy``), take one Adam step, then save twice through ``checkpoint.save`` with
the background writer (``async_checkpoint=True``, the default) and resume once. Each mode runs in
fresh processes, so ``ru_maxrss`` (peak RSS) after the saves minus before them is what
checkpointing added to the peak. Full: gathered to rank 0, which serializes and writes model.pt
and state.pt. Sharded: every rank writes its own DCP file, synchronously.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time


def _rank(rank: int, port: int, mode: str, width: int, layers: int, root: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from raytrainer.checkpoint import store as ckpt_io
    from raytrainer.checkpoint.writer import CheckpointWriter
    from raytrainer.loop.strategy import FSDP2Strategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    strategy = FSDP2Strategy(module, torch.device("cpu"), sharded=mode == "sharded")
    strategy.setup()
    strategy.set_optimizers([torch.optim.Adam(module.parameters(), lr=1e-3)])
    strategy.step_fn("forward")(torch.randn(2, width)).sum().backward()
    strategy.optimizers[0].step()

    class Ctx:
        global_rank = rank

        def barrier(self):
            dist.barrier()

        def all_gather_object(self, obj):
            gathered = [None, None]
            dist.all_gather_object(gathered, obj)
            return gathered

    uri, writer = os.path.join(root, mode), CheckpointWriter(asynchronous=True)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    blocked = []
    for _ in range(2):
        dist.barrier()
        start = time.perf_counter()
        state = {"state_dict": strategy.checkpoint_model_state(), "global_step": 1, "rank_state": {},
                 "optimizer_states": strategy.checkpoint_optimizer_states()}
        ckpt_io.save(uri, state, ctx=Ctx(), writer=writer, sharded=strategy.sharded_checkpoint)
        blocked.append(time.perf_counter() - start)
        writer.wait()  # the next save would wait for it anyway; keeps the two saves comparable
    rss_added = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    dist.barrier()
    start = time.perf_counter()
    loaded = ckpt_io.load(uri, strategy=strategy)
    strategy.load_model_state_dict(loaded["state_dict"])
    strategy.load_optimizer_state_dicts(loaded["optimizer_states"])
    resume_s = time.perf_counter() - start
    mine = {"blocked_s": min(blocked), "peak_rss_added_mb": rss_added / 1024, "resume_s": resume_s}
    every = Ctx().all_gather_object(mine)
    if rank == 0:
        files = ckpt_io.require_committed(uri)["files"]
        per_rank = {r: sum(v["size"] for k, v in files.items() if _written_by(k, r)) / 2**20 for r in (0, 1)}
        with open(out, "w") as f:
            json.dump({"ranks": every, "written_mb": per_rank}, f)
    dist.barrier()
    dist.destroy_process_group()
    # About 1 exit in 8 of such a process (FSDP2 + gloo + a checkpoint save, with the full layout
    # as with the sharded one) aborts in a C++ destructor ("terminate called without an active
    # exception") after all of the above is done; skip the interpreter's teardown.
    sys.stdout.flush()
    os._exit(0)


def _written_by(name: str, rank: int) -> bool:
    if name.startswith("rank-"):
        return int(name[5:10]) == rank
    if name.startswith("sharded/__"):
        return int(name.split("__")[1].split("_")[0]) == rank
    return rank == 0  # model.pt, state.pt, sharded/.metadata


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--quick", action="store_true", help="a small model (smoke run)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.layers = 256, 2
    import torch.multiprocessing as mp
    params = args.layers * (args.width * args.width + args.width)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for mode in ("full", "sharded"):
            out = os.path.join(root, f"{mode}.json")
            mp.spawn(_rank, args=(_free_port(), mode, args.width, args.layers, root, out), nprocs=2)
            with open(out) as f:
                results[mode] = json.load(f)
    state_mb = params * 4 * 3 / 2**20  # fp32 weights + Adam's two moments
    print(f"{params / 1e6:.1f}M parameters, {state_mb:.0f} MiB of model + Adam state, 2 ranks")
    print("| mode | rank 0 writes MiB | rank 1 writes MiB | rank 0 peak RSS added MiB | rank 0 blocked s | "
          "rank 1 blocked s | resume s |")
    for mode, r in results.items():
        r0, r1 = r["ranks"]
        print(f"| {mode} | {r['written_mb']['0']:.0f} | {r['written_mb']['1']:.0f} | {r0['peak_rss_added_mb']:.0f} | "
              f"{r0['blocked_s']:.3f} | {r1['blocked_s']:.3f} | {max(r0['resume_s'], r1['resume_s']):.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/sharded_checkpoint.py" + (" --quick" if args.quick else ""),
                       "params": params, "state_mb": state_mb, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
