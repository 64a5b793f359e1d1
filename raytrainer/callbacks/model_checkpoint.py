"""ModelCheckpoint: when to save, which checkpoints to keep.

It saves only at checkpoint boundaries (see callbacks/base.py), so every checkpoint resumes exactly.
When: every ``every_n_train_steps`` optimizer steps, or every ``train_time_interval``, or else
after each validation (every ``every_n_epochs`` epochs) — or at the epoch's end when there is no
validation or ``save_on_train_epoch_end=True``. Which to keep: the ``save_top_k`` best by
``monitor`` (a pure policy, ``topk_decision``), plus the newest as ``last`` with ``save_last``.
Files are deleted only after the new checkpoint is committed.

Where: the run's own ``checkpoints/step=....ckpt`` files, which resume reads. With ``dirpath`` or
``filename`` (or ``save_weights_only``), each kept checkpoint is also published under the name
Lightning would give it, ``{dirpath}/{filename}.ckpt`` (``epoch=1-val_loss=0.12.ckpt``,
``last.ckpt``, ``-v1`` for a name taken), and ``best_model_path`` / ``last_model_path`` /
``best_k_models`` are those names (checkpoint/named.py: a hard link or a server-side copy).
"""
from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from typing import Any

from raytrainer import storage
from raytrainer.callbacks.base import Callback
from raytrainer.checkpoint import named, store
from raytrainer.checkpoint.format import checkpoints_root

log = logging.getLogger(__name__)


def topk_decision(best_k: dict[str, float], score: float, k: int, mode: str) -> tuple[bool, list[str]]:
    """Should a checkpoint scoring ``score`` be kept among the ``k`` best, and which kept ones are
    evicted? Ties are not improvements (the older checkpoint stays); NaN is never kept when k > 0
    and there is a finite alternative. ``k=-1`` keeps all."""
    if k == -1:
        return True, []
    if k == 0:
        return False, []
    if len(best_k) < k:
        return True, []
    worst_path = _worst(best_k, mode)
    worst = best_k[worst_path]
    if math.isnan(score):
        return False, []
    better = math.isnan(worst) or (score < worst if mode == "min" else score > worst)
    return (True, [worst_path]) if better else (False, [])


def _worst(best_k: dict[str, float], mode: str) -> str:
    def badness(item):
        order, (path, s) = item
        # NaN is the worst; among equal scores the oldest (first inserted) goes first.
        return (math.isnan(s), (s if mode == "min" else -s) if not math.isnan(s) else 0.0, -order)
    return max(enumerate(best_k.items()), key=badness)[1][0]


