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
