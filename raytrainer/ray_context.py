"""RayTrainContext: the RunContext inside a Ray Train worker.

Ray Train has already set up the torch process group (gloo on CPU, NCCL on GPU); collectives go
through torch.distributed. Reports go to ``ray.train.report`` (a barrier: every rank calls it, at
checkpoints and validations only, since Ray drains reports on a poll).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class RayTrainContext:
    def __init__(self, use_gpu: bool, fit_token: str, run_cfg, report_to_ray: bool = True):
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
        self._distributed = dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self._distributed:
            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if not self._distributed:
            return tensor
        out = tensor.detach().clone()
        if dist.get_backend() == "nccl" and out.device.type != "cuda":
            out = out.to(self.device)
        dist.all_reduce(out, op=_OPS[op])
        return out.to(tensor.device)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self._distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self._distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if self._report_to_ray:
            import ray.train
            payload = dict(metrics)
            if checkpoint_dir is not None:
                payload["checkpoint_path"] = checkpoint_dir
            ray.train.report(payload)

    def latest_checkpoint(self) -> str | None:
        """After a worker-group restart: the newest checkpoint this fit committed (on the first
        attempt there is none, and the user's ckpt_path applies)."""
        from raytrainer import checkpoint as ckpt_io
        return ckpt_io.latest_committed(self._cfg, self._cfg.storage_options, fit_token=self.fit_token)
