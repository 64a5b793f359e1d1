"""Which checkpoint a run starts from, decided once.

On the driver, before anything starts: ``resolve(ckpt_path)`` turns ``None | "last" | "best" |
a URI`` into the committed checkpoint to start from (a URI that is not committed fails here,
with the reason). It is handed down to every worker as that URI. Only one thing can override it
later: after the runtime restarted the workers (a failure, a preemption), they continue from the
newest checkpoint *this* fit committed (``restart_checkpoint``, found in storage by the fit's
token, never from the runtime's registry: a report in flight when a worker died may never have
been registered).
"""
from __future__ import annotations

import logging
from typing import Mapping

from raytrainer import storage
from raytrainer.checkpoint import lightning_file
from raytrainer.checkpoint.format import (CKPT_SUFFIX, checkpoints_root, is_run_checkpoint_name, read_marker,
                                          require_committed)
from raytrainer.checkpoint.store import latest_committed, load

log = logging.getLogger(__name__)


def resolve(ckpt_path: str | None, cfg) -> str | None:
    """``None`` | ``"last"`` | ``"best"`` | a URI -> a committed checkpoint URI (or None)."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        uri = latest_committed(cfg, cfg.storage_options)
        if uri is None:
            log.info("ckpt_path='last': no committed checkpoint under %s; starting from scratch", cfg.run_dir)
        return uri
    if ckpt_path == "best":
        latest = latest_committed(cfg, cfg.storage_options)
        best = best_checkpoint_recorded_in(latest, cfg.storage_options) if latest else None
        if not best:
            raise ValueError(f"ckpt_path='best': no best checkpoint recorded under {cfg.run_dir} "
                             "(a ModelCheckpoint with a monitor records one)")
        return best
    uri = storage.normalize(str(ckpt_path))
    # A mistyped or half-written checkpoint fails here, before any data, worker or Ray starts.
    if is_run_checkpoint_name(uri):  # a run's checkpoint (a .ckpt file or a sharded folder): committed?
        require_committed(uri, cfg.storage_options)  # (a file's bytes are checked against its seal when loaded)
    elif lightning_file.is_ckpt_file(uri, cfg.storage_options):
        lightning_file.require_readable_file(uri, cfg.storage_options)  # a .ckpt (Lightning's or an export)
    else:
        require_committed(uri, cfg.storage_options)
    return uri


def is_own_checkpoint(uri: str, cfg) -> bool:
    """True for a checkpoint of this run (its run dir): its loggers' runs are this run's."""
    return uri.startswith(checkpoints_root(cfg) + "/")


def best_checkpoint_recorded_in(uri: str, storage_options: Mapping | None) -> str | None:
    """The best checkpoint a ModelCheckpoint had recorded when ``uri`` was saved."""
    state = load(uri, storage_options, weights=False)  # only the callbacks' state is read
    for key, cb_state in state.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and cb_state.get("best_model_path"):
            return cb_state["best_model_path"]
    return None


def restart_checkpoint(cfg, fit_token: str) -> str | None:
    """After a restart of the workers: the newest checkpoint the fit ``fit_token`` committed."""
    return latest_committed(cfg, cfg.storage_options, fit_token=fit_token)


def starting_epoch(uri: str | None, storage_options: Mapping | None) -> int:
    """The epoch a run starting from checkpoint ``uri`` trains first (0 for a fresh start)."""
    if not uri:
        return 0
    marker = read_marker(uri, storage_options)  # a run's checkpoint says it at its end
    if marker is None and lightning_file.is_ckpt_file(uri, storage_options):  # a Lightning file or an export
        state = lightning_file.load_for_run(uri, storage_options)
        return int(state["epoch"]) + (1 if state["loops"]["epoch_finished"] else 0)
    if not marker or marker.get("epoch") is None:
        return 0
    epoch_end = uri.rstrip("/").removesuffix(CKPT_SUFFIX).endswith("-epoch_end")
    return int(marker["epoch"]) + (1 if epoch_end else 0)
