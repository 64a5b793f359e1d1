"""The loop's side of data: which loaders a stage uses, this rank's shard of each, and the
training-data wrapper that makes resume exact.

Exact mid-epoch resume without replaying data: at the start of every epoch the loop records every
RNG (the sampler's shuffle and the DataLoader's worker seeds are drawn from them when the epoch's
iterator is created). To resume at batch ``b`` of epoch ``e``, those RNG states are put back, the
epoch's iterator is created again, and its first ``b`` *index* batches are dropped inside the batch
sampler — no sample is loaded for them. The RNG state saved with the checkpoint is then restored,
so everything after (dropout, augmentation of the next batch) matches the uninterrupted run.
"""
from __future__ import annotations

import itertools
import math
from collections import deque
import warnings
from typing import Any, Iterable, Iterator

import torch
from torch.utils.data import (BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler,
                              SequentialSampler)

from raytrainer.data import RayDataLoader, RayDatasetIterable
from raytrainer.utilities import capture_rng_state, restore_rng_state


def resolve_loaders(stage: str, explicit: Any, datamodule: Any, module: Any) -> list | None:
    """The loaders for ``stage`` ("train" | "val" | "test" | "predict"): explicit arguments win,
    then the DataModule's ``{stage}_dataloader()``, then the Module's own. None when nobody
    provides one. Always a list (validation/test/predict may have several loaders)."""
    source = explicit
    hook = f"{stage}_dataloader"
    if source is None and datamodule is not None and callable(getattr(datamodule, hook, None)):
        source = getattr(datamodule, hook)()
        if source is None:
            raise ValueError(f"{type(datamodule).__name__}.{hook}() returned None; return a "
                             "torch DataLoader (or an rt.RayDataLoader)")
    if source is None and module is not None and callable(getattr(module, hook, None)):
        source = getattr(module, hook)()
    if source is None:
        return None
    loaders = list(source) if isinstance(source, (list, tuple)) else [source]
    for i, loader in enumerate(loaders):
        if not (isinstance(loader, (DataLoader, RayDataLoader)) or _is_iterable(loader)):
            raise TypeError(f"{stage} loader #{i} is a {type(loader).__name__}, which is not "
                            "iterable; expected a torch DataLoader, an rt.RayDataLoader or an iterable of batches")
    # Left here only when nothing hands it to Ray Train (the local launcher): iterate in-process.
    loaders = [RayDatasetIterable(x) if isinstance(x, RayDataLoader) else x for x in loaders]
    if stage == "train" and len(loaders) != 1:
        raise ValueError(f"training takes exactly one train loader, got {len(loaders)}")
    return loaders


def _is_iterable(obj: Any) -> bool:
    try:
        iter(obj)
    except TypeError:
        return False
    return not isinstance(obj, (str, bytes, torch.Tensor))


class _SkippingBatchSampler:
    """Wraps a batch sampler; the next epoch's iterator drops its first ``skip`` index batches.

    The drop must happen in the same RNG order as an uninterrupted epoch: torch's DataLoader
    iterator calls ``iter(sampler)`` and *then* draws its base seed, while a RandomSampler draws
    its shuffle seed lazily at the first ``next``. So the skip is lazy too, and ``prime()`` (called
    right after the DataLoader iterator exists) performs it before anything else touches the RNG.
    """

    def __init__(self, inner: Iterable):
        self.inner = inner
        self.skip = 0
        self._pending: _SkippingIterator | None = None

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator:
        skip, self.skip = self.skip, 0
        if not skip:
            return iter(self.inner)
        self._pending = _SkippingIterator(iter(self.inner), skip)
        return self._pending

    def prime(self) -> None:
        if self._pending is not None:
            self._pending.prime()
            self._pending = None


class _SkippingIterator:
    def __init__(self, it: Iterator, skip: int):
        self.it, self.skip = it, skip

    def prime(self) -> None:
        for _ in range(self.skip):
            if next(self.it, None) is None:
                break
        self.skip = 0

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self.skip:
            self.prime()
        return next(self.it)


