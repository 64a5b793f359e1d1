"""RayTrainContext: the RunContext inside a Ray Train worker.

Ray Train has already set up the torch process group (gloo on CPU, NCCL on GPU); collectives go
through torch.distributed. Reports go to ``ray.train.report`` (a barrier: every rank calls it, at
checkpoints and validations only, since Ray drains reports on a poll).
"""
from __future__ import annotations

import os
import threading
import time

import torch

from raytrainer.checkpoint.resume import restart_checkpoint
from raytrainer.loop.context import ProcessGroupContext
from raytrainer.loop.preemption import CHECKPOINT, RESTART, STOP, StopFlag
from raytrainer.runtime.signals import worker_sigterm

class RayTrainContext(ProcessGroupContext):
    def __init__(self, use_gpu: bool, fit_token: str, run_cfg, report_to_ray: bool = True,
                 stop_source=None, report_queue=None):
        import ray.train
        tc = ray.train.get_context()
        self.world_size = tc.get_world_size()
        self.global_rank = tc.get_world_rank()
        self.local_rank = tc.get_local_rank()
        self.node_rank = tc.get_node_rank()
        if use_gpu:
            import ray.train.torch
            self.device = ray.train.torch.get_device()
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.fit_token = fit_token
        self._cfg = run_cfg
        self._report_to_ray = report_to_ray
        self._report_queue = report_queue if self.global_rank == 0 else None
        # Stop requests: the driver's SIGTERM/Ctrl-C arrives through `stop_source` (polled by
        # rank 0 in a thread); Ray's drain notice through ray.train.get_preemption_info.
        self.stop_flag = StopFlag()
        # A SIGTERM to this worker process (runtime/signals.py): installed by a worker-group
        # callback before training starts; its request stays readable after a second SIGTERM
        # has put Ray's handler back.
        sigterm = worker_sigterm()
        self._sigterm_flag = sigterm.flag if sigterm is not None else StopFlag()
        self._stop_every = max(1, run_cfg.log_every_n_steps)
        self._drain_watch = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1") != "0"
        self._drain_poll_s = float(os.environ.get("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "5"))
        self._last_drain_check = time.monotonic()
        self._drain_checkpointed = False
        if stop_source is not None and self.global_rank == 0:
            threading.Thread(target=_poll_driver, args=(stop_source, self.stop_flag), daemon=True,
                             name="raytrainer-stop-poll").start()

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if self._report_to_ray:
            import ray.train
            payload = dict(metrics)
            if checkpoint_dir is not None:
                payload["checkpoint_path"] = checkpoint_dir
            ray.train.report(payload)
        if self._report_queue is not None:  # a multi-worker sweep trial (tune/trial.py fit_on_workers)
            self._report_queue.put((dict(metrics), checkpoint_dir))

    def poll_stop(self, global_step: int, epoch_end: bool) -> tuple[str, str] | None:
        """Ranks agree every log_every_n_steps steps and at epoch ends (one 3-element all-reduce);
        rank 0 also decides, by the clock, when everyone asks Ray about node drains (that call is
        a barrier through Ray's controller, too costly for every agreement point)."""
        if not (epoch_end or global_step % self._stop_every == 0):
            return None
        now = time.monotonic()
        ask_ray = (self._drain_watch and not self._drain_checkpointed and self.global_rank == 0
                   and now - self._last_drain_check >= self._drain_poll_s)
        # [driver stop, ask Ray about drains, 1 + rank of a worker that got SIGTERM]
        flags = torch.tensor([float(self.stop_flag.reason is not None), float(ask_ray),
                              float(self.global_rank + 1 if self._sigterm_flag.reason is not None else 0)])
        stop, ask_ray, terminated = self.all_reduce(flags, "max").tolist()
        if stop:
            return STOP, self.broadcast_object(self.stop_flag.reason)
        if terminated:
            # Restarts left and a checkpoint to restart from: commit, end, let Ray restart the
            # group. Otherwise stop as for the driver's SIGTERM (fit raises Preempted).
            if self._cfg.max_failures != 0 and self._cfg.enable_checkpointing:
                return RESTART, f"SIGTERM to the worker of rank {int(terminated) - 1}"
            return STOP, "SIGTERM"
        if ask_ray:
            self._last_drain_check = now
            import ray.train
            info = ray.train.get_preemption_info()
            if info is not None:
                self._drain_checkpointed = True  # one just-in-time checkpoint per drain notice
                return CHECKPOINT, f"Ray drain notice for node(s) {', '.join(info.preempted_node_ids)}"
        return None

    def restart_checkpoint(self) -> str | None:
        """After a worker-group restart: the newest checkpoint this fit committed (on the first
        attempt there is none, and the checkpoint the fit started from applies)."""
        return restart_checkpoint(self._cfg, self.fit_token)


def _poll_driver(stop_source, flag: StopFlag, wait_s: float = 5.0, retry_s: float = 0.5) -> None:
    """Rank 0: wait on the driver's mailbox for a stop request until one comes (or the process
    ends). The mailbox answers as soon as the request is left there, so a Ctrl-C reaches the
    next agreement point of poll_stop without a polling delay."""
    import ray
    while flag.reason is None:
        try:
            reason = ray.get(stop_source.wait_for_stop(wait_s), timeout=wait_s + 10)
        except Exception:  # the driver is gone or slow: the worker group is torn down anyway
            time.sleep(retry_s)
            continue
        if reason:
            flag.request(reason)
            return
