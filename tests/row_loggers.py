"""Loggers that record every (step, metrics) row they get, one for each trainer, so a side-by-side
test compares what raytrainer's loggers and Lightning's receive."""
from __future__ import annotations

import raytrainer as rt


class Rows:
    """``keep(key)`` picks the metrics recorded; values rounded to ``digits``."""

    digits = 6

    @staticmethod
    def keep(key: str) -> bool:
        return True

    def __init__(self):
        super().__init__()
        self.rows = []

    def log_metrics(self, metrics, step=None):
        kept = {k: round(float(v), self.digits) for k, v in metrics.items() if self.keep(k)}
        if kept:
            self.rows.append((step, kept))

    def log_hyperparams(self, *args, **kwargs):
        pass


def row_loggers(pl, keep=None, digits: int = 6) -> tuple[type, type]:
    """(raytrainer's, Lightning's) row-recording logger classes; ``pl``: pytorch_lightning."""
    attrs = {"digits": digits, **({"keep": staticmethod(keep)} if keep else {})}
    ours = type("RtRows", (Rows, rt.loggers.Logger), dict(attrs))
    theirs = type("PlRows", (Rows, pl.loggers.Logger), {**attrs, "name": "rows", "version": 0, "experiment": None})
    return ours, theirs
