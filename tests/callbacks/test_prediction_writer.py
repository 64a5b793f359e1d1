"""Prediction writers: Lightning's BasePredictionWriter (side by side with Lightning) and
TorchPredictionWriter, which writes every rank's predictions to storage (local, s3://)."""
from __future__ import annotations

import pytest
import torch
from helpers import make_trainer
from multirank import GlooContext, run_ranks
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt
from raytrainer.callbacks import BasePredictionWriter, TorchPredictionWriter
from raytrainer.loop.execute import execute

pytestmark = pytest.mark.timeout(120)


def predict_loader(n: int = 23, batch_size: int = 5) -> DataLoader:
    return DataLoader(TensorDataset(torch.arange(n, dtype=torch.float32).reshape(n, 1)), batch_size=batch_size)


class Doubler:
    """The module code both trainers run."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(1, 1)
        with torch.no_grad():
            self.layer.weight.fill_(2.0)
            self.layer.bias.zero_()

    def forward(self, x):
        return self.layer(x)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch[0])


class RtDoubler(Doubler, rt.Module):
    pass


class Recording:
    """What a writer is handed, as a user's own subclass records it."""

    def __init__(self, write_interval):
        super().__init__(write_interval)
        self.batches, self.epochs = [], []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self.batches.append((prediction.flatten().tolist(), list(batch_indices), batch_idx, dataloader_idx))

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        self.epochs.append(([p.flatten().tolist() for p in predictions], [list(b) for b in batch_indices[0]]))


class RtRecording(Recording, BasePredictionWriter):
    pass


def test_base_prediction_writer_receives_what_lightning_hands_it(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")

    class LitDoubler(Doubler, pl.LightningModule):
        pass

    class LitRecording(Recording, pl.callbacks.BasePredictionWriter):
        pass

    ours, theirs = RtRecording("batch_and_epoch"), LitRecording("batch_and_epoch")
    got = make_trainer(tmp_path, callbacks=[ours]).predict(RtDoubler(), predict_loader())
    want = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, callbacks=[theirs],
                      default_root_dir=str(tmp_path)).predict(LitDoubler(), predict_loader())
    assert [p.tolist() for p in got] == [p.tolist() for p in want]
    assert ours.batches == theirs.batches and len(ours.batches) == 5
    assert ours.epochs == theirs.epochs and len(ours.epochs) == 1


def test_write_interval_is_checked():
    with pytest.raises(rt.ConfigError, match=r"write_interval='step'.*\['batch', 'epoch', 'batch_and_epoch'\]"):
        TorchPredictionWriter("out", write_interval="step")


def test_torch_writer_without_returned_predictions_reads_back_in_order(tmp_path):
    writer = TorchPredictionWriter(tmp_path / "preds")
    assert make_trainer(tmp_path, callbacks=[writer]).predict(RtDoubler(), predict_loader(),
                                                               return_predictions=False) is None
    assert writer.files == [str(tmp_path / "preds" / "predictions-rank00000.pt")]
    back = TorchPredictionWriter.read(tmp_path / "preds")
    assert torch.equal(torch.cat(back), 2 * torch.arange(23.0).reshape(23, 1))


def test_torch_writer_per_batch_files_carry_their_dataset_indices(tmp_path):
    writer = TorchPredictionWriter(tmp_path / "preds", write_interval="batch")
    make_trainer(tmp_path, callbacks=[writer]).predict(RtDoubler(), predict_loader(), return_predictions=False)
    assert len(writer.files) == 5
    for file in writer.files:
        saved = torch.load(file)
        assert saved["prediction"].flatten().tolist() == [2.0 * i for i in saved["batch_indices"]]


def test_two_ranks_write_their_parts_to_s3_and_the_reader_puts_them_in_order(tmp_path, s3_env):
    output_dir = f"{s3_env}/predictions"

    def rank_fn(rank, world_size):
        writer = TorchPredictionWriter(output_dir)
        trainer = make_trainer(tmp_path, callbacks=[writer])
        trainer._return_predictions = False  # as predict(return_predictions=False) sets it
        execute(trainer, "predict", RtDoubler(), None, {"predict": predict_loader()}, None,
                GlooContext(rank, world_size))
        return writer.files
    files, _ = run_ranks(rank_fn)
    assert files == [f"{output_dir}/predictions-rank0000{r}.pt" for r in (0, 1)]  # rank 0 lists all
    back = TorchPredictionWriter.read(output_dir)
    assert torch.equal(torch.cat(back), 2 * torch.arange(23.0).reshape(23, 1))
