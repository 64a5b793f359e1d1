"""Prediction writers: predictions go to storage from every worker, for outputs too big to send
back to the driver.

``BasePredictionWriter`` is Lightning's (subclass it and implement ``write_on_batch_end`` and/or
``write_on_epoch_end``); ``TorchPredictionWriter`` is raytrainer's ready one: every rank writes
its predictions with ``torch.save`` under ``output_dir`` (any fsspec URI, ``s3://`` included,
with the Trainer's ``storage_options``), the driver's instance lists the files after
``predict``, and ``TorchPredictionWriter.read(output_dir)`` puts them back in dataset order.
"""
from __future__ import annotations

import io
from typing import Any

import torch

from raytrainer import storage
from raytrainer.callbacks.base import Callback
from raytrainer.errors import ConfigError
from raytrainer.loop.evaluate import merge_predictions

WRITE_INTERVALS = ("batch", "epoch", "batch_and_epoch")


class BasePredictionWriter(Callback):
    """Lightning's ``BasePredictionWriter(write_interval="batch" | "epoch" | "batch_and_epoch")``.
    ``batch_indices`` are the dataset indices of a batch's samples (None for a loader that is
    not a map-style DataLoader); with several workers each rank writes its own part."""

    def __init__(self, write_interval: str = "batch"):
        if write_interval not in WRITE_INTERVALS:
            raise ConfigError(f"{type(self).__name__}(write_interval={write_interval!r}) is invalid: "
                              f"expected one of {list(WRITE_INTERVALS)}")
        self.interval = write_interval

    @property
    def keeps_predictions(self) -> bool:
        """An epoch-interval writer needs the epoch's predictions kept, even with
        ``predict(return_predictions=False)`` (read by the loop)."""
        return self.interval != "batch"

    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices: list[int] | None,
                           batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        raise NotImplementedError(f"{type(self).__name__}: implement write_on_batch_end for write_interval="
                                  f"{self.interval!r}")

    def write_on_epoch_end(self, trainer, pl_module, predictions: list, batch_indices: list) -> None:
        raise NotImplementedError(f"{type(self).__name__}: implement write_on_epoch_end for write_interval="
                                  f"{self.interval!r}")

    def on_predict_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        if self.interval in ("batch", "batch_and_epoch"):
            self.write_on_batch_end(trainer, pl_module, outputs, trainer.predict_loop.current_batch_indices,
                                    batch, batch_idx, dataloader_idx)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if self.interval in ("epoch", "batch_and_epoch"):
            loop = trainer.predict_loop
            self.write_on_epoch_end(trainer, pl_module, loop.predictions, loop.epoch_batch_indices)


class TorchPredictionWriter(BasePredictionWriter):
    """Every rank writes ``{output_dir}/predictions-rank{rank:05d}.pt`` (``write_interval="epoch"``,
    the default: each rank's outputs, batch indices and order in one file) or one file per batch
    (``"batch"``: ``dataloader{d}-rank{r:05d}-batch{b:06d}.pt``, for predictions too big to keep).
    After ``trainer.predict``, ``files`` lists what every rank wrote."""

    def __init__(self, output_dir: str, write_interval: str = "epoch"):
        super().__init__(write_interval)
        self.output_dir = storage.normalize(str(output_dir))
        self.files: list[str] = []

    @property
    def state_key(self) -> str:
        return f"{type(self).__qualname__}{{output_dir={self.output_dir}}}"

    def state_dict(self) -> dict:
        return {"files": list(self.files)}

    def load_state_dict(self, state: dict) -> None:
        self.files = list(state.get("files", []))

    def on_predict_start(self, trainer, pl_module) -> None:
        self.files = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        name = f"dataloader{dataloader_idx}-rank{trainer.global_rank:05d}-batch{batch_idx:06d}.pt"
        self._save(trainer, name, {"prediction": prediction, "batch_indices": batch_indices})

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        loop = trainer.predict_loop
        self._save(trainer, f"predictions-rank{trainer.global_rank:05d}.pt",
                   {"outputs": loop.outputs, "batch_indices": batch_indices, "order": loop.order})

    def on_predict_end(self, trainer, pl_module) -> None:
        # Every rank calls this: rank 0's list (sent back to the driver) holds all ranks' files.
        self.files = sorted(f for files in trainer.strategy.all_gather_object(self.files) for f in files)

    def _save(self, trainer, name: str, payload: dict) -> None:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        uri = storage.join(self.output_dir, name)
        fs, path = storage.filesystem(uri, trainer.cfg.storage_options)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, buffer.getvalue())
        self.files.append(uri)

    @staticmethod
    def read(output_dir: str, storage_options: dict | None = None) -> list:
        """The predictions an epoch-interval writer wrote, from every rank, in dataset order (as
        ``trainer.predict`` returns them)."""
        fs, path = storage.filesystem(storage.normalize(str(output_dir)), storage_options)
        shards = []
        for file in sorted(fs.glob(f"{path.rstrip('/')}/predictions-rank*.pt")):
            with fs.open(file, "rb") as f:
                shards.append(torch.load(io.BytesIO(f.read()), weights_only=False))
        if not shards:
            raise FileNotFoundError(f"no predictions-rank*.pt under {output_dir}")
        return merge_predictions(shards)
