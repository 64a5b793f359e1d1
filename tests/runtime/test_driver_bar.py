"""The progress bar of a Ray fit is drawn on the driver: in a terminal (here a pseudo-terminal)
one live bar per epoch redrawn in place, with the model summary logged there too and the
workers' prints behind their rank, none of it behind Ray's ``(RayTrainWorker pid=...)`` prefix;
Ray started by the user's own ``ray.init``."""
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time

import pytest
from helpers import TESTS_DIR

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


def _run_in_a_terminal(args, timeout_s=180):
    """Run ``args`` with stdout and stderr on a pseudo-terminal of 120 columns; return what it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    env = {k: v for k, v in env.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal: it has exited
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    return code, b"".join(chunks).decode(errors="replace")


def test_ray_fit_draws_one_live_bar_on_the_driver(tmp_path):
    code, out = _run_in_a_terminal([sys.executable, str(TESTS_DIR / "driver_bar_job.py"), str(tmp_path)])
    assert code == 0, out[-4000:]
    assert re.search(r"final \{'train_loss': [0-9.e-]+\}", out), out[-4000:]
    # Both epochs' bars, drawn here: redrawn in place (carriage returns inside each epoch), not
    # forwarded worker lines.
    for epoch in (0, 1):
        redraws = re.findall(rf"\rEpoch {epoch}: +\d+%", out)
        assert len(redraws) >= 3, (epoch, out[-4000:])
        assert re.search(rf"Epoch {epoch}: 100%\|[^|]*\| 32/32 .*train_loss=", out.replace("\r", "\n")), out[-4000:]
    progress_lines = [ln for ln in out.replace("\r", "\n").splitlines() if "Epoch " in ln]
    assert not [ln for ln in progress_lines if "pid=" in ln], progress_lines
    # the model summary is the driver's notice; the workers' own prints reach the driver once
    # each, behind their rank; nothing behind Ray's worker prefix
    assert re.search(r"^\[raytrainer\] 5 +Trainable params", out.replace("\r", ""), re.M), out[-4000:]
    for rank in (0, 1):
        assert out.count(f"(rank {rank}) hello from rank {rank}") == 1, out[-4000:]
    assert "RayTrainWorker" not in out and "pid=" not in out, out[-4000:]