class ModelCheckpoint(Callback):
    monitors_metrics = True  # after the module at a training epoch's end (Lightning)

    def __init__(self, dirpath: str | None = None, filename: str | None = None, monitor: str | None = None,
                 verbose: bool = False, save_last: bool | str | None = None, save_top_k: int = 1,
                 save_weights_only: bool = False, mode: str = "min", auto_insert_metric_name: bool = True,
                 every_n_train_steps: int | None = None, train_time_interval: Any = None,
                 every_n_epochs: int | None = None, save_on_train_epoch_end: bool | None = None,
                 enable_version_counter: bool = True):
        if save_last not in (None, True, False, "link"):
            raise ValueError(f"ModelCheckpoint(save_last={save_last!r}) is invalid: expected True, False or 'link'")
        if filename is not None and (not isinstance(filename, str) or not filename or "/" in filename):
            raise ValueError(f"ModelCheckpoint(filename={filename!r}) is invalid: a file name template without "
                             "folders, e.g. '{epoch}-{val_loss:.2f}' (put folders in dirpath=)")
        if mode not in ("min", "max"):
            raise ValueError(f"ModelCheckpoint(mode={mode!r}) is invalid: expected 'min' or 'max'")
        if isinstance(save_top_k, bool) or not isinstance(save_top_k, int) or save_top_k < -1:
            raise ValueError(f"ModelCheckpoint(save_top_k={save_top_k!r}) is invalid: expected -1 (all), 0, or k >= 1")
        if monitor is None and save_top_k not in (-1, 0, 1):
            raise ValueError(f"ModelCheckpoint(save_top_k={save_top_k}) needs a monitor to rank "
                             "checkpoints; set monitor='val_loss' (or save_top_k=1 / -1)")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"ModelCheckpoint(monitor={monitor!r}) is invalid: expected a metric name")
        for arg, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"ModelCheckpoint({arg}={value!r}) is invalid: expected None or an int >= 1")
        if isinstance(train_time_interval, _dt.timedelta):
            train_time_interval = train_time_interval.total_seconds()
        if train_time_interval is not None and (isinstance(train_time_interval, bool) or
                                                not isinstance(train_time_interval, (int, float)) or train_time_interval <= 0):
            raise ValueError(f"ModelCheckpoint(train_time_interval={train_time_interval!r}) is invalid: "
                             "expected a datetime.timedelta or seconds > 0")
        if sum(x is not None for x in (every_n_train_steps, every_n_epochs, train_time_interval)) > 1:
            raise ValueError("ModelCheckpoint: every_n_train_steps, every_n_epochs and train_time_interval "
                             "are mutually exclusive; set one")
        self.monitor, self.mode, self.save_top_k = monitor, mode, save_top_k
        self.save_last = bool(save_last)  # "link": every named file is a link already (named.py)
        self.dirpath = storage.normalize(str(dirpath)) if dirpath is not None else None
        self.filename, self.auto_insert_metric_name = filename, auto_insert_metric_name
        self.save_weights_only, self.enable_version_counter = save_weights_only, enable_version_counter
        self._named = dirpath is not None or filename is not None or save_weights_only
        self._sources: dict[str, str] = {}  # named file -> the run's checkpoint it was published from
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs or 1
        self.train_time_interval = train_time_interval
        self.save_on_train_epoch_end = save_on_train_epoch_end
        self.verbose = verbose
        self.best_k_models: dict[str, float] = {}
        self.best_model_path = ""
        self.best_model_score: float | None = None
        self.last_model_path = ""
        self._last_save_time = time.monotonic()
        self._validated = False  # a validation of this fit ran since the last checkpoint boundary

    @property
    def state_key(self) -> str:
        return (f"ModelCheckpoint{{monitor={self.monitor!r}, mode={self.mode!r}, "
                f"every_n_train_steps={self.every_n_train_steps}, every_n_epochs={self.every_n_epochs}, "
                f"train_time_interval={self.train_time_interval}}}")

    def state_dict(self) -> dict:
        return {"best_k_models": dict(self.best_k_models), "best_model_path": self.best_model_path,
                "best_model_score": self.best_model_score, "last_model_path": self.last_model_path,
                "dirpath": self.dirpath, "sources": dict(self._sources)}

    def load_state_dict(self, state: dict) -> None:
        self.best_k_models = dict(state.get("best_k_models", {}))
        self.best_model_path = state.get("best_model_path", "")
        self.best_model_score = state.get("best_model_score")
        self.last_model_path = state.get("last_model_path", "")
        self._sources = dict(state.get("sources", {}))

    # ------------------------------------------------------------------ when
    def _saves_on_epoch_end(self, trainer) -> bool:
        if self.save_on_train_epoch_end is not None:
            return self.save_on_train_epoch_end
        return sum(trainer.num_val_batches) == 0  # no validation: save at the epoch's end

    def _due(self, trainer) -> bool:
        boundary, step = trainer.checkpoint_boundary, trainer.global_step
        if self.every_n_train_steps or self.train_time_interval:
            if boundary != "step" or step == 0:
                return False
            if self.every_n_train_steps:
                return step % self.every_n_train_steps == 0
            return time.monotonic() - self._last_save_time >= self.train_time_interval
        epoch_ok = (trainer.current_epoch + 1) % self.every_n_epochs == 0
        if boundary == "epoch":
            return epoch_ok and self._saves_on_epoch_end(trainer)
        return epoch_ok and self._validated and not self._saves_on_epoch_end(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._validated = True

    def on_checkpoint_boundary(self, trainer, pl_module) -> None:
        due = trainer.cfg.enable_checkpointing and self._due(trainer)
        self._validated = False
        if due:
            self.save(trainer)
        elif self.save_last and trainer.cfg.enable_checkpointing and trainer.checkpoint_boundary == "step" \
                and trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            # max_steps ends the fit here: `last` is this position, taken before the end of an
            # epoch it cuts short runs (no boundary), so a resume continues the epoch exactly.
            self._commit(trainer, keep=False, score=None)

    def on_train_end(self, trainer, pl_module) -> None:
        # A run that ends for any reason (max_steps mid-epoch, max_epochs, early stop) keeps its
        # final state as `last` (a position already saved is not saved twice).
        if self.save_last and trainer.cfg.enable_checkpointing:
            self._commit(trainer, keep=False, score=None)

    # ------------------------------------------------------------------ what
    def save(self, trainer) -> None:
        score = None
        if self.monitor is not None:
            metrics = trainer.callback_metrics
            if self.monitor not in metrics:
                raise KeyError(f"ModelCheckpoint(monitor={self.monitor!r}) found no such metric; "
                               f"logged metrics: {sorted(metrics)}. Log it with self.log({self.monitor!r}, ...)"
                               " or fix the monitor name")
            score = float(metrics[self.monitor])
        keep, evict = topk_decision(self.best_k_models, score if score is not None else 0.0,
                                    self.save_top_k, self.mode) if score is not None else \
            (self.save_top_k != 0, list(self.best_k_models) if self.save_top_k == 1 else [])
        # Every rank must take the same decision (saving is collective): rank 0's wins.
        keep, evict = trainer.strategy.broadcast((keep, evict))
        if keep or self.save_last:
            self._commit(trainer, keep, score, evict)

    def _commit(self, trainer, keep: bool, score: float | None, evict: list[str] = ()) -> None:
        uri = trainer.boundary_checkpoint_path
        # The name a kept checkpoint may take over (Lightning's): the one it evicts, or without a
        # monitor the previous best.
        reuse = (evict[0] if evict else None) if self.monitor else (self.best_model_path or None)
        kept_as, last_as = self._names_for(trainer, keep, reuse) if self._named else (uri, uri)
        evict = [p for p in evict if p != kept_as]
        # Update the bookkeeping first so the checkpoint's own copy of this callback's state
        # already lists it (after a resume it can then be ranked and evicted like any other).
        if keep:
            self.best_k_models[kept_as] = score if score is not None else float("nan")
            for path in evict:
                self.best_k_models.pop(path, None)
            if score is not None:
                best = min if self.mode == "min" else max
                finite = {p: s for p, s in self.best_k_models.items() if not math.isnan(s)}
                self.best_model_path = best(finite, key=finite.get) if finite else kept_as
                self.best_model_score = self.best_k_models[self.best_model_path]
            else:
                self.best_model_path = kept_as
        previous_last = self.last_model_path
        if self.save_last:
            self.last_model_path = last_as
        stale = set(evict) | ({previous_last} if previous_last and previous_last != last_as else set())
        published = [p for p in {kept_as if keep else None, last_as if self.save_last else None} if p and p != uri]
        replaced = {self._sources[p] for p in published if p in self._sources}  # e.g. last.ckpt's old source
        self._sources.update({p: uri for p in published})
        # Decided here, on the training thread; named files appear, and older checkpoints are
        # deleted, only once the new one is committed (maybe in the background).
        doomed = self._unreferenced(trainer, stale | replaced)
        trainer.save_checkpoint(after_commit=[lambda: self._publish(trainer, uri, published),
                                              lambda: self._delete(trainer, doomed)], wait=False)
        self._last_save_time = time.monotonic()
        if self.verbose and trainer.is_global_zero:
            log.info("checkpoint %s%s", kept_as if keep else last_as,
                     f" ({self.monitor}={score:.6g})" if score is not None else "")

    def _names_for(self, trainer, keep: bool, reuse: str | None) -> tuple[str | None, str | None]:
        """The named files of this boundary (Lightning's names): rank 0 picks them, every rank
        gets them."""
        names = self._pick_names(trainer, keep, reuse) if trainer.is_global_zero else None
        return trainer.strategy.broadcast(names)

    def _pick_names(self, trainer, keep: bool, reuse: str | None) -> tuple[str | None, str | None]:
        metrics = {**trainer.callback_metrics, "epoch": trainer.current_epoch, "step": trainer.global_step}
        dirpath = self.dirpath or checkpoints_root(trainer.cfg)
        taken = set(self.best_k_models) | {self.last_model_path} | set(self._sources)
        options = trainer.cfg.storage_options

        def free(name: str, reuse: str | None = None) -> str:
            if not self.enable_version_counter:
                return named.path_for(dirpath, name)
            return named.free_path(dirpath, name, taken - {reuse}, options, reuse)
        kept_as = free(named.format_name(self.filename, metrics, self.auto_insert_metric_name), reuse) if keep else None
        if kept_as:
            taken.add(kept_as)
        last_as = free(named.format_name(named.LAST, metrics, self.auto_insert_metric_name),
                       reuse=self.last_model_path or None) if self.save_last else None
        return kept_as, last_as

    def _publish(self, trainer, source: str, paths: list[str]) -> None:
        if trainer.is_global_zero:
            for path in paths:
                named.publish(source, path, trainer.cfg.storage_options, self.save_weights_only)

    def on_fit_start(self, trainer, pl_module) -> None:
        """Forget checkpoints of other runs: a fit resumed from another run's checkpoint (a PBT
        exploit, ``ckpt_path=`` elsewhere) restores that run's bookkeeping, and its files are
        not this run's to rank or delete."""
        ours = self._owns(trainer)
        self.best_k_models = {p: v for p, v in self.best_k_models.items() if ours(p)}
        self._sources = {p: s for p, s in self._sources.items() if ours(p) and ours(s)}
        if self.last_model_path and not ours(self.last_model_path):
            self.last_model_path = ""
        if self.best_model_path and not ours(self.best_model_path):
            finite = {p: v for p, v in self.best_k_models.items() if not math.isnan(v)}
            pick = min if self.mode == "min" else max
            self.best_model_path = pick(finite, key=finite.get) if finite else ""
            self.best_model_score = finite.get(self.best_model_path)

    def _owns(self, trainer):
        roots = [checkpoints_root(trainer.cfg) + "/"] + ([self.dirpath.rstrip("/") + "/"] if self.dirpath else [])
        return lambda path: any(path.startswith(root) for root in roots)

    def _unreferenced(self, trainer, candidates: set[str]) -> list[tuple[str, bool]]:
        """Which of ``candidates`` no checkpoint callback refers to any more, as ``(path, is a
        named file)``: named files, and the run's checkpoints no kept name was published from."""
        ours = self._owns(trainer)
        referenced = {trainer.boundary_checkpoint_path}
        for cb in trainer.checkpoint_callbacks:
            names = set(cb.best_k_models) | {cb.last_model_path, cb.best_model_path}
            referenced |= names | {cb._sources[p] for p in names if p in cb._sources}
        doomed = []
        for path in sorted(p for p in candidates - referenced if ours(p)):  # never another run's files
            if path in self._sources:  # a named file; the checkpoint it came from may go too
                source = self._sources.pop(path)
                doomed.append((path, True))
                if source not in referenced and source not in self._sources.values():
                    doomed.append((source, False))
            elif path not in self._sources.values():
                doomed.append((path, False))
        return doomed

    def _delete(self, trainer, doomed: list[tuple[str, bool]]) -> None:
        if trainer.is_global_zero:
            for path, is_named in doomed:
                (named.delete if is_named else store.delete)(path, trainer.cfg.storage_options)
