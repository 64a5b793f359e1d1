"""Shared path helpers for loggers: local paths, ``file://`` URIs and remote fsspec staging.

Event and CSV writers need a real local file (tensorboardX appends to an open handle, and
object stores cannot append), so a logger whose log dir is remote writes into a local staging
directory and copies it up on ``save()``/``finalize()``.
"""
from __future__ import annotations

import logging
import os
import posixpath
import tempfile

from raytrainer import storage

log = logging.getLogger(__name__)

_FILE_SCHEME = "file://"


def is_remote(uri: str) -> bool:
    """True for fsspec URIs other than ``file://`` (``s3://``, ``gs://``, ``memory://``...)."""
    return "://" in uri and not uri.startswith(_FILE_SCHEME)


def strip_file_scheme(path: str) -> str:
    return path[len(_FILE_SCHEME):] if path.startswith(_FILE_SCHEME) else path


def join(base: str, name: str) -> str:
    """Join a child name onto a local path or URI (URIs always use ``/``)."""
    return posixpath.join(base.rstrip("/"), name) if "://" in base else os.path.join(base, name)


def leaf(name: str, version: int | str | None = None, sub_dir: str | None = None) -> str:
    """A logger's folder under its save dir, Lightning's layout: ``name[/version_N | /version][/sub_dir]``
    (no version folder when ``version`` is None: logs in the run dir, see _folder.py)."""
    parts = [name]
    if version is not None:
        parts.append(version if isinstance(version, str) else f"version_{version}")
    if sub_dir is not None:
        parts.append(str(sub_dir))
    return "/".join(parts)


def prefixed(metrics, prefix: str) -> dict:
    """Lightning's ``prefix``: ``{prefix}-{key}``."""
    return {f"{prefix}-{k}": v for k, v in metrics.items()} if prefix else dict(metrics)


def resolve_log_dir(log_dir: str, prefix: str) -> tuple[str, str, str | None]:
    """Return ``(log_dir, local_dir, remote_uri)`` for a logger's target directory.

    ``local_dir`` is where files are actually written: the directory itself for local targets,
    a fresh ``tempfile.mkdtemp`` staging folder for remote ones (``remote_uri`` is then set).
    """
    if is_remote(log_dir):
        return log_dir, tempfile.mkdtemp(prefix=prefix), log_dir
    local = strip_file_scheme(log_dir)
    os.makedirs(local, exist_ok=True)
    return local, local, None


def _filesystem(remote_uri: str, storage_options=None):
    # The same resolution as checkpoints (raytrainer.storage): the Trainer's storage_options, and
    # AWS_ENDPOINT_URL applied explicitly for s3:// -- so logs and checkpoints go to one place.
    return storage.filesystem(remote_uri, storage_options)


def sync_dir_to_remote(local_dir: str, remote_uri: str,
                       uploaded: dict[str, tuple[int, int]] | None = None,
                       storage_options=None, strict: bool = True) -> list[str]:
    """Copy every file under ``local_dir`` to the same relative path under ``remote_uri``.

    ``uploaded`` (optional, updated in place) maps relative paths to the ``(size, mtime_ns)``
    last uploaded, so repeated syncs skip unchanged files -- an event file is re-sent only when
    it grew, which keeps per-checkpoint syncs cheap on object stores. Returns the uploaded
    relative paths.

    ``strict=False`` (the uploads during training): a failure is printed, not raised. Storage
    that is unreachable for a while must not kill a run whose checkpoint commits are retried
    anyway; ``uploaded`` records only what arrived, so the next sync sends the rest.
    """
    if not strict:
        try:
            return sync_dir_to_remote(local_dir, remote_uri, uploaded, storage_options)
        except Exception as e:
            log.warning("uploading logs to %s failed (%s: %s); they stay in %s and the next upload sends them",
                        remote_uri, type(e).__name__, e, local_dir)
            return []
    fs, root = _filesystem(remote_uri, storage_options)
    sent = []
    for dirpath, _, files in os.walk(local_dir):
        for fname in sorted(files):
            lpath = os.path.join(dirpath, fname)
            rel = os.path.relpath(lpath, local_dir).replace(os.sep, "/")
            st = os.stat(lpath)
            stamp = (st.st_size, st.st_mtime_ns)
            if uploaded is not None and uploaded.get(rel) == stamp:
                continue
            rpath = posixpath.join(root.rstrip("/"), rel)
            fs.makedirs(posixpath.dirname(rpath), exist_ok=True)
            # put_file (not a recursive put of the folder): recursive put copies a directory
            # *into* an existing target folder, nesting the staging dir's random name.
            fs.put_file(lpath, rpath)
            if uploaded is not None:
                uploaded[rel] = stamp
            sent.append(rel)
    return sent


def fetch_remote_file(remote_uri: str, local_path: str, storage_options=None) -> bool:
    """Download ``remote_uri`` to ``local_path`` if it exists (resuming into a staging dir)."""
    fs, rpath = _filesystem(remote_uri, storage_options)
    if not fs.exists(rpath):
        return False
    fs.get_file(rpath, local_path)
    return True
