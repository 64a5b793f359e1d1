"""Logged values reduced across ranks (``self.log(..., sync_dist=True)``): exact, and never a hang.

Every rank calls ``reduce_across_ranks`` at the same points (training logging steps, epoch ends).
A mean is weighted by what each rank saw (its summed batch sizes), so it equals the mean one
process computes over the whole set, also when shards are uneven (exact evaluation: a rank may
see one batch fewer than another, or none at all).

What the ranks hold may differ in one legitimate way: a rank that logged nothing (it saw no
batch) contributes the reductions' identities (0 to sums, -inf to max, +inf to min). Any other
difference — ranks logging different names, or one name with different ``reduce_fx`` — is a bug
in the module that Lightning answers with a deadlock (Lightning #19106): here, the same clear
error on every rank, naming the metrics and the ranks.

Cost: one 2-element all-reduce compares the ranks' layouts by a fingerprint, then one all-reduce
per kind of reduction present (sum, max, min) carries every value; the layouts themselves are
gathered only when fingerprints differ.
"""
from __future__ import annotations

import zlib
from typing import Any, NamedTuple

import torch


class Logged(NamedTuple):
    name: str
    reduce_fx: str          # "mean" | "sum" | "max" | "min" | "metric" (agreed on, never reduced here)
    total: torch.Tensor     # for a mean: the weighted sum
    weight: float           # for a mean: the summed weights (batch sizes); else unused
    spec: Any = None        # how it was logged: a rank that logged nothing learns it from the others


def reduce_across_ranks(ctx, values: list[Logged], where: str) -> dict[str, tuple[torch.Tensor, Any]]:
    """Each name's ``(value over all ranks, spec)``. A collective: every rank calls it, in the
    same order."""
    layout = tuple(sorted((v.name, v.reduce_fx, v.spec) for v in values))
    layout = _agreed_layout(ctx, layout, where)
    if not layout:
        return {}
    mine = {v.name: v for v in values}
    device = values[0].total.device if values else ctx.device
    groups: dict[str, list] = {"sum": [], "max": [], "min": []}
    for name, fx, _ in layout:
        v = mine.get(name)
        if fx == "metric":
            continue  # a torchmetrics object: it syncs itself (loop/metrics.py)
        if fx == "mean":
            groups["sum"] += [v.total.float(), float(v.weight)] if v else [0.0, 0.0]
        elif fx == "sum":
            groups["sum"].append(v.total.float() if v else 0.0)
        else:
            groups[fx].append(v.total.float() if v else (-torch.inf if fx == "max" else torch.inf))
    # The same groups in the same order on every rank: the layout is agreed.
    reduced = {op: iter(ctx.all_reduce(_stack(items, device), op)) for op, items in groups.items() if items}
    out = {}
    for name, fx, spec in layout:
        if fx == "metric":
            out[name] = (None, spec)
        elif fx == "mean":
            group = reduced["sum"]
            total, weight = next(group), next(group)
            out[name] = (total / weight, spec)
        else:
            out[name] = (next(reduced["sum" if fx == "sum" else fx]), spec)
    return out


def _stack(items: list, device: torch.device) -> torch.Tensor:
    return torch.stack([x.reshape(()).to(device) if isinstance(x, torch.Tensor)
                        else torch.tensor(x, dtype=torch.float32, device=device) for x in items])


def _agreed_layout(ctx, layout: tuple, where: str) -> tuple:
    """The layout every rank that logged something has; an error when two of them differ.
    (Specs differing only in ``prog_bar``/``logger`` count as different: the same call on every
    rank is what Lightning requires too.)"""
    fingerprint = zlib.crc32(repr(layout).encode()) if layout else -1
    probe = torch.tensor([fingerprint, -fingerprint], dtype=torch.int64, device=ctx.device)
    high, neg_low = ctx.all_reduce(probe, "max").tolist()
    if high == -neg_low:
        return layout  # the same everywhere (including "nothing logged anywhere")
    layouts = ctx.all_gather_object(layout)
    logged = {rank: lay for rank, lay in enumerate(layouts) if lay}
    distinct = set(logged.values())
    if len(distinct) > 1:
        per_rank = "; ".join(f"rank {rank}: {_describe(lay)}" for rank, lay in logged.items())
        raise ValueError(
            f"self.log(..., sync_dist=True) {where}: the ranks logged different metrics ({per_rank}). "
            "Every rank must log the same names with the same reduce_fx, or the values cannot be "
            "reduced (Lightning hangs here). Log each name on every rank, or use sync_dist=False "
            "for a rank's own values")
    return distinct.pop() if distinct else ()


def _describe(layout: tuple) -> str:
    return ", ".join(name if fx == "mean" else f"{name} ({fx})" for name, fx, _ in layout)


def prime_empty_list_states(ctx, metrics: list) -> None:
    """Before torchmetrics objects sync themselves: a rank that evaluated no batch (exact
    evaluation with fewer batches than ranks) holds empty list states ("cat" states: AUROC's
    predictions), which torchmetrics cannot gather beside other ranks' 2-D tensors (a gloo size
    mismatch, or a hang). Such a state gets an empty tensor of the others' trailing shape and
    dtype, which gathers as nothing. One object gather, only for metrics with list states."""
    metrics = [m for m in metrics if any(isinstance(d, list) for d in getattr(m, "_defaults", {}).values())]
    if not metrics:
        return

    def layout(metric) -> dict:
        return {attr: (tuple(value[0].shape[1:]), value[0].dtype)
                for attr, default in metric._defaults.items()
                if isinstance(default, list) and (value := getattr(metric, attr)) and value[0].ndim}
    everyone = ctx.all_gather_object([layout(m) for m in metrics])
    for i, metric in enumerate(metrics):
        for attr, default in metric._defaults.items():
            if isinstance(default, list) and not getattr(metric, attr):
                known = next((rank[i][attr] for rank in everyone if attr in rank[i]), None)
                if known is not None:
                    shape, dtype = known
                    setattr(metric, attr, [torch.empty((0, *shape), dtype=dtype, device=metric.device)])
