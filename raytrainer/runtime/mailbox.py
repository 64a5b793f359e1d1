"""The driver's end of a Ray fit: a small actor where workers leave their results and errors and
the driver leaves a stop request; and how an exception crosses from a worker to the driver with
its own type, message and the worker's traceback.

One mailbox actor serves every fit of the process that calls ``fit`` (a script, a notebook, a
Tune trial): a new actor per fit cost a process start (~1 CPU-second here, on every fit). Each fit
has its own channel in it, named by the fit's token. The actor is owned by that process and dies
with it, which is what workers rely on to tell a dead driver from a slow one."""
from __future__ import annotations

import asyncio
import collections
import functools
import time
import traceback
from typing import Any

from raytrainer.runtime.cluster import import_ray

ray = import_ray()


@ray.remote(num_cpus=0)
class Mailbox:
    """Channels by fit token: workers leave results and errors, the driver leaves a stop request.
    An async actor, so rank 0 can wait on the stop request (``wait_for_stop``) and hear of a
    Ctrl-C at once instead of at its next poll, while other calls are still answered."""

    def __init__(self):
        self.items: dict[str, dict[str, Any]] = {}
        self._stops: dict[str, asyncio.Event] = {}  # made on first use, in the actor's event loop
        self._progress: dict[str, collections.deque] = {}
        # Fits that ended: a dying worker's late call must not open their channel again (a leak
        # per fit in a long-lived process). Bounded: only calls racing a fit's end need it.
        self._closed: collections.deque[str] = collections.deque(maxlen=4096)

    def _stop_event(self, token: str) -> asyncio.Event:
        return self._stops.setdefault(token, asyncio.Event())

    async def put(self, token: str, key: str, value: Any) -> None:
        if token in self._closed:
            return
        self.items.setdefault(token, {}).setdefault(key, value)
        if key == "stop":
            self._stop_event(token).set()

    async def get(self, token: str, key: str) -> Any:
        return self.items.get(token, {}).get(key)

    async def wait_for_stop(self, token: str, timeout_s: float) -> Any:
        """The stop request once there is one, or None after ``timeout_s``."""
        if token in self._closed:  # the fit is over; answering at once would make the caller spin
            await asyncio.sleep(timeout_s)
            return None
        try:
            await asyncio.wait_for(self._stop_event(token).wait(), timeout_s)
        except asyncio.TimeoutError:
            return None
        return self.items.get(token, {}).get("stop")

    async def progress(self, token: str, state: dict) -> None:
        """Rank 0's progress bar states and notices (callbacks/progress.py); kept until the driver
        takes them."""
        if token not in self._closed:
            self._progress.setdefault(token, collections.deque(maxlen=256)).append(state)

    async def take_progress(self, token: str) -> list[dict]:
        """The states sent since the last call, oldest first (at most a few a second; bounded
        for a driver that stopped looking)."""
        states = self._progress.get(token)
        taken = list(states or ())
        if states:
            states.clear()
        return taken

    async def drop_errors(self, token: str) -> None:
        """A restarted worker group starts clean: the failure that ends the fit is its own."""
        channel = self.items.get(token, {})
        self.items[token] = {k: v for k, v in channel.items() if not k.startswith("error/")}

    async def get_all(self, token: str) -> dict[str, Any]:
        return self.items.get(token, {})

    async def environ(self, keys: list[str]) -> dict[str, str | None]:
        """The environment an actor without a runtime_env gets on this cluster (these keys)."""
        import os
        return {k: os.environ.get(k) for k in keys}

    async def close(self, token: str) -> dict[str, Any]:
        """Everything the fit left, and the channel gone."""
        self._closed.append(token)
        self._stops.pop(token, None)
        self._progress.pop(token, None)
        return self.items.pop(token, {})


class FitMailbox:
    """One fit's channel in its driver's mailbox: what workers and the driver hold (picklable)."""

    def __init__(self, actor, token: str):
        self.actor, self.token = actor, token

    def put(self, key: str, value: Any):
        return self.actor.put.remote(self.token, key, value)

    def get(self, key: str):
        return self.actor.get.remote(self.token, key)

    def wait_for_stop(self, timeout_s: float):
        return self.actor.wait_for_stop.remote(self.token, timeout_s)

    def drop_errors(self):
        return self.actor.drop_errors.remote(self.token)

    def send_progress(self, state: dict) -> None:
        """Fire and forget: the step never waits for the driver's bar."""
        self.actor.progress.remote(self.token, state)

    def take_progress(self):
        return self.actor.take_progress.remote(self.token)

    def get_all(self):
        return self.actor.get_all.remote(self.token)

    def close(self):
        return self.actor.close.remote(self.token)

    def environ(self, keys: list[str]):
        return self.actor.environ.remote(keys)


def open_mailbox(token: str) -> FitMailbox:
    """This process's mailbox, with a channel for the fit ``token``."""
    context = ray.get_runtime_context()
    return FitMailbox(_process_mailbox(context.get_job_id(), context.get_worker_id()), token)


@functools.lru_cache(maxsize=4)
def _process_mailbox(job_id: str, worker_id: str):
    """The mailbox of this process in this Ray session (the key), started on first use on this
    node: it then lives exactly as long as this process (a 0-CPU actor elsewhere would die with
    its node). The cache holds the handle on purpose: Ray ends an actor, even a named one, once no
    handle to it is left, and it must outlive each fit."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    return Mailbox.options(name=f"raytrainer-mailbox-{worker_id}", get_if_exists=True,
                           scheduling_strategy=NodeAffinitySchedulingStrategy(
                               node_id=ray.get_runtime_context().get_node_id(), soft=False)).remote()


def pack_error(e: BaseException, rank: int) -> dict:
    import cloudpickle
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    try:
        blob = cloudpickle.dumps(e)
    except Exception:
        blob = None
    return {"blob": blob, "type": type(e).__name__, "message": str(e), "traceback": tb, "rank": rank,
            "time": time.time()}


def unpack_error(err: dict) -> BaseException:
    import cloudpickle
    exc = None
    if err["blob"] is not None:
        try:
            exc = cloudpickle.loads(err["blob"])
        except Exception:
            exc = None
    if exc is None:
        exc = RuntimeError(f"{err['type']}: {err['message']}")
    note = f"raised in Ray Train worker rank {err['rank']}; its traceback:\n{err['traceback']}"
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    return exc
