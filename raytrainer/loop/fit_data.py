"""The loaders of one fit on this rank: the training data and the validation loaders, built from
what the user gave (explicit loaders, else the DataModule's or the Module's hooks) and, with
``reload_dataloaders_every_n_epochs``, built again from the hooks where Lightning does it.

Lightning's schedule: the training loader at the start of every N-th epoch after the last build,
before ``on_train_epoch_start``; the validation loaders at the first validation N epochs after
theirs. Explicit loaders are the same objects at every reload (as in Lightning). A resumed fit
builds its loaders again after the checkpoint is restored, so the hooks see the resumed epoch;
its position inside the epoch is kept by the run (``Run.epoch_iterator``), not by the loader."""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch.utils.data import DataLoader

from raytrainer.data import RayDatasetIterable
from raytrainer.errors import ConfigError
from raytrainer.loop.loaders import TrainData, limited_length, rebuild_dataloader, resolve_loaders, shard_eval_loader
from raytrainer.module import is_overridden
from raytrainer.utilities import seed_dataloader_worker


class FitData:
    def __init__(self, run, given: dict[str, Any]):
        self.run, self.given = run, given
        self.reload_every = run.cfg.reload_dataloaders_every_n_epochs
        self.train: TrainData | None = None
        self.val: list = []
        # The epoch whose hooks built the loaders; None: built before a resume's restore, due again.
        self.train_epoch: int | None = None
        self.val_epoch: int | None = None

    def load(self) -> None:
        """Both, at fit start: sized before configure_optimizers (estimated_stepping_batches)."""
        self.train, train_size = self._build_train()
        self.val, val_sizes = self._build_val()
        self.run.set_data_sizes(train_size, val_sizes)
        self.train_epoch = self.val_epoch = self.run.progress.current_epoch

    def restored(self) -> None:
        """The checkpoint moved the run to another epoch: the hooks are called again for it."""
        epoch = self.run.progress.current_epoch
        if self.reload_every and epoch != self.train_epoch:
            self.train_epoch = self.val_epoch = None

    def reload_train_if_due(self) -> None:
        epoch = self.run.progress.current_epoch
        if self._due(self.train_epoch, epoch):
            self.train, size = self._build_train()
            self.run.set_data_sizes(size, self.run.num_val_batches)
            self.train_epoch = epoch

    def reload_val_if_due(self) -> None:
        epoch = self.run.progress.current_epoch
        if self._due(self.val_epoch, epoch):
            self.val, sizes = self._build_val()
            self.run.set_data_sizes(self.run.num_training_batches, sizes)
            self.val_epoch = epoch

    def _due(self, built_at: int | None, epoch: int) -> bool:
        return bool(self.reload_every) and (built_at is None or epoch - built_at >= self.reload_every)

    def _build_train(self) -> tuple[TrainData, float]:
        run, cfg, ctx = self.run, self.run.cfg, self.run.ctx
        loaders = self._resolve("train")
        if loaders is None:
            raise ValueError("fit needs data: pass train_dataloaders= / dataloaders=, a datamodule with "
                             "train_dataloader(), or define train_dataloader() on the module")
        train = TrainData(loaders[0], ctx.world_size, ctx.global_rank, seed=cfg.seed or 0,
                          use_distributed_sampler=cfg.use_distributed_sampler, overfit=bool(cfg.overfit_batches))
        return train, limited_length(train, cfg.limit_train_batches)

    def _build_val(self) -> tuple[list, list[float]]:
        run, cfg, ctx = self.run, self.run.cfg, self.run.ctx
        loaders = self._resolve("val") or []
        if loaders and not is_overridden("validation_step", run.module, object):
            warnings.warn("validation loaders were given but the module has no validation_step; "
                          "validation is skipped")
            loaders = []
        loaders = [shard_eval_loader(dl, ctx.world_size, ctx.global_rank, cfg.use_distributed_sampler)
                   for dl in loaders]
        sizes = [limited_length(dl, cfg.limit_val_batches, "limit_val_batches") for dl in loaders]
        return loaders, largest_on_any_rank(ctx, sizes)

    def _resolve(self, kind: str) -> list | None:
        run = self.run
        loaders = seeding_workers(run.trainer, resolve_loaders(kind, self.given.get(kind), run.datamodule, run.module))
        if self.reload_every and self.given.get(kind) is None and \
                any(isinstance(dl, RayDatasetIterable) for dl in loaders or ()):
            raise ConfigError(ray_dataset_reload_refusal(self.reload_every))
        return loaders


def ray_dataset_reload_refusal(every: int) -> str:
    return (f"Trainer(reload_dataloaders_every_n_epochs={every}) cannot reload a Ray Dataset: Ray Train "
            "splits it across the workers once per run. Vary the rows per epoch inside the dataset's "
            "pipeline, or return a torch DataLoader from the hook")


def seeding_workers(trainer, loaders: list | None) -> list | None:
    """``seed_everything(workers=True)``: DataLoader worker processes seed python and numpy too."""
    if not loaders or not trainer._seed_workers:
        return loaders
    return [rebuild_dataloader(dl, worker_init_fn=seed_dataloader_worker)
            if isinstance(dl, DataLoader) and dl.num_workers > 0 and dl.worker_init_fn is None else dl
            for dl in loaders]


def largest_on_any_rank(ctx, sizes: list[float]) -> list[float]:
    """Evaluation shards may differ by a batch between ranks (exact evaluation; a rank may have
    none). What the loop and callbacks decide from ``num_val_batches`` (is there a validation?
    save at the step or at the epoch's end?) must be the same on every rank, or they part ways
    at the next collective: every rank reports the largest shard (one all-reduce)."""
    if ctx.world_size == 1 or not sizes:
        return sizes
    unknown = 2 ** 62
    largest = ctx.all_reduce(torch.tensor([unknown if math.isinf(n) else int(n) for n in sizes],
                                          dtype=torch.int64, device=ctx.device), "max").tolist()
    return [math.inf if n == unknown else n for n in largest]
