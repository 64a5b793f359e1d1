"""What the process that called ``fit``/``validate``/... does before any runtime starts: decide
the checkpoint to start from (once), make sure storage is writable, find secret hyperparameters,
and say what is about to run. Every mistake found here costs no cluster start."""
from __future__ import annotations

import logging
import uuid

from raytrainer import redaction, storage
from raytrainer.checkpoint import resume
from raytrainer.checkpoint.store import remove_dead_temp_files
from raytrainer.checkpoint.format import read_marker
from raytrainer.errors import ConfigError
from raytrainer.loggers._folder import resolve_versions

log = logging.getLogger(__name__)


def prepare(trainer, stage: str, module, ckpt_path, datamodule=None) -> str | None:
    """Checks before the launch; returns the URI of the checkpoint to start from (or None)."""
    cfg = trainer.cfg
    resume_uri = resume.resolve(ckpt_path, cfg)
    if stage == "fit" and (cfg.enable_checkpointing or trainer._loggers):
        probe_storage(cfg)
    if stage == "fit":
        remove_dead_temp_files(cfg)
    # Here, with the caller's environment: a Ray worker's may lack the variable a secret hparam
    # came from, so the paths found here travel with the module (see redaction.py). Every stage
    # logs the hparams (Lightning's), and a fit also checkpoints them.
    redaction.mark_secret_hparams(module)
    if datamodule is not None:  # its hparams are logged with the module's (redaction.run_hparams)
        redaction.mark_secret_hparams(datamodule)
    resolve_logger_versions(trainer._loggers, resume_uri, cfg)
    return resume_uri


def resolve_logger_versions(loggers, resume_uri: str | None, cfg) -> None:
    """Fix every versioned logger's folder here, once, so that all workers and restarts write
    the same one. A fit continuing a checkpoint of its own run continues the versions recorded
    in that checkpoint's marker (loggers/_folder.py)."""
    record = []
    if resume_uri is not None and resume.is_own_checkpoint(resume_uri, cfg):
        record = (read_marker(resume_uri, cfg.storage_options) or {}).get("logger_versions", [])
    resolve_versions(loggers, record, cfg.storage_options)


def log_resolved(trainer, stage: str, where: str) -> None:
    """The one line that says what runs where, with every "auto" resolved."""
    cfg = trainer.cfg
    training = []  # limits and accumulation mean nothing to validate/test/predict
    if stage == "fit":
        training += [] if cfg.max_steps == -1 else [f"max_steps={cfg.max_steps}"]
        training += [] if cfg.max_epochs == -1 else [f"max_epochs={cfg.max_epochs}"]
        training += [f"accumulate_grad_batches={cfg.accumulate_grad_batches}", f"strategy={cfg.strategy}"]
    log.info("%s", f"{stage}: {where} precision={cfg.precision} {' '.join(training)} "
                   f"run_dir={cfg.run_dir}".replace("  ", " "))


def probe_storage(cfg) -> None:
    """Write and delete a small file in the run folder before anything starts: an unreachable or
    unwritable storage path fails here, with the cause, not hours later at the first checkpoint."""
    uri = storage.join(cfg.run_dir, f".raytrainer-probe-{uuid.uuid4().hex[:8]}")
    try:
        fs, path = storage.filesystem(uri, cfg.storage_options)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, b"probe")
        fs.rm(path)
    except Exception as e:
        raise ConfigError(f"Trainer(storage_path={cfg.storage_path!r}) is not writable: writing {uri} "
                          f"failed with {type(e).__name__}: {e}. Check the path, its permissions, and "
                          "for s3:// the bucket, endpoint and AWS credentials") from e
