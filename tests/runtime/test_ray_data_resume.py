"""Ray Dataset input: a row count the workers cannot split evenly still gives every worker the same
number of steps (no DDP hang), and a worker killed mid-epoch (shuffled data, epochs reshuffled)
restarts and trains every later step on the rows an uninterrupted run used, to the bit."""
import json
import os
import signal

import pytest
import torch
from torch import nn

import raytrainer as rt

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
ROWS, BATCH, EPOCHS = 97, 8, 2  # uneven: 48 rows per worker, 6 steps per epoch, 12 in all
KILL_AT = 9                     # rank 1 dies after step 9: mid-epoch 1 (an epoch already reshuffled)


class RowRecorder(rt.Module):
    def __init__(self, out_dir, kill_at=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.out_dir, self.kill_at = out_dir, kill_at

    def training_step(self, batch, batch_idx):
        with open(os.path.join(self.out_dir, f"rows-{self.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps([self.global_step + 1, self.current_epoch, batch["i"].tolist()]) + "\n")
        return nn.functional.mse_loss(self.net(batch["x"]), batch["y"])

    def on_train_batch_end(self, outputs, batch, batch_idx):
        marker = os.path.join(self.out_dir, "killed")
        if self.kill_at and self.global_rank == 1 and self.global_step == self.kill_at and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _rows(out_dir, rank):
    """step -> (epoch, row ids) as trained; a replayed step's last record wins."""
    with open(os.path.join(out_dir, f"rows-{rank}.jsonl")) as f:
        return {step: (epoch, ids) for step, epoch, ids in map(json.loads, f)}


def _fit(tmp_path, name, kill_at=None):
    import ray.data
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, 4, generator=g)
    ds = ray.data.from_items([{"x": x[i].tolist(), "y": [float(x[i].sum())], "i": i} for i in range(ROWS)])
    out_dir = tmp_path / name
    out_dir.mkdir()
    torch.manual_seed(0)
    model = RowRecorder(str(out_dir), kill_at)
    trainer = rt.Trainer(devices=2, max_epochs=EPOCHS, seed=7, storage_path=str(tmp_path), name=name, logger=False,
                         enable_progress_bar=False, max_failures=1 if kill_at else 0,
                         callbacks=[rt.callbacks.ModelCheckpoint(every_n_train_steps=2, save_top_k=1)])
    loader = rt.RayDataLoader(ds, batch_size=BATCH, shuffle=True, dtypes={"x": torch.float32, "y": torch.float32, "i": torch.int64})
    result = trainer.fit(model, loader)
    return model, result, str(out_dir)


def test_shuffled_ray_dataset_worker_killed_mid_epoch_resumes_on_the_same_rows(ray_cluster, tmp_path):
    straight, result, straight_dir = _fit(tmp_path, "straight")
    assert result.global_step == EPOCHS * 6
    rows = [_rows(straight_dir, r) for r in (0, 1)]
    assert sorted(rows[0]) == sorted(rows[1]) == list(range(1, 13))  # the same steps on both ranks
    for epoch in range(EPOCHS):  # equal, disjoint shards of the uneven count, each epoch
        per_rank = [[i for _, (e, ids) in r.items() if e == epoch for i in ids] for r in rows]
        assert len(per_rank[0]) == len(per_rank[1]) == 48 and not set(per_rank[0]) & set(per_rank[1]), epoch
    order = [[i for _, (e, ids) in sorted(rows[0].items()) if e == epoch for i in ids] for epoch in range(EPOCHS)]
    assert order[0] != order[1] and order[0] != sorted(order[0])  # shuffled, anew each epoch

    killed, result, killed_dir = _fit(tmp_path, "killed", kill_at=KILL_AT)
    assert os.path.exists(os.path.join(killed_dir, "killed")) and result.global_step == 12
    for rank in (0, 1):  # every step, replayed ones included, trained on the uninterrupted run's rows
        assert _rows(killed_dir, rank) == rows[rank], rank
    for (k, v), w in zip(straight.state_dict().items(), killed.state_dict().values()):
        assert torch.equal(v, w), k
