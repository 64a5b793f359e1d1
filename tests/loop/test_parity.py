"""The loop's numerics, pinned against a hand-written torch loop."""
import copy

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt


class Net(rt.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)}


def _data(n=100):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, x[:, :1] * 2 - x[:, 1:2])


def hand_written(model, epochs, accumulate, clip):
    """What a careful user writes by hand: the reference for the Trainer."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    loader = DataLoader(_data(), batch_size=16, shuffle=True)
    torch.manual_seed(7)
    model.train()
    for _ in range(epochs):
        n = len(loader)
        for i, (x, y) in enumerate(loader):
            loss = nn.functional.mse_loss(model.net(x), y) / accumulate
            loss.backward()
            if (i + 1) % accumulate == 0 or i + 1 == n:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
        sched.step()
    return model


def test_fp32_accumulation_clipping_matches_hand_written_loop(tmp_path):
    torch.manual_seed(0)
    reference = Net()
    ours = copy.deepcopy(reference)
    hand_written(reference, epochs=3, accumulate=2, clip=0.5)

    trainer = rt.Trainer(max_epochs=3, accumulate_grad_batches=2, gradient_clip_val=0.5,
                         seed=7, launcher="local", storage_path=str(tmp_path), name="parity",
                         enable_progress_bar=False, logger=False, enable_checkpointing=False)
    result = trainer.fit(ours, DataLoader(_data(), batch_size=16, shuffle=True))

    assert result.global_step == 3 * 4  # 7 batches/epoch, windows of 2 -> 4 steps (last partial)
    for (name, a), b in zip(reference.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=f"{name} differs")
    moved = any(not torch.equal(a, b) for a, b in zip(Net().state_dict().values(), ours.state_dict().values()))
    assert moved
