"""launcher="local": the run in this process, on one device. SIGTERM and Ctrl-C during a fit stop
it at the next step with a committed checkpoint (runtime/signals.py)."""
from __future__ import annotations

from raytrainer.loop.context import LocalContext, resolve_device
from raytrainer.loop.execute import execute
from raytrainer.loop.precision import check_precision_supported
from raytrainer.loop.preemption import StopFlag
from raytrainer.runtime.preflight import log_resolved
from raytrainer.runtime.signals import stop_on_signals


def launch_local(trainer, stage: str, module, datamodule, loaders: dict, resume_uri: str | None) -> dict:
    cfg = trainer.cfg
    device = resolve_device(cfg.accelerator)
    check_precision_supported(cfg.precision, device.type)
    log_resolved(trainer, stage, f"launcher=local device={device} workers=1")
    if stage != "fit":
        out = execute(trainer, stage, module, datamodule, loaders, resume_uri, LocalContext(device))
        if "predictions" in out:
            out["predictions"] = [out["predictions"]]  # the one rank's part (as launch_ray returns all)
        return out
    flag = StopFlag()  # SIGTERM / Ctrl-C: stop at the next step with a committed checkpoint
    with stop_on_signals(flag):
        return execute(trainer, stage, module, datamodule, loaders, resume_uri, LocalContext(device, flag))
