"""Weights & Biases logger: one W&B run per training run, kept across restarts and resumes."""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
import string
import tempfile
from typing import Any, Mapping

from raytrainer import storage
from raytrainer.checkpoint.store import list_committed
from raytrainer.loggers import _hparams, _sync
from raytrainer.loggers.base import Logger

log = logging.getLogger(__name__)

STEP_KEY = "trainer/global_step"


def _import_wandb():
    try:
        import wandb  # lazy: `import raytrainer` never pays for (or needs) wandb
    except ImportError as e:
        raise ImportError("WandbLogger needs the wandb package: pip install raytrainer[wandb]") from e
    return wandb


def _stable_run_id(key: str) -> str:
    # Hex is within W&B's id alphabet; the same key always names the same W&B run.
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _new_run_id() -> str:
    # W&B's own id shape (8 chars of [a-z0-9]), made here so the id exists before wandb is imported
    # and travels with the pickled logger to a Ray worker.
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class WandbLogger(Logger):
    """Log metrics, hyperparameters and (on request) the final checkpoint to Weights & Biases.

    **One W&B run per training run.** The run id is made once (in ``__init__``, or taken from
    ``id=``), stored in every checkpoint through ``state_dict()``, and read back by
    ``load_state_dict()`` on resume, so ``fit(..., ckpt_path="last")`` with a *new* WandbLogger
    continues the same W&B run (``wandb.init(id=..., resume="allow")``). An explicit ``id=`` wins
    over the checkpoint's. A checkpoint of *another* run (``ckpt_path`` into another run dir, a
    PBT donor's) brings its weights, not its W&B run: this run keeps its own id.

    **Sweeps.** In ``rt.sweep`` every trial gets its own W&B run, named after the trial and in a
    group named after the sweep (``join_sweep``); ``id=`` is refused there.

    **Steps.** Each call logs ``{**metrics, "trainer/global_step": step}`` and W&B's x-axis is
    ``trainer/global_step`` (``define_metric``), as Lightning does. W&B's own ``_step`` is left to
    W&B: it only accepts increasing values, and a resumed run re-logs the steps between its
    checkpoint and the crash, which ``wandb.log(..., step=step)`` would silently drop. So W&B's
    step stays monotonic across a resume, and the chart shows both attempts at those steps.

    **Files.** ``save_dir`` (W&B's ``dir``, holding ``wandb/``) defaults to the run dir given to
    ``setup()`` when it is local, and to a temporary local folder when it is remote (W&B writes
    through local files and uploads them itself). The run is opened lazily, on first use, so a
    resume's ``load_state_dict`` lands before it, and the logger pickles without it.

    ``hparams`` go to ``run.config`` (nested, unknown leaves as ``str``); the CLI's resolved
    ``{run_dir}/config.yaml``, when present, goes to ``run.config["resolved_config"]``.
    ``log_checkpoints=True`` logs the run's newest committed checkpoint as a ``model`` artifact
    when the logger is finalized (Lightning's ``log_model=True``). TODO: logging every checkpoint
    as it commits needs a commit event for loggers; ``Logger.save()`` runs when a checkpoint is
    *submitted*, possibly before its asynchronous commit.
    Other keyword arguments go to ``wandb.init`` (``entity``, ``tags``, ``mode``, ``settings``...).
    """

    def __init__(self, project: str | None = None, name: str | None = None, group: str | None = None,
                 save_dir: str | None = None, log_checkpoints: bool = False, **init_kwargs: Any) -> None:
        self._project = project
        self._run_name = name
        self._group = group
        self._save_dir = save_dir or init_kwargs.pop("dir", None)  # wandb.init's name for it
        self._log_checkpoints = log_checkpoints
        self._fixed_id = init_kwargs.pop("id", None)
        init_kwargs.pop("resume", None)  # always "allow": the logger decides which run to continue
        self._init_kwargs = init_kwargs
        self._run_id: str = self._fixed_id or _new_run_id()
        self._run_dir: str | None = None
        self._storage_options: dict | None = None
        self._logged_checkpoint: str | None = None
        self._run = None
        self._local_dir: str | None = None  # where wandb writes in this process

    @property
    def name(self) -> str:
        return "wandb"

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def log_dir(self) -> str | None:
        """The folder holding W&B's ``wandb/`` run files (known once the run is open, or set)."""
        if self._local_dir or self._save_dir:
            return self._local_dir or _sync.strip_file_scheme(self._save_dir)
        if self._run_dir is not None and not _sync.is_remote(self._run_dir):
            return _sync.strip_file_scheme(self._run_dir)
        return None

    def setup(self, run_dir: str, storage_options=None) -> None:
        # storage_options: the Trainer's fsspec options, used to read config.yaml and list
        # checkpoints in a remote run dir (never logged).
        self._storage_options = dict(storage_options) if storage_options else None
        self._run_dir = run_dir

    def join_sweep(self, sweep_dir: str, trial_name: str) -> None:
        """One W&B run per trial, in the group named after the sweep (unless ``group=`` was
        given), named after the trial (unless ``name=`` was). The id is derived from the sweep
        dir and trial name, so a trial Tune restarts before its first checkpoint continues the
        same W&B run."""
        if self._fixed_id is not None:
            raise ValueError(f"WandbLogger(id={self._fixed_id!r}) in a sweep would write every trial "
                             "into one W&B run: drop id= (each trial gets its own run, grouped "
                             "under the sweep's name)")
        self._group = self._group or sweep_dir.rstrip("/").rsplit("/", 1)[-1]
        self._run_name = self._run_name or trial_name
        self._run_id = _stable_run_id(f"{sweep_dir.rstrip('/')}/{trial_name}")

    def _resolve_local_dir(self) -> str:
        if self._save_dir is not None:
            local = _sync.strip_file_scheme(self._save_dir)
        elif self._run_dir is not None and not _sync.is_remote(self._run_dir):
            local = _sync.strip_file_scheme(self._run_dir)
        else:  # a remote run dir (or no setup): W&B needs a local folder for its run files
            local = tempfile.mkdtemp(prefix="raytrainer-wandb-")
        os.makedirs(local, exist_ok=True)
        return local

    @property
    def experiment(self):
        """The ``wandb`` Run, opened (or resumed) on first access."""
        if self._run is None:
            wandb = _import_wandb()
            self._local_dir = self._local_dir or self._resolve_local_dir()
            self._run = wandb.init(project=self._project, name=self._run_name, group=self._group,
                                   dir=self._local_dir, id=self._run_id, resume="allow",
                                   **self._init_kwargs)
            # A wandb.init while the user's own run is active returns that run (W&B's default
            # reinit): log there, and checkpoint its id so a resume finds it again.
            self._run_id = self._run.id
            self._run.define_metric(STEP_KEY)
            self._run.define_metric("*", step_metric=STEP_KEY, step_sync=True)
            resolved = self._read_resolved_config()
            if resolved is not None:
                self._run.config.update({"resolved_config": resolved}, allow_val_change=True)
        return self._run

    def _read_resolved_config(self) -> dict | None:
        if self._run_dir is None:
            return None
        import yaml

        try:
            fs, path = storage.filesystem(storage.join(self._run_dir, "config.yaml"),
                                          self._storage_options)
            if not fs.exists(path):
                return None
            with fs.open(path, "r") as f:
                loaded = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as e:  # an unreadable config never stops training
            log.warning("WandbLogger: could not read the resolved config: %s", e)
            return None
        # Written by the CLI without secrets; redacted again in case the file was edited by hand.
        return _hparams.redacted(loaded) if isinstance(loaded, dict) else None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        # No step= (see the class docstring): trainer/global_step is the x-axis.
        self.experiment.log({**{k: float(v) for k, v in metrics.items()}, STEP_KEY: step})

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        # allow_val_change: a resumed run logs its hparams again (and the user may change one).
        self.experiment.config.update(_hparams.redacted(_hparams.sanitize(dict(params))), allow_val_change=True)

    def finalize(self, status: str) -> None:
        if self._run is None:
            return  # nothing was logged in this process: no run to close
        try:
            if self._log_checkpoints:
                self._log_last_checkpoint()
        finally:
            self._run.finish(exit_code=0 if status == "success" else 1)
            self._run = None

    def _log_last_checkpoint(self) -> None:
        """The newest committed checkpoint as a ``model`` artifact (once per checkpoint)."""
        if self._run_dir is None:
            return
        # finalize runs after the checkpoint writer drained, so the newest commit is final.
        found = list_committed(_sync.join(self._run_dir, "checkpoints"),
                                       self._storage_options)
        if not found or found[-1] == self._logged_checkpoint:
            return
        uri = found[-1]
        wandb = _import_wandb()
        artifact = wandb.Artifact(f"model-{self._run_id}", type="model", metadata={"checkpoint": uri})
        if _sync.is_remote(uri):
            # A reference, not a copy: checkpoints can be large and already live in object storage.
            artifact.add_reference(uri, checksum=False)
        elif uri.endswith(".ckpt"):
            artifact.add_file(_sync.strip_file_scheme(uri), name="model.ckpt")  # Lightning's artifact layout
        else:  # a sharded checkpoint: a folder
            artifact.add_dir(_sync.strip_file_scheme(uri))
        self._run.log_artifact(artifact, aliases=["latest"])
        self._logged_checkpoint = uri

    def state_dict(self) -> dict:
        return {"wandb_run_id": self._run_id}

    def load_state_dict(self, state: dict) -> None:
        """On resume, continue the checkpoint's W&B run (unless ``id=`` was given explicitly)."""
        run_id = state.get("wandb_run_id")
        if not isinstance(run_id, str) or self._fixed_id is not None or run_id == self._run_id:
            return
        if self._run is not None:
            # Opened before the checkpoint was read (e.g. `logger.experiment` touched before fit):
            # close it, and the next log reopens the checkpoint's run.
            self._run.finish(exit_code=0)
            self._run = None
        self._run_id = run_id

    def __getstate__(self) -> dict:
        # The Run object holds a connection to W&B's service; a worker opens its own, same id.
        state = self.__dict__.copy()
        state.update(_run=None, _local_dir=None)
        return state
