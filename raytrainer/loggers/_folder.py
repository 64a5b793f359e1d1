"""What TensorBoardLogger and CSVLogger share: where their folder is, Lightning's way.

``{save_dir}/{name}/version_N[/sub_dir]``: with a ``save_dir`` and no ``version``, N is the next
free version number there, chosen once per logger (Lightning's ``_get_next_version``). raytrainer
chooses it on the driver before anything starts (``resolve_version``), so every worker, and
every restart of the workers within the fit, writes the same folder; a fit that continues its
own run's checkpoint continues the version that checkpoint recorded (Lightning would open the
next one: raytrainer's resume is exact, so the run's curves stay one). Without a ``save_dir``
the logs live in the run dir, ``{run_dir}/{name}``, with no version folder (a resumed run
continues there).
"""
from __future__ import annotations

import logging
import os
import re

from raytrainer import storage
from raytrainer.loggers import _sync
from raytrainer.loggers.base import Logger

log = logging.getLogger(__name__)

_VERSION_DIR = re.compile(r"version_(\d+)")


def next_version(root: str, storage_options=None) -> int:
    """One more than the highest ``version_N`` folder under ``root`` (0 when there is none)."""
    fs, path = storage.filesystem(root, storage_options)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return 0
    versions = [int(m.group(1)) for e in entries if e.get("type") == "directory"
                and (m := _VERSION_DIR.fullmatch(os.path.basename(e["name"].rstrip("/"))))]
    return max(versions) + 1 if versions else 0


class FolderLogger(Logger):
    """A logger writing files into one folder (see the module docstring for where)."""

    def __init__(self, save_dir: str | None, name: str, version: int | str | None,
                 sub_dir: str | None = None) -> None:
        self._save_dir = save_dir
        self._name = name
        self._version = version
        self._sub_dir = sub_dir
        self._storage_options: dict | None = None
        self._run_dir: str | None = None  # set by setup(): where logs go without a save_dir

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> int | str | None:
        """The version folder's number (or name); with a ``save_dir`` and none given, the next
        free one, chosen on first use as Lightning does."""
        if self._save_dir is not None and self._version is None:
            self.resolve_version()
        return self._version

    @property
    def save_dir(self) -> str | None:
        return self._save_dir

    @property
    def root_dir(self) -> str | None:
        """``{save_dir}/{name}``: the parent of every version folder (Lightning's ``root_dir``)."""
        base = self._save_dir if self._save_dir is not None else self._run_dir
        return None if base is None else self._plain(_sync.join(base, self._name))

    def _target(self) -> str | None:
        """The folder written to, as given (``file://`` kept): a URI or local path, or None before
        a logger without ``save_dir`` is set up."""
        if self._save_dir is None:
            base, version = self._run_dir, None
        else:
            base, version = self._save_dir, self.version
        return None if base is None else _sync.join(base, _sync.leaf(self._name, version, self._sub_dir))

    @property
    def log_dir(self) -> str | None:
        """The log dir (a local path, or the remote URI when staging)."""
        target = self._target()
        return None if target is None else self._plain(target)

    @staticmethod
    def _plain(uri: str) -> str:
        return uri if _sync.is_remote(uri) else _sync.strip_file_scheme(uri)

    def resolve_version(self, storage_options=None, recorded: int | str | None = None) -> None:
        """Fix the version folder once: ``recorded`` (the version a checkpoint of this run wrote
        to) when given, else the next free one. A version already given or chosen stays."""
        if self._save_dir is None or self._version is not None:
            return
        if recorded is not None:
            self._version = recorded
            return
        options = storage_options if storage_options is not None else self._storage_options
        self._version = next_version(_sync.join(self._save_dir, self._name), options)
        log.debug("%s logs to version_%d under %s", type(self).__name__, self._version, self._save_dir)

    def join_sweep(self, sweep_dir: str, trial_name: str) -> None:
        # Without a save_dir each trial logs in its own run dir already. With one, trials running
        # at once would race for the same next version_N: each trial's version is its name.
        if self._save_dir is not None and self._version is None:
            self._version = trial_name

    def setup(self, run_dir: str, storage_options=None) -> None:
        # storage_options: the Trainer's fsspec options for a remote log dir (never logged).
        self._storage_options = dict(storage_options) if storage_options else None
        before = self._target()
        self._run_dir = run_dir
        if self._target() != before:
            self._rebind()
        self._bind()

    def _rebind(self) -> None:
        """The folder changed (a new run dir): drop what is tied to the old one."""

    def _bind(self) -> None:
        """Open the folder for writing (subclasses)."""

    def _require_target(self) -> str:
        target = self._target()
        if target is None:
            raise RuntimeError(f"{type(self).__name__} has no log dir: pass save_dir= or call setup(run_dir) first")
        return target


def versions_record(loggers) -> list[dict]:
    """What a checkpoint's marker records of its run's versioned loggers."""
    return [{"logger": type(lg).__name__, "name": lg.name, "version": lg.version}
            for lg in loggers if isinstance(lg, FolderLogger) and lg.save_dir is not None]


def resolve_versions(loggers, record: list[dict], storage_options=None) -> None:
    """Fix the version of every versioned logger: the one ``record`` (``versions_record`` of the
    checkpoint this fit continues) holds for its class and name, else the next free one."""
    recorded = {(r["logger"], r["name"]): r["version"] for r in record}
    for lg in loggers:
        if isinstance(lg, FolderLogger):
            lg.resolve_version(storage_options, recorded.get((type(lg).__name__, lg.name)))
