"""MLflow logger: one MLflow run per training run, kept across restarts and resumes."""
from __future__ import annotations

import contextlib
import logging
import fcntl
import os
import re
import time
from typing import Any, Mapping

from raytrainer.loggers import _hparams, _sync
from raytrainer.loggers.base import Logger

log = logging.getLogger(__name__)

# MLflow's documented limits (mlflow.utils.validation), fixed here so they hold for every version:
# 6000-char param values since MLflow 2.x (500 before), 250-char keys, 100 params and 1000 metrics
# per log_batch call.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
SWEEP_TAG, TRIAL_TAG = "raytrainer.sweep", "raytrainer.trial"
_BAD_KEY_CHARS = re.compile(r"[^\w./\- ]")  # MLflow accepts [/\w.\- ] (and ':' off Windows)


def _import_mlflow():
    try:
        from mlflow.tracking import MlflowClient  # lazy: `import raytrainer` never needs mlflow
    except ImportError as e:
        raise ImportError("MLflowLogger needs MLflow: pip install raytrainer[mlflow]") from e
    return MlflowClient


@contextlib.contextmanager
def _sqlite_store_lock(uri: str):
    """Serialize opening a local SQLite store across processes: concurrent sweep trials would
    otherwise race to create its schema and experiment (MLflow migrates a new database on first
    use, and two migrations of one file fail)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = uri[len("sqlite:///"):]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _key(name: str) -> str:
    return _BAD_KEY_CHARS.sub("_", str(name))[:MAX_KEY]


class MLflowLogger(Logger):
    """Log metrics (with their steps) and flattened hyperparameters to an MLflow tracking store.

    **One MLflow run per training run.** The run is created on first use; its id is stored in
    every checkpoint through ``state_dict()`` and read back by ``load_state_dict()`` on resume, so
    ``fit(..., ckpt_path="last")`` with a *new* MLflowLogger continues the same run (set back to
    RUNNING, then FINISHED or FAILED by ``finalize``). A checkpoint of *another* run (a PBT
    donor's, a fine-tuning start) brings its weights, not its MLflow run.

    **Sweeps.** In ``rt.sweep`` every trial gets its own MLflow run, named after the trial and
    tagged with the sweep's and the trial's names, in one store (see ``join_sweep``).

    **Tracking URI**, in order: ``tracking_uri=``; MLflow's ``MLFLOW_TRACKING_URI`` environment
    variable; for a local run dir, ``sqlite:///{run_dir}/mlflow.db`` with artifacts under
    ``{run_dir}/mlartifacts`` (MLflow 3 refuses the old ``file:`` store unless
    ``MLFLOW_ALLOW_FILE_STORE=true``; a ``file:`` URI given explicitly still works where MLflow
    allows it). A remote run dir has no default: pass an MLflow server's URI. The resolved URI is
    printed when the run opens. Browse with ``mlflow ui --backend-store-uri <uri>``.

    Params are flattened (``opt/lr``), stringified and cut to MLflow's limits; MLflow params are
    write-once, so a resumed run logs only params it does not have yet and reports changed ones.
    """

    def __init__(self, experiment_name: str = "raytrainer", run_name: str | None = None,
                 tracking_uri: str | None = None, tags: Mapping[str, Any] | None = None) -> None:
        self._experiment_name = experiment_name
        self._run_name = run_name
        self._tracking_uri = tracking_uri
        self._tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self._run_dir: str | None = None
        self._sweep_dir: str | None = None  # set in a sweep trial: the store is the sweep's
        self._run_id: str | None = None
        self._client = None
        self._uri: str | None = None  # resolved when the client is made
        self._opened = False  # this process has (re)opened the run: status is RUNNING

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def tracking_uri(self) -> str | None:
        """The tracking URI in use, or that will be (resolved as the class docstring says)."""
        return self._uri or self._resolve_uri()

    def _resolve_uri(self) -> str | None:
        explicit = self._tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if explicit:
            return explicit
        local = self._local_run_dir()
        return None if local is None else f"sqlite:///{local}/mlflow.db"

    def _local_run_dir(self) -> str | None:
        """Where the default store goes: the run dir, or in a sweep the sweep dir (one store
        for all trials, so MLflow's UI compares them); None when that is remote."""
        folder = self._sweep_dir or self._run_dir
        if folder is None or _sync.is_remote(folder):
            return None
        return os.path.abspath(_sync.strip_file_scheme(folder))

    def setup(self, run_dir: str, storage_options=None) -> None:
        self._run_dir = run_dir

    def join_sweep(self, sweep_dir: str, trial_name: str) -> None:
        """One MLflow run per trial, named after the trial (unless ``run_name=`` was given) and
        tagged ``raytrainer.sweep`` / ``raytrainer.trial`` (filter with
        ``tags.`raytrainer.sweep` = '<name>'``). The default store moves to the sweep dir, so
        every trial is in one store; a trial Tune restarts before its first checkpoint finds its
        run again by the trial tag."""
        self._sweep_dir = sweep_dir
        self._run_name = self._run_name or trial_name
        self._tags.update({SWEEP_TAG: sweep_dir.rstrip("/").rsplit("/", 1)[-1], TRIAL_TAG: trial_name})
        self._run_id = None

    @property
    def experiment(self):
        """The ``MlflowClient`` bound to this logger's tracking URI, with the run open."""
        if self._opened:
            return self._client
        if self._client is None:
            # Resolved once per process: a Ray worker resolves in its own environment.
            self._uri = self._resolve_uri()
            if self._uri is None:
                raise ValueError(f"MLflowLogger: the run dir {self._run_dir!r} is remote (or setup() "
                                 "was not called) and no tracking URI is set: pass tracking_uri= "
                                 "(e.g. http://mlflow-server:5000) or set MLFLOW_TRACKING_URI")
        with _sqlite_store_lock(self._uri):
            if self._client is None:
                self._client = _import_mlflow()(self._uri)
            self._open_run()
        return self._client

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        client = self._client
        exp = client.get_experiment_by_name(self._experiment_name)
        if exp is not None:
            return exp.experiment_id
        location = None
        local = self._local_run_dir()
        if local is not None and self._uri == f"sqlite:///{local}/mlflow.db":
            # The default store: keep artifacts beside it, not in MLflow's ./mlartifacts (the cwd).
            location = os.path.join(local, "mlartifacts")
        try:
            return client.create_experiment(self._experiment_name, artifact_location=location)
        except MlflowException:  # created by someone else in between: use theirs
            exp = client.get_experiment_by_name(self._experiment_name)
            if exp is None:
                raise
            return exp.experiment_id

    def _open_run(self) -> None:
        from mlflow.exceptions import MlflowException

        client = self._client
        if self._run_id is not None:
            try:
                run = client.get_run(self._run_id)
            except MlflowException:  # e.g. the checkpoint came from a run on another tracking store
                log.warning("MLflowLogger: run %s is not in %s; starting a new MLflow run", self._run_id, self._uri)
                self._run_id = None
            else:
                if run.info.status != "RUNNING":
                    client.update_run(self._run_id, status="RUNNING")  # resumed
        if self._run_id is None and TRIAL_TAG in self._tags:
            self._run_id = self._find_trial_run()
        if self._run_id is None:
            run = client.create_run(self._experiment_id(), run_name=self._run_name, tags=self._tags)
            self._run_id = run.info.run_id
        self._opened = True
        log.info("MLflowLogger: tracking_uri=%s experiment=%r run_id=%s", self._uri, self._experiment_name,
                 self._run_id)

    def _find_trial_run(self) -> str | None:
        """This sweep trial's run, if an earlier attempt of the trial created one."""
        filters = " and ".join(f"tags.`{k}` = '{self._tags[k]}'" for k in (SWEEP_TAG, TRIAL_TAG))
        runs = self._client.search_runs([self._experiment_id()], filter_string=filters, max_results=1)
        return runs[0].info.run_id if runs else None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        client = self.experiment  # first: without mlflow, its error names the extra to install
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_key(k), float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), METRICS_PER_BATCH):
            client.log_batch(self._run_id, metrics=batch[i:i + METRICS_PER_BATCH])

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        client = self.experiment  # first: without mlflow, its error names the extra to install
        from mlflow.entities import Param

        flat = _hparams.flatten(_hparams.redacted(params))
        flat = {_key(k): str(v)[:MAX_PARAM_VALUE] for k, v in flat.items()}
        existing = client.get_run(self._run_id).data.params
        changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
        if changed:  # MLflow would reject the whole batch: log what is new, name what is not
            log.warning("MLflowLogger: params %s differ from those already logged to run %s; MLflow params "
                        "cannot change, keeping the old values", changed, self._run_id)
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        for i in range(0, len(new), PARAMS_PER_BATCH):
            client.log_batch(self._run_id, params=new[i:i + PARAMS_PER_BATCH])

    def finalize(self, status: str) -> None:
        if not self._opened:
            return  # nothing was logged in this process
        self._client.set_terminated(self._run_id, {"success": "FINISHED", "preempted": "KILLED"}.get(status, "FAILED"))
        self._opened = False  # a later stage (validate after fit) reopens the same run

    def state_dict(self) -> dict:
        return {"mlflow_run_id": self._run_id}

    def load_state_dict(self, state: dict) -> None:
        """On resume, continue the checkpoint's MLflow run."""
        run_id = state.get("mlflow_run_id")
        if not isinstance(run_id, str) or run_id == self._run_id:
            return
        if self._opened:
            # A run opened before the checkpoint was read (the client touched before fit): close
            # it; the next log reopens the checkpoint's run, status RUNNING again.
            self._client.set_terminated(self._run_id, "FINISHED")
            self._opened = False
        self._run_id = run_id

    def __getstate__(self) -> dict:
        # The client holds a database engine / HTTP session; a worker makes its own.
        state = self.__dict__.copy()
        state.update(_client=None, _uri=None, _opened=False)
        return state
