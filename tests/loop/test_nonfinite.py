"""A NaN/inf loss stops training with an error naming the step; no checkpoint trained past it is
ever committed."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt


class Explodes(rt.Module):
    def __init__(self, at_step, value=float("nan")):
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.at_step, self.value = at_step, value

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = self.net(x).square().mean()
        return loss * self.value if self.global_step == self.at_step else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("async_checkpoint", [True, False])
def test_nonfinite_loss_stops_with_the_step_and_commits_nothing_after_it(tmp_path, value, async_checkpoint):
    trainer = rt.Trainer(launcher="local", max_epochs=3, log_every_n_steps=4, storage_path=str(tmp_path),
                         name="nan", logger=False, enable_progress_bar=False, async_checkpoint=async_checkpoint,
                         callbacks=[rt.callbacks.ModelCheckpoint(every_n_train_steps=3, save_top_k=-1)])
    data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=8)
    with pytest.raises(rt.NonFiniteLossError, match=rf"was {value} at step 7 \(epoch 0\)"):
        trainer.fit(Explodes(at_step=7, value=value), data)
    committed = [u.rsplit("/", 1)[-1] for u in rt.checkpoint.list_committed(f"{tmp_path}/nan/checkpoints")]
    assert committed == ["step=000000003.ckpt", "step=000000006.ckpt"]  # the boundary at step 9 never committed
    for name in committed:
        state = rt.load_checkpoint(f"{tmp_path}/nan/checkpoints/{name}")["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values())


def test_no_host_sync_per_step_for_the_check(tmp_path, monkeypatch):
    """The check reads losses back only on logging steps and checkpoint saves."""
    syncs = []
    real = torch.Tensor.tolist

    def counting_tolist(self):
        syncs.append(self.numel())
        return real(self)
    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    rt.Trainer(launcher="local", max_steps=20, log_every_n_steps=10, storage_path=str(tmp_path), logger=False,
               enable_progress_bar=False, enable_checkpointing=False).fit(
        Explodes(at_step=-1), DataLoader(TensorDataset(torch.randn(160, 4)), batch_size=8))
    assert len(syncs) <= 6  # 2 logging steps (metrics + losses) and the end of fit, not 20


def test_losses_of_shape_one_are_checked_too(tmp_path):
    """A loss with one element but shape (1,) is a valid loss; the batched check must read it."""
    class ShapeOne(Explodes):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx).reshape(1)

    trainer = rt.Trainer(launcher="local", max_steps=12, log_every_n_steps=5, storage_path=str(tmp_path),
                         logger=False, enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(rt.NonFiniteLossError, match="at step 7"):
        trainer.fit(ShapeOne(at_step=7), DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=8))
    ok = rt.Trainer(launcher="local", max_steps=12, log_every_n_steps=5, storage_path=str(tmp_path),
                    logger=False, enable_progress_bar=False, enable_checkpointing=False)
    assert ok.fit(ShapeOne(at_step=-1), DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=8)).global_step == 12
