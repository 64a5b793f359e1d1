"""Ray Datasets under launcher="ray": handed to Ray Train, split across workers, resumable exactly.

The driver moves every ``rt.RayDataLoader`` out of the job and gives its dataset to Ray Train;
each worker iterates its shard (``get_dataset_shard(...).iter_torch_batches``). For a resume —
a restarted worker group (``max_failures``) or ``ckpt_path`` — to continue with the very batches
an uninterrupted run would have seen, three things must repeat exactly:

* **the order**: the training split runs with ``preserve_order=True`` (Ray Data then ignores
  locality and hands blocks to the split with the fewest rows so far: deterministic);
* **the shuffle**: ``shuffle=True`` is a ``random_shuffle`` seeded with the Trainer's seed (or,
  without one, a seed derived from the run's folder, so the same command shuffles the same way),
  re-seeded per epoch by Ray Data's execution index (a different order every epoch);
* **the epoch**: Ray counts executions in the dataset's DataContext, and a restarted group gets
  fresh split coordinators counting from 0. ``ResumableDataConfig`` sets the count to the epoch
  being resumed (read from the checkpoint the workers will load) before the split is made.

Mid-epoch, the worker then skips the batches the checkpoint had consumed (read, not trained on).
Ray Data 2.60 has no iterator state to save instead; the execution counter is private (reached
through runtime/ray_internals.py), and the Ray Data resume test pins the behaviour this relies on.
"""
from __future__ import annotations

import zlib

from raytrainer.checkpoint.resume import restart_checkpoint, starting_epoch
from raytrainer.data import RayDataLoader, RayDatasetIterable
from raytrainer.errors import ConfigError
from raytrainer.loop.fit_data import ray_dataset_reload_refusal
from raytrainer.loop.loaders import resolve_loaders
from raytrainer.runtime.ray_internals import dataset_at_execution


def data_seed(cfg) -> int:
    """The seed of Ray Data shuffles: the Trainer's, else one fixed by the run's folder."""
    return int(cfg.seed) if cfg.seed is not None else zlib.crc32(cfg.run_dir.encode())


class RayShardPlaceholder:
    """Stands in the job for a RayDataLoader whose dataset was handed to Ray Train as ``name``,
    or (``pieces``: prediction) was cut on the driver into one ordered piece per rank."""

    def __init__(self, name: str, loader: RayDataLoader, seed: int, pieces: list | None = None):
        self.name = name
        self.seed = seed
        self.pieces = pieces
        self.options = {k: v for k, v in vars(loader).items() if k not in ("dataset", "shuffle")}


class RayShardLoader:
    """This worker's shard of a Ray Dataset; iterating it gives one epoch of dict batches."""

    exact_replay = True  # skipping batches on resume gives the same stream (see module doc)
    is_rank_shard = True  # already this rank's part: the loop shards nothing further

    def __init__(self, placeholder: RayShardPlaceholder, rank: int):
        import ray.train
        self.shard = (placeholder.pieces[rank] if placeholder.pieces is not None
                      else ray.train.get_dataset_shard(placeholder.name))
        self.options = placeholder.options
        self.seed, self.rank, self.epoch = placeholder.seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        o = self.options
        # A local shuffle buffer draws from its own seed: one per (seed, epoch, rank), so a resumed
        # epoch shuffles as the uninterrupted one did.
        local_seed = (zlib.crc32(f"{self.seed}/{self.epoch}/{self.rank}".encode())
                      if o["local_shuffle_buffer_size"] else None)
        return iter(self.shard.iter_torch_batches(
            batch_size=o["batch_size"], prefetch_batches=o["prefetch_batches"],
            local_shuffle_buffer_size=o["local_shuffle_buffer_size"], local_shuffle_seed=local_seed,
            drop_last=o["drop_last"], collate_fn=o["collate_fn"], dtypes=o["dtypes"]))


