"""Chaos soak: workers SIGKILLed at 6 random steps of one fit (either rank, any point of an
epoch); Ray restarts the worker group each time, the workers resume from the newest committed
checkpoint, and the final weights equal those of a run that was never killed. (Each kill costs a
worker-group restart, ~7 s here; 6 kills keep the suite's time while the schedule still covers
both ranks and every position in the checkpoint interval: see the CHAOS line it prints.)"""
import json
import os
import random
import signal

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import raytrainer as rt

from helpers import NoisyData

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

STEPS_PER_EPOCH, EPOCHS, CHECKPOINT_EVERY, KILLS = 10, 4, 3, 6




class Victim(rt.Module):
    def __init__(self, chaos_dir=None, kills=()):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1))
        self.chaos_dir, self.kills = chaos_dir, dict(kills)  # step -> rank to kill

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_train_start(self):
        if self.chaos_dir and self.global_rank == 0:  # where each attempt started
            with open(os.path.join(self.chaos_dir, "starts"), "a") as f:
                f.write(f"{self.global_step}\n")

    def on_train_batch_end(self, outputs, batch, batch_idx):
        step = self.global_step
        if self.chaos_dir and self.kills.get(step) == self.global_rank:
            marker = os.path.join(self.chaos_dir, f"killed-{step}")
            if not os.path.exists(marker):  # each kill once: the replay of this step goes on
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def _fit(tmp_path, name, model, max_failures=0):
    trainer = rt.Trainer(devices=2, max_epochs=EPOCHS, seed=0, storage_path=str(tmp_path), name=name,
                         logger=False, enable_progress_bar=False, max_failures=max_failures,
                         callbacks=[rt.callbacks.ModelCheckpoint(every_n_train_steps=CHECKPOINT_EVERY,
                                                                 save_top_k=1)])
    data = NoisyData(2 * 8 * STEPS_PER_EPOCH, features=4, seed=0)  # 2 workers x batch 8
    return trainer.fit(model, DataLoader(data, batch_size=8, shuffle=True))


def test_random_kills_end_bit_identical(ray_cluster, tmp_path):
    total = STEPS_PER_EPOCH * EPOCHS
    rng = random.Random(20261124)
    kills = {step: rng.randrange(2) for step in sorted(rng.sample(range(1, total), KILLS))}
    torch.manual_seed(0)
    straight = Victim()
    _fit(tmp_path, "straight", straight)

    chaos_dir = tmp_path / "chaos"
    chaos_dir.mkdir()
    torch.manual_seed(0)
    victim = Victim(str(chaos_dir), kills)
    result = _fit(tmp_path, "chaos", victim, max_failures=KILLS + 3)

    killed = sorted(int(p.name.split("-")[1]) for p in chaos_dir.glob("killed-*"))
    starts = [int(s) for s in (chaos_dir / "starts").read_text().split()]
    assert killed == sorted(kills) and len(starts) == KILLS + 1  # every kill happened and was survived
    assert result.global_step == total
    for (k, a), b in zip(straight.state_dict().items(), victim.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs after {KILLS} kills"
    # A kill inside step s loses the steps since the newest committed checkpoint, at most the
    # checkpoint interval (plus one when the previous commit was still in flight).
    replayed = [step - start for step, start in zip(killed, starts[1:])]
    assert all(0 < r <= CHECKPOINT_EVERY + 1 for r in replayed), list(zip(killed, starts[1:]))
    print("CHAOS " + json.dumps({"kills": len(killed), "kill_steps": killed, "ranks": [kills[s] for s in killed],
                                 "steps_replayed": sum(replayed), "per_kill": replayed,
                                 "total_steps": total}))
