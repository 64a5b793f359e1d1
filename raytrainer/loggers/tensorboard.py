"""TensorBoard logger on ``tensorboardX`` (no TensorFlow needed to write event files)."""
from __future__ import annotations

import os
import time
import warnings
from typing import Any, Mapping

import torch

from raytrainer.loggers import _hparams, _sync
from raytrainer.loggers._folder import FolderLogger
from raytrainer.utilities import move_to_device


class TensorBoardLogger(FolderLogger):
    """Write scalars and hyperparameters as TensorBoard event files.

    The log dir is ``{save_dir}/{name}/version_N[/sub_dir]`` (Lightning's layout: N the next free
    version unless given), or ``{run_dir}/{name}[/sub_dir]`` without a ``save_dir`` (see
    _folder.py). ``prefix``: metric keys become ``{prefix}-{key}``; ``default_hp_metric``:
    ``hp_metric`` = -1 logged with the hyperparameters (Lightning's placeholder).
    A remote log dir (``s3://...``) is written to a local staging folder and uploaded on
    ``save()``/``finalize()``. The ``SummaryWriter`` is opened lazily, on first use, and dropped
    when pickled, so a logger travels to Ray workers as a few strings.
    """

    def __init__(self, save_dir: str | None = None, name: str = "tensorboard", version: int | str | None = None,
                 log_graph: bool = False, default_hp_metric: bool = True, prefix: str = "",
                 sub_dir: str | None = None, flush_secs: int = 10) -> None:
        super().__init__(save_dir, name, version, sub_dir)
        self._log_graph = log_graph
        self._default_hp_metric = default_hp_metric
        self._prefix = prefix
        self._flush_secs = flush_secs
        self._unbind()
        self._purge_step: int | None = None
        self._last_step: int | None = None

    def _unbind(self) -> None:
        # Everything tied to this process: the open writer and where files are staged.
        self._writer = None
        self._local_dir: str | None = None
        self._remote: str | None = None
        self._uploaded: dict[str, tuple[int, int]] = {}

    def _rebind(self) -> None:
        self._close_writer()
        self._unbind()

    def _bind(self) -> None:
        if self._local_dir is None:
            _, self._local_dir, self._remote = _sync.resolve_log_dir(self._require_target(), "raytrainer-tb-")

    @property
    def experiment(self):
        """The ``tensorboardX.SummaryWriter``, opened on first access."""
        if self._writer is None:
            from tensorboardX import SummaryWriter  # lazy: keeps `import raytrainer` light

            self._bind()
            # tensorboardX names files by the second and hostname only: two writers opened in the
            # same second would clobber each other. The suffix makes names unique and keeps them
            # in creation order, the order TensorBoard reads a directory's files in.
            # purge_step makes TensorBoard hide events a crashed run wrote past its checkpoint.
            self._writer = SummaryWriter(logdir=self._local_dir, flush_secs=self._flush_secs,
                                         purge_step=self._purge_step,
                                         filename_suffix=f".{time.time_ns()}.{os.getpid()}")
            self._purge_step = None
        return self._writer

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        writer = self.experiment
        for key, value in _sync.prefixed(metrics, self._prefix).items():
            writer.add_scalar(key, float(value), global_step=step)
        self._last_step = step if self._last_step is None else max(self._last_step, step)

    def log_hyperparams(self, params: Mapping[str, Any],
                        metrics: Mapping[str, float] | None = None) -> None:
        """Write the hparams-plugin summaries and ``hparams.yaml``.

        ``metrics`` names the scalar tags the HParams dashboard shows next to each run (values,
        if given, are logged at step 0 as Lightning does); without any, ``hp_metric`` = -1 is the
        placeholder (``default_hp_metric``, Lightning's).
        """
        if metrics is None and self._default_hp_metric:
            metrics = {"hp_metric": -1}
        from tensorboardX.summary import hparams

        params = _hparams.redacted(params)
        flat = {k: _hparams.scalar_or_str(v) for k, v in _hparams.flatten(params).items()}
        writer = self.experiment
        # Into the run's own event file (not add_hparams, which opens a sub-folder per call), so
        # the dashboard pairs these hparams with this run's scalars.
        exp, ssi, sei = hparams(flat, dict(metrics or {}))
        file_writer = writer._get_file_writer()
        for summary in (exp, ssi, sei):
            file_writer.add_summary(summary)
        if metrics:
            self.log_metrics(metrics, 0)
        _hparams.write_hparams_yaml(self._local_dir, params)

    def log_graph(self, model: Any, input_array: Any = None) -> None:
        """With ``log_graph=True``, the model's graph traced on ``input_array`` (default: the
        module's ``example_input_array``), as Lightning does at fit start."""
        if not self._log_graph:
            return
        input_array = getattr(model, "example_input_array", None) if input_array is None else input_array
        if input_array is None:
            warnings.warn("Could not log computational graph to TensorBoard: The `model.example_input_array` "
                          "attribute is not set or `input_array` was not given.")
        elif not isinstance(input_array, (torch.Tensor, tuple)):
            warnings.warn("Could not log computational graph to TensorBoard: The `input_array` or "
                          f"`model.example_input_array` has type {type(input_array)} which can't be traced by "
                          "TensorBoard. Make the input array a tuple representing the positional arguments to "
                          "the model's `forward()` implementation.")
        else:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            self.experiment.add_graph(model, move_to_device(input_array, device))

    def save(self) -> None:
        """Flush; for a remote log dir, also upload.

        tensorboardX's ``flush()`` does not drain its event queue (a background thread writes
        events within ``flush_secs``), so a local flush is best effort. An upload needs complete
        files, so with a remote log dir the writer is closed instead (close drains the queue) and
        the next event opens a new file: closed files never change, and are uploaded once.
        """
        if self._remote is not None:
            self._close_writer()
            self._upload(strict=False)  # during training: a failed upload is retried next save
        elif self._writer is not None:
            self._writer.flush()

    def finalize(self, status: str) -> None:
        self._close_writer()
        # After a failure, a failing upload must not replace the run's own exception.
        self._upload(strict=status == "success")

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _upload(self, strict: bool) -> None:
        if self._remote is not None and self._local_dir is not None:
            _sync.sync_dir_to_remote(self._local_dir, self._remote, self._uploaded,
                                     self._storage_options, strict=strict)

    def state_dict(self) -> dict:
        return {"step": self._last_step}

    def load_state_dict(self, state: dict) -> None:
        """On resume, hide events logged after the checkpoint by the run that crashed."""
        step = state.get("step")
        self._last_step = step
        if step is not None:
            self._close_writer()  # the purge marker is written when the next writer opens
            self._purge_step = step + 1

    def __getstate__(self) -> dict:
        # The writer holds an open file and a thread; a staging dir is local to this host.
        state = self.__dict__.copy()
        state.update(_writer=None, _local_dir=None, _remote=None, _uploaded={})
        return state
