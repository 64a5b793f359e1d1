"""What users hand the Trainer for data: ``DataModule`` (Lightning's), ``RayDataLoader`` (a Ray
Dataset to be split across workers). How the loop iterates them (sharding, exact resume) is
loop/loaders.py; how Ray Train splits them is runtime/ray_data.py.
"""
from __future__ import annotations

import zlib
from typing import Any, Mapping

from raytrainer.checkpoint.lightning_file import read_any
from raytrainer.module import collect_init_args, construct_from_hparams
from raytrainer.runtime.ray_internals import copy_dataset
from raytrainer.utilities import AttributeDict, move_to_device


class DataModule:
    """Lightning-style data container: subclass and implement the ``*_dataloader`` you need.

    ``prepare_data`` runs once per node before any worker reads data (downloads, preprocessing);
    ``setup(stage)`` runs in every worker.

    A DataModule whose ``*_dataloader()`` return ``rt.RayDataLoader``s sets ``ray_datasets = True``:
    with the Ray launcher those methods are then called on the driver (Ray Train must own the
    datasets to split them across workers), after Ray is started.
    """

    ray_datasets = False

    def __init__(self) -> None:
        self._rt_hparams = AttributeDict()

    def save_hyperparameters(self, *args: Any, ignore=None) -> None:
        self._hparams_store().update(collect_init_args(self, args, ignore))

    def _hparams_store(self) -> AttributeDict:
        if not hasattr(self, "_rt_hparams"):  # a subclass that skipped super().__init__()
            self._rt_hparams = AttributeDict()
        return self._rt_hparams

    @property
    def hparams(self) -> AttributeDict:
        return self._hparams_store()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str, map_location: Any = None, weights_only: bool | None = None,
                             storage_options: Mapping | None = None, **kwargs: Any) -> "DataModule":
        """A new datamodule from a checkpoint, as Lightning's: ``cls`` built from the saved
        ``datamodule_hyper_parameters`` (``kwargs`` override them), then its saved state loaded.
        Reads what ``Module.load_from_checkpoint`` reads."""
        checkpoint = read_any(checkpoint_path, map_location, weights_only, storage_options)
        datamodule = construct_from_hparams(cls, checkpoint.get("datamodule_hyper_parameters"), kwargs)
        if cls.__qualname__ in checkpoint:
            datamodule.load_state_dict(checkpoint[cls.__qualname__])
        return datamodule

    @property
    def trainer(self):
        """The Trainer running it, set before ``setup`` (None outside a run), as in Lightning."""
        return self.__dict__.get("_rt_trainer")

    @trainer.setter
    def trainer(self, trainer) -> None:
        self.__dict__["_rt_trainer"] = trainer

    def __getstate__(self) -> dict:  # to Ray workers without the driver's Trainer
        return {k: v for k, v in self.__dict__.items() if k != "_rt_trainer"}

    def prepare_data(self) -> None: ...
    def setup(self, stage: str) -> None: ...
    def teardown(self, stage: str) -> None: ...

    # Used instead of the module's when overridden here (Lightning's rule).
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch

    def transfer_batch_to_device(self, batch: Any, device, dataloader_idx: int) -> Any:
        return move_to_device(batch, device)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class RayDataLoader:
    """A ``ray.data.Dataset`` to be iterated per worker with ``iter_torch_batches``.

    With ``launcher="ray"`` the dataset is handed to Ray Train and split across workers; each
    worker iterates its shard. Batches arrive as dicts of tensors.
    """

    def __init__(self, dataset: Any, batch_size: int = 32, shuffle: bool = False,
                 local_shuffle_buffer_size: int | None = None, drop_last: bool = False,
                 prefetch_batches: int = 1, collate_fn: Any = None, dtypes: Any = None):
        if not hasattr(dataset, "iter_torch_batches"):
            raise TypeError(f"RayDataLoader needs a ray.data.Dataset, got {type(dataset).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"RayDataLoader(batch_size={batch_size!r}): expected an int >= 1")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.local_shuffle_buffer_size = local_shuffle_buffer_size
        self.drop_last = drop_last
        self.prefetch_batches = prefetch_batches
        self.collate_fn = collate_fn
        self.dtypes = dtypes  # e.g. torch.float32 or {"x": torch.float32}: Ray keeps float64 otherwise


class RayDatasetIterable:
    """A RayDataLoader iterated in this process (launcher="local", sweep trials): each pass over
    it is one epoch of ``iter_torch_batches`` over the whole dataset, in a fixed order (shuffled
    by a seed of the run and the epoch), so a mid-epoch resume replays exactly."""

    exact_replay = True

    def __init__(self, loader: RayDataLoader):
        self.loader = loader
        self.seed, self.epoch = 0, 0  # set by TrainData

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        o = self.loader
        epoch_seed = zlib.crc32(f"{self.seed}/{self.epoch}".encode())
        dataset = o.dataset.random_shuffle(seed=epoch_seed) if o.shuffle else o.dataset
        dataset = copy_dataset(dataset)
        dataset.context.execution_options.preserve_order = True
        return iter(dataset.iter_torch_batches(
            batch_size=o.batch_size, prefetch_batches=o.prefetch_batches,
            local_shuffle_buffer_size=o.local_shuffle_buffer_size,
            local_shuffle_seed=epoch_seed if o.local_shuffle_buffer_size else None,
            drop_last=o.drop_last, collate_fn=o.collate_fn, dtypes=o.dtypes))
