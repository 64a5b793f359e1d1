"""The driver's mailbox (runtime/mailbox.py): one actor per driver process serves all its fits,
each in its own channel; a fit's end closes its channel for good. The actor's methods, run
in-process on an event loop (the Ray fits in test_ray_train.py use the real actor)."""
from __future__ import annotations

import asyncio
import time

import pytest

from raytrainer.runtime.mailbox import Mailbox

pytestmark = pytest.mark.timeout(60)


def test_channels_are_apart_and_a_closed_one_stays_closed():
    box = Mailbox.__ray_actor_class__()

    async def scenario():
        await box.put("fit-a", "result", b"a")
        await box.put("fit-b", "error/00001", "boom")
        await box.put("fit-a", "result", b"second")  # the first value stays (a restarted rank's)
        assert await box.get_all("fit-a") == {"result": b"a"}
        waiting = asyncio.ensure_future(box.wait_for_stop("fit-b", 5))
        await box.put("fit-a", "stop", "SIGTERM")  # another fit's stop does not wake it
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await box.put("fit-b", "stop", "Ctrl-C")
        assert await waiting == "Ctrl-C"
        await box.drop_errors("fit-b")
        assert await box.get_all("fit-b") == {"stop": "Ctrl-C"}
        assert await box.close("fit-a") == {"result": b"a", "stop": "SIGTERM"}
        # a dying worker's late calls: nothing stored again, and the stop poll waits (no spin)
        await box.put("fit-a", "error/00000", "late")
        started = time.monotonic()
        assert await box.wait_for_stop("fit-a", 0.2) is None
        assert time.monotonic() - started >= 0.2
        assert "fit-a" not in box.items and "fit-a" not in box._stops
        assert await box.get_all("fit-b") == {"stop": "Ctrl-C"}

    asyncio.run(scenario())
