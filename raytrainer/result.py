"""What ``Trainer.fit`` returns."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FitResult:
    metrics: dict[str, float] = field(default_factory=dict)  # last value of every logged metric
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None
    log_dir: str | None = None
    global_step: int = 0
    current_epoch: int = 0
    checkpoints: list[str] = field(default_factory=list)  # committed checkpoints of the run
    profile: dict | None = None  # Trainer(profiler=...): rank 0's stage table (raytrainer/profiler.py)
