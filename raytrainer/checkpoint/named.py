"""The files ``ModelCheckpoint(dirpath=, filename=)`` names, as Lightning names them.

A run's checkpoints stay where resume finds them (``checkpoints/step=....ckpt``, committed and
sealed once). A named file is published from one of them *after* it committed: a hard link on
the same local filesystem (no bytes copied), else a copy (server-side on object stores: S3's
CopyObject, whole or absent); ``save_weights_only`` writes a weights-only file instead. A named
file holds the same sealed bytes, so it loads, resumes and is hash-checked like the original.
"""
from __future__ import annotations

import os
import re
import uuid
from typing import Any, Mapping

from raytrainer import storage
from raytrainer.checkpoint.format import CKPT_SUFFIX
from raytrainer.checkpoint.layout import LIGHTNING_FORMAT_VERSION
from raytrainer.checkpoint.lightning_file import read_any, write_ckpt

JOIN, EQUALS, LAST = "-", "=", "last"  # Lightning's CHECKPOINT_JOIN_CHAR, _EQUALS_CHAR, _NAME_LAST
_WEIGHTS_KEYS = ("epoch", "global_step", "pytorch-lightning_version", "state_dict", "hyper_parameters",
                 "datamodule_hyper_parameters", "loops")


def format_name(template: str | None, metrics: Mapping[str, Any], auto_insert_metric_name: bool = True) -> str:
    """Lightning's ``ModelCheckpoint._format_checkpoint_name``: ``"{epoch}-{val_loss:.2f}"`` with
    ``{"epoch": 2, "val_loss": 0.1234}`` -> ``"epoch=2-val_loss=0.12"``; a name not in
    ``metrics`` formats as 0; ``auto_insert_metric_name=False`` leaves the template's own text."""
    filename = template or "{epoch}" + JOIN + "{step}"
    values = dict(metrics)
    # longest names first: "{epoch_test}" must not be replaced as "{epoch}" + "_test"
    for group in sorted(re.findall(r"(\{.*?)[:\}]", filename), key=len, reverse=True):
        name = group[1:]
        if auto_insert_metric_name:
            filename = filename.replace(group, name + EQUALS + "{" + name)
        filename = filename.replace(group, f"{{0[{name}]")  # names with dots or slashes format too
        values.setdefault(name, 0)
    return filename.format(values)


def path_for(dirpath: str, name: str, version: int | None = None) -> str:
    return storage.join(dirpath, name + (f"{JOIN}v{version}" if version is not None else "") + CKPT_SUFFIX)


def free_path(dirpath: str, name: str, taken: set[str], storage_options: Mapping | None = None,
              reuse: str | None = None) -> str:
    """``dirpath/name.ckpt``, or Lightning's ``name-v1.ckpt``, ``-v2``... when that name is on
    storage or ``taken`` (named by this callback, maybe not published yet); ``reuse`` (the file
    this one replaces, e.g. the previous ``last.ckpt``) counts as free."""
    fs, _ = storage.filesystem(dirpath, storage_options)
    version, path = None, path_for(dirpath, name)
    while path != reuse and (path in taken or fs.exists(storage.filesystem(path, storage_options)[1])):
        version = 1 if version is None else version + 1
        path = path_for(dirpath, name, version)
    return path


def publish(source: str, target: str, storage_options: Mapping | None = None, weights_only: bool = False) -> None:
    """Make ``target`` hold the committed checkpoint ``source`` (see the module docstring);
    replaces an earlier ``target`` atomically."""
    fs, src = storage.filesystem(source, storage_options)
    tfs, dst = storage.filesystem(target, storage_options)
    tfs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
    if weights_only:
        checkpoint = read_any(source, "cpu", None, storage_options)
        write_ckpt(target, {k: checkpoint[k] for k in _WEIGHTS_KEYS if k in checkpoint}
                   | {"pytorch-lightning_version": LIGHTNING_FORMAT_VERSION}, storage_options)
        return
    local = type(fs).__name__ == type(tfs).__name__ == "LocalFileSystem"
    if local:
        if os.path.exists(dst) and os.path.samefile(src, dst):
            return  # published from this checkpoint already
        tmp = f"{dst}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            os.link(src, tmp)  # no bytes copied; the run may delete its own name later
        except OSError:  # another filesystem, or links not allowed there
            fs.copy(src, tmp)
        os.replace(tmp, dst)
    elif type(fs) is type(tfs):
        tfs.copy(src, dst)  # server-side on object stores
    else:
        tfs.pipe_file(dst, fs.cat_file(src))


def delete(path: str, storage_options: Mapping | None = None) -> None:
    fs, fs_path = storage.filesystem(path, storage_options)
    try:
        fs.rm(fs_path)
    except FileNotFoundError:
        pass