class TrainData:
    """The training loader of one run: sharded for this rank, resumable by index skipping."""

    def __init__(self, loader: Any, world_size: int, rank: int, seed: int, use_distributed_sampler: bool = True,
                 overfit: bool = False):
        self.sampler_for_epoch = None
        self._skipper: _SkippingBatchSampler | None = None
        if overfit and isinstance(loader, DataLoader) and isinstance(loader.sampler, RandomSampler):
            # Lightning's overfit_batches: the same first batches every epoch
            warnings.warn("Trainer(overfit_batches=...) trains on the first batches in order: the training "
                          "loader's shuffling is turned off")
            loader = rebuild_dataloader(loader, sampler=SequentialSampler(loader.dataset))
        self.loader = self._prepare(loader, world_size if use_distributed_sampler else 1, rank, seed)

    def _prepare(self, loader: Any, world_size: int, rank: int, seed: int) -> Any:
        """``world_size`` 1: the loader's own sampler is kept (one process, or
        ``use_distributed_sampler=False``: the user shards)."""
        if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset) \
                or loader.batch_sampler is None:
            if world_size > 1 and isinstance(loader, DataLoader) and isinstance(loader.dataset, IterableDataset):
                warnings.warn("an IterableDataset is not sharded by raytrainer: shard it yourself "
                              "by rank (or use rt.RayDataLoader), or every worker sees all of it")
            if callable(getattr(loader, "set_epoch", None)):  # a Ray Dataset (or a shard of one)
                self.sampler_for_epoch = loader
                if isinstance(loader, RayDatasetIterable):
                    loader.seed = seed
            return loader
        batch_sampler = loader.batch_sampler
        if world_size > 1:
            # Each rank reads a disjoint 1/world_size of the data; DistributedSampler pads to an
            # even split so every rank runs the same number of steps (an uneven split hangs DDP).
            sampler = DistributedSampler(loader.dataset, num_replicas=world_size, rank=rank,
                                         shuffle=isinstance(loader.sampler, RandomSampler), seed=seed)
            batch_sampler = BatchSampler(sampler, loader.batch_size, loader.drop_last)
            self.sampler_for_epoch = sampler
        elif hasattr(loader.sampler, "set_epoch"):
            self.sampler_for_epoch = loader.sampler
        self._skipper = _SkippingBatchSampler(batch_sampler)
        return rebuild_dataloader(loader, batch_sampler=self._skipper)

    def __len__(self) -> int:
        return len(self.loader)

    def has_len(self) -> bool:
        try:
            len(self.loader)
            return True
        except TypeError:
            return False

    def _generators(self) -> list[torch.Generator]:
        gens = []
        for owner in (self.loader, getattr(self.loader, "sampler", None),
                      getattr(self._skipper.inner, "sampler", None) if self._skipper else None):
            g = getattr(owner, "generator", None)
            if isinstance(g, torch.Generator) and all(g is not h for h in gens):
                gens.append(g)
        return gens

    def capture_epoch_state(self) -> dict:
        return {"rng": capture_rng_state(), "generators": [g.get_state() for g in self._generators()]}

    def epoch_iterator(self, epoch: int, skip_batches: int = 0, epoch_state: dict | None = None,
                       resume_rng: dict | None = None) -> tuple[Iterator, dict]:
        """An iterator over epoch ``epoch``'s batches after the first ``skip_batches``, and the
        RNG state at the epoch's start (saved in checkpoints to resume mid-epoch)."""
        if self.sampler_for_epoch is not None:
            self.sampler_for_epoch.set_epoch(epoch)
        if skip_batches and epoch_state is not None:
            restore_rng_state(epoch_state["rng"])
            for g, s in zip(self._generators(), epoch_state["generators"]):
                g.set_state(s)
        state = epoch_state if (skip_batches and epoch_state is not None) else self.capture_epoch_state()
        if skip_batches and self._skipper is not None:
            self._skipper.skip = skip_batches
            it = iter(self.loader)
            self._skipper.prime()  # index batches only: no sample of them is loaded
        else:
            it = iter(self.loader)
            if skip_batches:  # not index-addressable (iterable dataset): replay and drop
                if not getattr(self.loader, "exact_replay", False):
                    warnings.warn(f"resuming mid-epoch by replaying {skip_batches} batches: the train "
                                  "loader is not a map-style torch DataLoader")
                it = itertools.islice(it, skip_batches, None)
        if resume_rng is not None:
            restore_rng_state(resume_rng)
        return it, state


