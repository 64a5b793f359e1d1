"""Several ranks of a real torch.distributed (gloo) group without Ray, in forked processes.

``run_ranks(fn, world_size)`` starts ``world_size`` processes, joins them in a gloo group over a
loopback TCP store, calls ``fn(rank, world_size)`` in each and returns every rank's result (an
exception raised in a rank is re-raised here, with its rank). ``fn`` may be a closure (it travels
with cloudpickle). Every wait is bounded: a rank that hangs (a collective another rank never
joins) prints its stack and fails the test after ``timeout_s``.

The ranks fork from a forkserver that imported torch and raytrainer once and never computed:
forking the pytest process itself deadlocks the child's first matrix multiply once the parent's
OpenMP pool is running. A 2-rank scenario then costs a second or two, where a Ray Train fit
costs 10+.

``GlooContext`` is the loop's RunContext for such a rank (the collectives of every runtime,
loop/context.py ProcessGroupContext).
"""
from __future__ import annotations

import datetime
import faulthandler
import multiprocessing
import os
import pickle
import queue
import socket
import time
import traceback

import cloudpickle
import torch
import torch.distributed as dist

from raytrainer.loop.context import ProcessGroupContext


class GlooContext(ProcessGroupContext):
    def __init__(self, rank: int, world_size: int):
        self.global_rank, self.world_size = rank, world_size
        self.local_rank, self.node_rank = rank, 0
        self.device = torch.device("cpu")

    def report(self, metrics, checkpoint_dir) -> None:
        pass

    def restart_checkpoint(self):
        return None

    def poll_stop(self, global_step, epoch_end):
        return None


class RankFailed(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn_bytes: bytes, rank: int, world_size: int, port: int, results, timeout_s: float, env: dict) -> None:
    # The forkserver's environment is the one it started with: the test's own (an S3 endpoint
    # set by a fixture, say) is the caller's at this call.
    os.environ.clear()
    os.environ.update(env)
    # A hung rank prints where it waits (stderr) before the parent gives up on it.
    faulthandler.dump_traceback_later(max(1.0, timeout_s - 3), exit=True)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=60))
        out = cloudpickle.loads(fn_bytes)(rank, world_size)
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException as e:  # noqa: BLE001 - sent to the parent, which raises it
        try:
            payload = pickle.dumps(e)
        except Exception:
            payload = pickle.dumps(RuntimeError(repr(e)))
        results.put((rank, "error", pickle.dumps((payload, traceback.format_exc()))))
    finally:
        results.close()
        results.join_thread()  # the result is flushed to the pipe before the process ends
        os._exit(0)  # no atexit handlers of the parent (pytest, Ray) in a forked child


def run_ranks(fn, world_size: int = 2, timeout_s: float = 60.0) -> list:
    mp = multiprocessing.get_context("forkserver")
    mp.set_forkserver_preload(["torch", "raytrainer", "raytrainer.loop.execute", "multirank"])
    results = mp.Queue()
    fn_bytes = cloudpickle.dumps(fn)
    port = _free_port()
    procs = [mp.Process(target=_entry, args=(fn_bytes, rank, world_size, port, results, timeout_s, dict(os.environ)), daemon=True)
             for rank in range(world_size)]
    for p in procs:
        p.start()
    got: dict[int, tuple[str, bytes]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < world_size:
            try:
                rank, status, payload = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(got))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout_s} s (a hang?)") from None
            got[rank] = (status, payload)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    for rank in range(world_size):
        status, payload = got[rank]
        if status == "error":
            error, tb = pickle.loads(payload)
            raise RankFailed(f"rank {rank} raised:\n{tb}") from pickle.loads(error)
    return [pickle.loads(got[rank][1]) for rank in range(world_size)]


def fit_on_ranks(trainer_factory, module_factory, loader_factory, world_size: int = 2,
                 timeout_s: float = 90.0) -> dict:
    """The final weights (rank 0's state_dict) of a fit on ``world_size`` gloo ranks: the very loop
    a Ray Train fit runs, without Ray's fixed cost. What an uninterrupted reference run of a Ray
    fault-tolerance test needs (its weights are bit-identical to the Ray fit's)."""
    def rank_fn(rank, world):
        from raytrainer.loop.execute import execute
        module = module_factory()
        execute(trainer_factory(), "fit", module, None, {"train": loader_factory()}, None, GlooContext(rank, world))
        # FSDP leaves DTensor shards in the module: gathered on every rank (a collective)
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                 for k, v in module.state_dict().items()}
        return state if rank == 0 else None
    return run_ranks(rank_fn, world_size, timeout_s)[0]
