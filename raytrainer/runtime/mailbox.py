"""The driver's end of a Ray fit: a small actor where workers leave their results and errors and
the driver leaves a stop request; and how an exception crosses from a worker to the driver with
its own type, message and the worker's traceback."""
from __future__ import annotations

import asyncio
import time
import traceback
from typing import Any

from raytrainer.runtime.cluster import import_ray

ray = import_ray()


@ray.remote(num_cpus=0)
class Mailbox:
    """The driver's end of a fit: workers leave results and errors here, the driver leaves a stop
    request. An async actor, so rank 0 can wait on the stop request (``wait_for_stop``) and hear
    of a Ctrl-C at once instead of at its next poll, while other calls are still answered."""

    def __init__(self):
        self.items: dict[str, Any] = {}
        self._stop: asyncio.Event | None = None  # made on first use, in the actor's event loop

    def _stop_event(self) -> asyncio.Event:
        if self._stop is None:
            self._stop = asyncio.Event()
        return self._stop

    async def put(self, key: str, value: Any) -> None:
        self.items.setdefault(key, value)
        if key == "stop":
            self._stop_event().set()

    async def get(self, key: str) -> Any:
        return self.items.get(key)

    async def wait_for_stop(self, timeout_s: float) -> Any:
        """The stop request once there is one, or None after ``timeout_s``."""
        try:
            await asyncio.wait_for(self._stop_event().wait(), timeout_s)
        except asyncio.TimeoutError:
            return None
        return self.items.get("stop")

    async def drop_errors(self) -> None:
        """A restarted worker group starts clean: the failure that ends the fit is its own."""
        self.items = {k: v for k, v in self.items.items() if not k.startswith("error/")}

    async def get_all(self) -> dict[str, Any]:
        return self.items


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