def rebuild_dataloader(loader: DataLoader, **overrides: Any) -> DataLoader:
    """A plain DataLoader over the same dataset with the same options, some overridden."""
    kwargs = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                  pin_memory=loader.pin_memory, timeout=loader.timeout,
                  worker_init_fn=loader.worker_init_fn,
                  multiprocessing_context=loader.multiprocessing_context,
                  generator=loader.generator, persistent_workers=loader.persistent_workers)
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    if getattr(loader, "pin_memory_device", ""):
        kwargs["pin_memory_device"] = loader.pin_memory_device
    if "batch_sampler" not in overrides:
        kwargs.update(batch_size=loader.batch_size, drop_last=loader.drop_last, sampler=loader.sampler)
    kwargs.update(overrides)
    return DataLoader(loader.dataset, **kwargs)


class EvalShard:
    """Rank ``rank``'s part of an evaluation loader: batches ``rank``, ``rank + W``, ``rank + 2W``…
    of the loader's own batch sequence (its sampler and batch size, untouched).

    Every sample is evaluated exactly once, in the very batches one process would make, so every
    logged value — a batch-size-weighted mean, a sum, a max of per-batch values — reduces to what
    one process computes (torch's DistributedSampler pads instead: sample 0 counted twice when
    the set does not divide, pytorch/pytorch#25162). Ranks may run one batch fewer than others;
    evaluation steps run no collective, so nothing waits for the missing batch. Each batch's
    position in the one-process order is known (``global_batch_idx``): predictions come back
    in dataset order.
    """

    def __init__(self, inner: Iterable, world_size: int, rank: int):
        self.inner, self.world_size, self.rank = inner, world_size, rank
        self.record_indices = False     # set for predict: prediction writers get each batch's indices
        self._yielded: deque = deque()  # index batches handed to the loader, not yet consumed

    def __len__(self) -> int:
        return max(0, -(-(len(self.inner) - self.rank) // self.world_size))

    def __iter__(self) -> Iterator:
        self._yielded.clear()
        for i, indices in enumerate(self.inner):
            if i % self.world_size == self.rank:
                if self.record_indices:
                    self._yielded.append(list(indices))
                yield indices

    def global_batch_idx(self, local_idx: int) -> int:
        return local_idx * self.world_size + self.rank

    def next_batch_indices(self) -> list[int] | None:
        """The dataset indices of the batch the loader returns next (loaders return batches in
        the order their index batches were drawn, also with worker processes)."""
        return self._yielded.popleft() if self._yielded else None


def shard_eval_loader(loader: Any, world_size: int, rank: int, use_distributed_sampler: bool = True) -> Any:
    """This rank's part of an evaluation loader: an ``EvalShard`` of a map-style DataLoader.
    One process keeps the loader as it is (batch indices recorded for prediction writers)."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset) \
            or loader.batch_sampler is None or not use_distributed_sampler:
        if world_size > 1 and use_distributed_sampler and not getattr(loader, "is_rank_shard", False):
            warnings.warn(f"an evaluation loader over a {type(getattr(loader, 'dataset', loader)).__name__} "
                          "is not sharded by raytrainer: every worker evaluates all of it (shard it "
                          "yourself by rank, or use rt.RayDataLoader)")
        return loader
    batch_sampler = loader.batch_sampler
    if world_size > 1 and isinstance(loader.sampler, RandomSampler):
        # Ranks would shuffle differently and overlap; evaluation order does not change its numbers.
        warnings.warn("an evaluation loader shuffles (shuffle=True); with several workers it is read "
                      "in order instead, so that every sample is evaluated exactly once")
        batch_sampler = BatchSampler(SequentialSampler(loader.dataset), loader.batch_size, loader.drop_last)
    return rebuild_dataloader(loader, batch_sampler=EvalShard(batch_sampler, world_size, rank))


def limited_length(loader: Any, limit: int | float | None, what: str = "limit_train_batches") -> float:
    """Batches taken from ``loader`` under ``Trainer(limit_*_batches=limit)``: None (all), an int
    count, or a fraction of the loader's length (which it then must have)."""
    try:
        total: float = len(loader)
    except TypeError:
        total = math.inf
    if limit is None:
        return total
    if isinstance(limit, float):
        if math.isinf(total):
            kind = what.removeprefix("limit_").removesuffix("_batches")
            raise ValueError(f"a fractional {what} needs a {kind} loader with a length; pass an int number "
                             "of batches")
        return int(total * limit) if limit < 1.0 else total
    return min(total, limit)
