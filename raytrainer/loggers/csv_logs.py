"""CSV logger: one ``metrics.csv`` per run, readable by pandas, a spreadsheet or ``csv``."""
from __future__ import annotations

import csv
import os
from typing import Any, Mapping

from raytrainer.loggers import _hparams, _sync
from raytrainer.loggers._folder import FolderLogger

METRICS_FILE = "metrics.csv"


def _read_rows(path: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Return ``(metric columns, rows)``; empty cells are dropped so rows merge cleanly."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c for c in (reader.fieldnames or []) if c != "step"]
        rows = []
        for raw in reader:
            row: dict[str, Any] = {k: v for k, v in raw.items() if v not in ("", None)}
            row["step"] = int(float(row["step"]))
            rows.append(row)
    return columns, rows


class CSVLogger(FolderLogger):
    """Write ``{log_dir}/metrics.csv``: a ``step`` column, then every metric name, sorted.

    One row per step: two ``log_metrics`` calls with the same step merge into one row. A metric
    that first appears later adds a column (the file is rewritten with the union header, empty
    cells where a row has no value). Rows are buffered and written every
    ``flush_logs_every_n_steps`` calls and on ``save()``/``finalize()``. An existing
    ``metrics.csv`` (a resumed run) is continued, not replaced. Remote log dirs are staged
    locally and uploaded on ``save()``/``finalize()``.
    """

    def __init__(self, save_dir: str | None = None, name: str = "csv", version: int | str | None = None,
                 prefix: str = "", flush_logs_every_n_steps: int = 100) -> None:
        if flush_logs_every_n_steps < 1:
            raise ValueError(f"flush_logs_every_n_steps must be >= 1, got "
                             f"{flush_logs_every_n_steps}")
        super().__init__(save_dir, name, version)
        self._prefix = prefix
        self._flush_every = flush_logs_every_n_steps
        self._buffer: list[dict[str, Any]] = []  # rows not yet in the file
        self._calls = 0
        self._last_step: int | None = None
        self._truncate_after: int | None = None  # set by load_state_dict before binding
        self._unbind()

    def _unbind(self) -> None:
        # State mirroring the file on this host; rebuilt from the file by _bind().
        self._local_dir: str | None = None
        self._remote: str | None = None
        self._uploaded: dict[str, tuple[int, int]] = {}
        self._columns: list[str] = []  # metric columns currently in the file
        self._last_row: dict[str, Any] | None = None  # last row in the file, for same-step merge
        self._rewrite_last = False  # buffer[0] replaces the file's last row

    @property
    def metrics_file(self) -> str | None:
        """Where ``metrics.csv`` lives (a URI for remote log dirs)."""
        return None if self.log_dir is None else _sync.join(self.log_dir, METRICS_FILE)

    def _rebind(self) -> None:
        self._unbind()

    def _bind(self) -> None:
        if self._local_dir is not None:
            return
        _, self._local_dir, self._remote = _sync.resolve_log_dir(self._require_target(), "raytrainer-csv-")
        path = self._path()
        if self._remote is not None:
            # Resuming into a fresh staging dir: bring the remote file down so we append to it.
            _sync.fetch_remote_file(_sync.join(self._remote, METRICS_FILE), path,
                                    self._storage_options)
        if os.path.exists(path):
            self._columns, rows = _read_rows(path)
            self._last_row = rows[-1] if rows else None
        if self._truncate_after is not None:
            self._truncate(self._truncate_after)

    def _path(self) -> str:
        return os.path.join(self._local_dir, METRICS_FILE)

    @property
    def experiment(self) -> "_CSVExperiment":
        """Lightning's ``CSVLogger.experiment`` (its experiment writer): rows and hparams written
        through this logger."""
        return _CSVExperiment(self)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._bind()
        # The logger's step wins over a metric that happens to be called "step" (as Lightning).
        values = {k: float(v) for k, v in _sync.prefixed(metrics, self._prefix).items() if k != "step"}
        if self._buffer and self._buffer[-1]["step"] == step:
            self._buffer[-1].update(values)
        elif not self._buffer and self._last_row is not None and self._last_row["step"] == step:
            # Same step as a row already flushed (e.g. epoch-end metrics after a save()).
            self._buffer.append({**self._last_row, **values})
            self._rewrite_last = True
        else:
            self._buffer.append({"step": step, **values})
        self._last_step = step if self._last_step is None else max(self._last_step, step)
        self._calls += 1
        if self._calls >= self._flush_every:
            self._flush()

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        self._bind()
        _hparams.write_hparams_yaml(self._local_dir, _hparams.redacted(params))

    def _flush(self) -> None:
        self._calls = 0
        if not self._buffer:
            return
        path = self._path()
        new_columns = set(self._columns).union(*(r.keys() for r in self._buffer)) - {"step"}
        if self._rewrite_last or new_columns != set(self._columns) or not os.path.exists(path):
            rows = _read_rows(path)[1] if os.path.exists(path) else []
            if self._rewrite_last:
                rows = rows[:-1]
            self._write_all(sorted(new_columns), rows + self._buffer)
        else:
            # Common case: same columns, so appending is enough (no O(file) rewrite per flush).
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=["step", *self._columns]).writerows(self._buffer)
        self._last_row = self._buffer[-1]
        self._buffer = []
        self._rewrite_last = False

    def _write_all(self, columns: list[str], rows: list[dict[str, Any]]) -> None:
        # Write-then-rename so a crash mid-rewrite never leaves a truncated metrics.csv.
        path = self._path()
        tmp = path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", *columns])
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        self._columns = columns

    def _truncate(self, step: int) -> None:
        """Drop rows logged after ``step``: the crashed run wrote them past its checkpoint."""
        self._truncate_after = None
        self._buffer = [r for r in self._buffer if r["step"] <= step]
        path = self._path()
        if not os.path.exists(path):
            return
        columns, rows = _read_rows(path)
        kept = [r for r in rows if r["step"] <= step]
        if len(kept) != len(rows):
            self._write_all(columns, kept)
        self._last_row = kept[-1] if kept else None

    def save(self) -> None:
        self._save(strict=False)  # during training: a failed upload is retried next save

    def finalize(self, status: str) -> None:
        # After a failure, a failing upload must not replace the run's own exception.
        self._save(strict=status == "success")

    def _save(self, strict: bool) -> None:
        if self._local_dir is None:
            return  # nothing logged yet in this process
        self._flush()
        if self._remote is not None:
            _sync.sync_dir_to_remote(self._local_dir, self._remote, self._uploaded,
                                     self._storage_options, strict=strict)

    def state_dict(self) -> dict:
        return {"step": self._last_step}

    def load_state_dict(self, state: dict) -> None:
        """On resume, forget rows newer than the checkpoint so the file has no duplicate steps."""
        step = state.get("step")
        self._last_step = step
        if step is None:
            return
        if self._local_dir is None:
            self._truncate_after = step  # applied when the file is opened
        else:
            self._truncate(step)

    def __getstate__(self) -> dict:
        # A copy starts with an empty buffer (the original still owns and flushes its unsaved
        # rows) and re-reads the file on first use; a staging dir is local to this host.
        state = self.__dict__.copy()
        state.update(_buffer=[], _calls=0, _local_dir=None, _remote=None, _uploaded={},
                     _columns=[], _last_row=None, _rewrite_last=False)
        return state


class _CSVExperiment:
    """What Lightning's CSV experiment writer offers: ``log_metrics(metrics_dict, step=None)``
    (tensors are read as numbers; no step: the row after the last one), ``log_hparams``,
    ``save``, ``log_dir`` and ``metrics_file_path``."""

    def __init__(self, logger: CSVLogger):
        self._logger = logger

    @property
    def log_dir(self) -> str | None:
        return self._logger.log_dir

    @property
    def metrics_file_path(self) -> str | None:
        return _sync.join(self.log_dir, METRICS_FILE) if self.log_dir is not None else None

    def log_metrics(self, metrics_dict: Mapping[str, Any], step: int | None = None) -> None:
        if step is None:
            last = self._logger._last_step
            step = 0 if last is None else last + 1
        self._logger.log_metrics({k: float(v) for k, v in metrics_dict.items()}, step)

    def log_hparams(self, params: Mapping[str, Any]) -> None:
        self._logger.log_hyperparams(params)

    def save(self) -> None:
        self._logger.save()
