"""Exact resume: a run stopped anywhere and resumed ends bit-identical to one that never stopped."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import raytrainer as rt
from raytrainer.checkpoint import store as ckpt_io

from helpers import NoisyData

TOTAL_STEPS = 26  # 10 batches per epoch: two full epochs and part of a third




class Net(rt.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).float(), y)
        self.log("train_loss", loss, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x).float(), y))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 7, 0.5),
                                                   "interval": "step"}}


class Crash(rt.Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise KeyboardInterrupt(f"simulated kill at step {self.at_step}")


def _fit(tmp_path, name, *, max_steps, ckpt_path=None, precision="32-true", callbacks=(), every=1):
    torch.manual_seed(0)
    model = Net()
    train = DataLoader(NoisyData(), batch_size=8, shuffle=True)
    val = DataLoader(NoisyData(24), batch_size=8)
    ckpt = rt.callbacks.ModelCheckpoint(every_n_train_steps=every, save_top_k=-1) if every else \
        rt.callbacks.ModelCheckpoint(save_on_train_epoch_end=True, save_top_k=-1)
    trainer = rt.Trainer(max_steps=max_steps, seed=3, precision=precision, val_check_interval=0.5,
                         launcher="local", storage_path=str(tmp_path), name=name, logger=False,
                         enable_progress_bar=False, callbacks=[ckpt, *callbacks])
    result = trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return model, result


def _assert_identical(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), f"{name} differs after resume"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("straight"), "straight", max_steps=TOTAL_STEPS)


# inside epoch 0; the last step of epoch 0 (before its end); inside epoch 1; right after the
# mid-epoch validation of epoch 1 (val_check_interval=0.5 -> after batch 5)
@pytest.mark.parametrize("stop", [3, 10, 13, 15])
def test_stop_and_resume_is_bit_identical(tmp_path, straight, stop):
    _fit(tmp_path, "run", max_steps=stop)
    assert ckpt_io.latest_committed(_cfg(tmp_path)).endswith(f"step={stop:09d}.ckpt")
    model, result = _fit(tmp_path, "run", max_steps=TOTAL_STEPS, ckpt_path="last")
    assert result.global_step == TOTAL_STEPS
    _assert_identical(straight[0], model)
    # epoch aggregates resume too: the last epoch's mean loss is the uninterrupted run's
    assert result.metrics["train_loss_epoch"] == pytest.approx(straight[1].metrics["train_loss_epoch"], abs=0)


def test_kill_and_resume_is_bit_identical(tmp_path, straight):
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, "run", max_steps=TOTAL_STEPS, callbacks=[Crash(17)])
    # the step-17 boundary was never reached: the newest committed checkpoint is step 16
    assert ckpt_io.latest_committed(_cfg(tmp_path)).endswith("step=000000016.ckpt")
    model, _ = _fit(tmp_path, "run", max_steps=TOTAL_STEPS, ckpt_path="last")
    _assert_identical(straight[0], model)


def test_resume_from_epoch_end_checkpoint(tmp_path, straight):
    _fit(tmp_path, "run", max_steps=12, every=None)  # saves at the epoch-end boundary only
    assert ckpt_io.latest_committed(_cfg(tmp_path)).endswith("step=000000010-epoch_end.ckpt")
    model, _ = _fit(tmp_path, "run", max_steps=TOTAL_STEPS, ckpt_path=ckpt_io.list_committed(_cfg(tmp_path))[-1])
    _assert_identical(straight[0], model)


def test_bf16_mixed_resume_is_bit_identical(tmp_path):
    ref, _ = _fit(tmp_path, "straight", max_steps=14, precision="bf16-mixed")
    _fit(tmp_path, "run", max_steps=6, precision="bf16-mixed")
    model, _ = _fit(tmp_path, "run", max_steps=14, precision="bf16-mixed", ckpt_path="last")
    _assert_identical(ref, model)


def test_resume_does_not_replay_batches(tmp_path):
    """Skipped batches are dropped as indices: the dataset is never asked for them."""
    _fit(tmp_path, "run", max_steps=7)
    fetched = []

    class Counting(NoisyData):
        def __getitem__(self, i):
            fetched.append(i)
            return super().__getitem__(i)

    torch.manual_seed(0)
    trainer = rt.Trainer(max_steps=8, seed=3, launcher="local", storage_path=str(tmp_path), name="run",
                         logger=False, enable_progress_bar=False,
                         callbacks=[rt.callbacks.ModelCheckpoint(every_n_train_steps=1, save_top_k=-1)])
    trainer.fit(Net(), DataLoader(Counting(), batch_size=8, shuffle=True), ckpt_path="last")
    assert len(fetched) == 8  # one batch of 8 samples, not 8 batches


def _cfg(tmp_path):
    return rt.Trainer(launcher="local", storage_path=str(tmp_path), name="run", logger=False,
                      enable_progress_bar=False).cfg