def split_ray_datasets(stage: str, trainer, datamodule, loaders: dict, num_workers: int) -> tuple[dict, dict]:
    """Move Ray Datasets out of the job (they go to Ray Train, which shards them) and leave
    placeholders the workers turn back into loaders. Prediction datasets are cut here instead,
    into ``num_workers`` consecutive row ranges (rank 0 the first): rank after rank, their
    predictions are in dataset order."""
    from ray.data import RandomSeedConfig
    seed = data_seed(trainer.cfg)
    datasets, out = {}, dict(loaders)
    kinds = ["train", "val"] if stage == "fit" else [k for k in loaders]
    for kind in kinds:
        given = loaders.get(kind)
        if given is None and datamodule is not None and _datamodule_may_return_ray(datamodule, kind):
            # The datamodule builds its Ray Datasets here on the driver (Ray Train must own them).
            given = resolve_loaders(kind, None, datamodule, None)
            reload_every = trainer.cfg.reload_dataloaders_every_n_epochs
            if reload_every and any(isinstance(x, RayDatasetIterable) for x in given or ()):
                raise ConfigError(ray_dataset_reload_refusal(reload_every))
        items = given if isinstance(given, (list, tuple)) else ([given] if given is not None else [])
        items = [x.loader if isinstance(x, RayDatasetIterable) else x for x in items]
        if not any(isinstance(x, RayDataLoader) for x in items):
            continue
        placeholders = []
        for i, item in enumerate(items):
            if isinstance(item, RayDataLoader):
                name = kind if i == 0 else f"{kind}_{i}"
                ds = item.dataset
                if kind == "predict":
                    placeholders.append(RayShardPlaceholder(name, item, seed, _ordered_pieces(ds, num_workers)))
                    continue
                if item.shuffle and kind == "train":
                    ds = ds.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
                datasets[name] = ds
                placeholders.append(RayShardPlaceholder(name, item, seed))
            else:
                placeholders.append(item)
        out[kind] = placeholders
    return datasets, out


def _ordered_pieces(ds, n: int) -> list:
    """``ds`` as ``n`` consecutive row ranges of near-equal size (materialized: the rows are
    counted and cut where one process would have them)."""
    rows = ds.count()
    cuts = [rows * i // n for i in range(1, n)]
    return ds.split_at_indices(cuts) if n > 1 else [ds]


def _datamodule_may_return_ray(datamodule, kind: str) -> bool:
    return bool(getattr(datamodule, "ray_datasets", False)) and callable(getattr(datamodule, f"{kind}_dataloader", None))


def materialize(loaders: dict, rank: int) -> dict:
    """In a worker: placeholders -> this rank's shard loaders."""
    def one(x):
        return RayShardLoader(x, rank) if isinstance(x, RayShardPlaceholder) else x
    return {k: ([one(x) for x in v] if isinstance(v, list) else one(v)) for k, v in loaders.items()}


def data_config(datasets: dict, cfg, fit_token: str, resume_uri: str | None):
    """Ray Train's DataConfig for ``datasets``: training splits in a fixed order, starting at the
    epoch being resumed."""
    import copy

    from ray.data import DataContext
    from ray.train import DataConfig

    splits = [n for n in datasets if n.startswith("train")]

    class ResumableDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            # Runs in Ray Train's controller on every (re)start of the worker group: the epoch
            # of the checkpoint the workers are about to load (checkpoint/resume.py).
            start_from = restart_checkpoint(cfg, fit_token) or resume_uri
            epoch = starting_epoch(start_from, cfg.storage_options)
            train = {name: dataset_at_execution(ds, epoch) if epoch else ds
                     for name, ds in datasets.items() if name in splits}
            output = super().configure(train, world_size, worker_handles, worker_node_ids, **kwargs)
            # Evaluation data: every row to exactly one worker. Ray Train's own split of the
            # others is equal=True, which drops rows to even the splits out.
            for name, ds in datasets.items():
                if name not in splits:
                    for worker, piece in enumerate(ds.copy(ds).streaming_split(world_size, equal=False)):
                        output[worker][name] = piece
            return output

    # The driver's options (what Train's default_ingest_options copies, without the deprecated
    # exclude_resources argument it passes), in order.
    ordered = copy.deepcopy(DataContext.get_current().execution_options)
    ordered.preserve_order = True
    return ResumableDataConfig(datasets_to_split=splits, execution_options={n: ordered for n in splits})
