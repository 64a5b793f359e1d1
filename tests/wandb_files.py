"""Readers for W&B offline run files (``run-<id>.wandb``): LevelDB-log framed, CRC-checked protobuf
``Record``s, parsed with wandb's own protobuf classes (wandb >= 0.2x ships no Python reader)."""
from __future__ import annotations

import glob
import json
import os
import struct
import time
import zlib


def wandb_records(path):
    """Every protobuf Record of a ``.wandb`` file, each chunk's CRC verified."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", path
    pos, pending, records = 7, b"", []  # after the 7-byte file header
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768  # chunks never cross 32 KiB blocks; the tail is zero padding
        if room < 7:
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc, f"corrupt chunk at {pos}"
        pending += chunk
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            records.append(pb.Record.FromString(pending))
            pending = b""
    return records


def wandb_run(path) -> dict:
    """id, config, history rows, exit code and artifacts of one offline run file."""
    out = {"id": None, "config": {}, "history": [], "exit_code": None, "artifacts": []}
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["id"] = rec.run.run_id
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in rec.history.item})
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
        elif kind == "artifact":
            out["artifacts"].append((rec.artifact.name, rec.artifact.type,
                                     sorted(c.path for c in rec.artifact.manifest.contents)))
    out["config"].pop("_wandb", None)
    return out


def offline_runs(save_dir, timeout_s: float = 20.0) -> list[dict]:
    """Every offline run under ``save_dir``, read once its file is complete: W&B's service process
    writes the file after ``finish()`` returns, and on a loaded machine the read can come first."""
    deadline = time.monotonic() + timeout_s
    while True:
        files = glob.glob(os.path.join(str(save_dir), "wandb", "offline-run-*", "run-*.wandb"))
        runs = [wandb_run(f) for f in sorted(files, key=os.path.getmtime)]
        if all(r["id"] is not None and r["exit_code"] is not None for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)


def series(rows, key) -> list[tuple[int, float]]:
    return [(r["trainer/global_step"], r[key]) for r in rows if key in r]
