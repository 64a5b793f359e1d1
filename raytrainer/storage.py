"""Storage: every path raytrainer reads or writes is an fsspec URI.

Local paths, ``file://``, ``memory://``, ``s3://`` (s3fs) and anything else fsspec knows. S3
endpoint, credentials and region come from the standard AWS sources (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance roles) or from the user's
``storage_options``; they are never written to logs, configs, hparams or checkpoints.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import fsspec


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def normalize(uri: str) -> str:
    """Local paths become absolute (so a run dir means the same thing in every worker)."""
    if "://" in uri:
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def filesystem(uri: str, storage_options: Mapping[str, Any] | None = None):
    """(fsspec filesystem, path within it) for ``uri``."""
    options = dict(storage_options or {})
    if uri.startswith("s3://") and "endpoint_url" not in options:
        # s3fs reads AWS_ENDPOINT_URL_S3/AWS_ENDPOINT_URL only through botocore's config chain in
        # recent versions; pass it explicitly so a loopback/MinIO endpoint always applies.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def ray_storage(uri: str, storage_options: Mapping[str, Any] | None = None):
    """(storage_path, storage_filesystem) for Ray's ``RunConfig``.

    Local paths pass through. Remote URIs become a pyarrow filesystem wrapping the same fsspec
    filesystem raytrainer writes with, and a path *without* the scheme (Ray's controller fails
    on ``s3://`` together with a filesystem object, RAY_NOTES.md). The filesystem object is
    pickled to Ray's controller and workers; it carries credentials only if the user passed
    them in ``storage_options`` (otherwise each process reads the standard AWS sources)."""
    if not is_remote(uri):
        return normalize(uri.removeprefix("file://")), None
    import pyarrow.fs
    fs, path = filesystem(uri, storage_options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
