"""The commit seal of a run's ``.ckpt`` file: how one file says "committed, and intact".

A ``.ckpt`` is what ``torch.save`` writes, a zip archive, so ``torch.load`` and Lightning read it
as is. Its seal is the archive's comment (the zip format's own free-text field, at the very end
of the file, which zip readers and torch skip): a JSON object with the sha256 and size of
everything before the archive's end record, and the checkpoint's position (step, epoch, the fit
that wrote it, its loggers' versions). A file without a seal is not one of the run's checkpoints
(a foreign or hand-made file); a file whose bytes do not match its seal is torn or corrupted and
is never resumed from. Listing a run's checkpoints reads only each file's last bytes.
"""
from __future__ import annotations

import hashlib
import json
import struct
from typing import Mapping

from raytrainer.errors import CheckpointError

_END_SIGNATURE = b"PK\x05\x06"
_END_RECORD = 22  # the end-of-central-directory record without its comment
MAX_SEAL = 0xFFFF  # a zip comment's length is 16 bits
SEAL_KEY = "raytrainer_commit"


def seal(archive: bytes, meta: Mapping) -> bytes:
    """``archive`` (torch.save's bytes, no comment) with the seal as its comment."""
    if archive[-_END_RECORD:-_END_RECORD + 4] != _END_SIGNATURE or archive[-2:] != b"\x00\x00":
        raise ValueError("not a zip archive without a comment (torch.save's output)")
    body = archive[:-_END_RECORD]
    comment = json.dumps({SEAL_KEY: 1, "sha256": hashlib.sha256(body).hexdigest(), "size": len(body),
                          **meta}, separators=(",", ":")).encode()
    if len(comment) > MAX_SEAL:
        raise ValueError(f"a checkpoint seal is at most {MAX_SEAL} bytes, this one is {len(comment)}")
    return archive[:-2] + struct.pack("<H", len(comment)) + comment


def read_seal(tail: bytes) -> dict | None:
    """The seal in the last bytes of a file (at least ``MAX_SEAL + 22`` of them, or the whole
    file), or None: no zip end record there, no comment, or a comment that is not a seal."""
    at = tail.rfind(_END_SIGNATURE)
    while at >= 0:
        if at + _END_RECORD <= len(tail):
            (length,) = struct.unpack("<H", tail[at + _END_RECORD - 2:at + _END_RECORD])
            if at + _END_RECORD + length == len(tail):  # the comment runs to the end of the file
                try:
                    meta = json.loads(tail[at + _END_RECORD:])
                except (ValueError, UnicodeDecodeError):
                    return None
                return meta if isinstance(meta, dict) and meta.get(SEAL_KEY) == 1 else None
        at = tail.rfind(_END_SIGNATURE, 0, at)
    return None


def tail_size() -> int:
    """How many bytes from a file's end ``read_seal`` needs."""
    return MAX_SEAL + _END_RECORD


def verify(data: bytes, where: str) -> dict:
    """The seal of the whole file ``data``, after checking the bytes against it."""
    meta = read_seal(data[-tail_size():])
    if meta is None:
        raise CheckpointError(f"{where} is not a committed raytrainer checkpoint (no commit seal at its end): "
                              "a save that did not finish, or a file written by something else")
    size = meta.get("size")
    if (not isinstance(size, int) or size + _END_RECORD > len(data) or data[size:size + 4] != _END_SIGNATURE
            or hashlib.sha256(data[:size]).hexdigest() != meta.get("sha256")):
        raise CheckpointError(f"checkpoint file {where} is corrupted: its content does not match the hash in "
                              "its commit seal; load an earlier checkpoint")
    return meta
