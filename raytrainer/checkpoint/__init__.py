"""Checkpoints: the format (format.py), writing and reading (store.py, sharded.py for FSDP
shards), background commits (writer.py), and which checkpoint a run starts from (resume.py).

Public: ``load`` (also ``rt.load_checkpoint``), ``list_committed`` and ``latest_committed``
(a run's committed checkpoints, oldest first / the newest), ``read_marker`` (what a committed
checkpoint says it is; None when it is not committed)."""
from raytrainer.checkpoint.format import read_marker
from raytrainer.checkpoint.store import latest_committed, list_committed, load

__all__ = ["load", "list_committed", "latest_committed", "read_marker"]
