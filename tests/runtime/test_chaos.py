"""Chaos: workers SIGKILLed at 4 steps of one fit (both ranks, every position in the checkpoint
interval, every epoch); Ray restarts the worker group each time, the workers resume from the
newest committed checkpoint, and the final weights equal those of a run that was never killed
(the same loop on 2 gloo ranks: the reference costs seconds, not a Ray fit). Each kill costs a
worker-group restart, ~7 s here: 4 of them cover what the test is for (see the CHAOS line it
prints)."""
import json
import os
import signal

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import raytrainer as rt

from helpers import NoisyData

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

STEPS_PER_EPOCH, EPOCHS, CHECKPOINT_EVERY = 10, 4, 3
# step -> rank killed right after it: steps 5, 12, 22, 31 sit 2, 0, 1, 1 steps past a checkpoint
# boundary (every 3), one in each epoch, alternating ranks
KILL_AT = {5: 1, 12: 0, 22: 1, 31: 0}
KILLS = len(KILL_AT)




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


def _trainer(tmp_path, name, max_failures=0, devices=2, **kwargs):
    return rt.Trainer(devices=devices, max_epochs=EPOCHS, seed=0, storage_path=str(tmp_path), name=name, logger=False,
                      enable_progress_bar=False, max_failures=max_failures,
                      callbacks=[rt.callbacks.ModelCheckpoint(every_n_train_steps=CHECKPOINT_EVERY, save_top_k=1)],
                      **kwargs)


def _loader():
    data = NoisyData(2 * 8 * STEPS_PER_EPOCH, features=4, seed=0)  # 2 workers x batch 8
    return DataLoader(data, batch_size=8, shuffle=True)


def _victim(*args):
    torch.manual_seed(0)
    return Victim(*args)


def test_kills_end_bit_identical(ray_cluster, tmp_path):
    from multirank import fit_on_ranks

    total = STEPS_PER_EPOCH * EPOCHS
    straight = fit_on_ranks(lambda: _trainer(tmp_path, "straight", launcher="local", devices=1), _victim, _loader)

    chaos_dir = tmp_path / "chaos"
    chaos_dir.mkdir()
    victim = _victim(str(chaos_dir), KILL_AT)
    result = _trainer(tmp_path, "chaos", max_failures=KILLS + 3).fit(victim, _loader())

    killed = sorted(int(p.name.split("-")[1]) for p in chaos_dir.glob("killed-*"))
    starts = [int(s) for s in (chaos_dir / "starts").read_text().split()]
    assert killed == sorted(KILL_AT) and len(starts) == KILLS + 1  # every kill happened and was survived
    assert result.global_step == total
    for (k, a), b in zip(straight.items(), victim.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs after {KILLS} kills"
    # A kill inside step s loses the steps since the newest committed checkpoint, at most the
    # checkpoint interval (plus one when the previous commit was still in flight).
    replayed = [step - start for step, start in zip(killed, starts[1:])]
    assert all(0 < r <= CHECKPOINT_EVERY + 1 for r in replayed), list(zip(killed, starts[1:]))
    print("CHAOS " + json.dumps({"kills": len(killed), "kill_steps": killed, "ranks": [KILL_AT[s] for s in killed],
                                 "steps_replayed": sum(replayed), "per_kill": replayed,
                                 "total_steps": total}))
