"""The cluster path end to end on this machine: a real Ray head started with `ray start --head
--block`, then `ray job submit --working-dir <repo> -- raytrainer fit --config
examples/configs/digits.yaml ...`, as on a cluster (cluster/README.md).

Hermetic: the head has its own free ports, its own --temp-dir and its own random auth token
(RAY_AUTH_MODE=token + RAY_AUTH_TOKEN, so ~/.ray/auth_token is neither read nor written). It runs
in its own session/process group and is stopped by signalling that group, then any process that
still carries this test's marker variable in its environment (Ray workers, the job driver) —
never `ray stop`, which stops every Ray on the machine. Every subprocess has a timeout.
"""
from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass

import pytest
import yaml

from raytrainer.checkpoint import store as ckpt_io

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent   # the venv's bin: ray, raytrainer, python
MARKER = "RAYTRAINER_TEST_HEAD"              # env var naming this test's Ray processes
JOB_TIMEOUT_S = 360


@dataclass
class Head:
    url: str             # dashboard / job API
    env: dict            # the environment for `ray job ...` commands
    token: str
    log: pathlib.Path


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _get(url: str, token: str, timeout: float = 5.0) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _marked_pids(marker: str) -> list[int]:
    """Processes whose environment holds ``MARKER=<marker>`` (Linux /proc; others: none found)."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in pathlib.Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(pid)
        except OSError:  # gone, or not ours
            continue
    return pids


def _stop_head(proc: subprocess.Popen, marker: str) -> None:
    """SIGTERM the head's process group, then SIGKILL it and every marked process left."""
    # `ray start --block` takes ~30 s to wind down on SIGTERM here; nothing of it is kept, so a
    # short grace and then SIGKILL (the marked-process sweep below catches the rest).
    for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)   # start_new_session=True: the group id is the head's pid
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    deadline = time.monotonic() + 30
    while (left := _marked_pids(marker)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    assert not _marked_pids(marker), "Ray processes of this test survived"


@pytest.fixture
def ray_head(tmp_path):
    ray = BIN / "ray"
    if not ray.exists() or not (BIN / "raytrainer").exists():
        pytest.skip("needs the venv's `ray` and `raytrainer` commands (pip install -e .)")
    pytest.importorskip("ray.dashboard")       # ray[default]: the job server is part of the dashboard
    pytest.importorskip("sklearn")             # the digits data
    # Short: Ray's unix socket paths under the temp dir must stay below 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rtjob-", dir="/tmp")
    gcs, dashboard, agent_http, agent_grpc, client, metrics, env_agent = _free_ports(7)
    marker, token = uuid.uuid4().hex, secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update({"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's python/raytrainer
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
                MARKER: marker})
    log = tmp_path / "head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(ray), "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", "--include-dashboard=true", "--num-cpus=2",
             f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={agent_http}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--ray-client-server-port={client}",
             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
             "--object-store-memory=300000000", "--disable-usage-stats"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`ray start` exited with {proc.returncode}:\n{log.read_text()[-5000:]}")
            try:
                if _get(f"{url}/api/jobs/", token)[0] == 200:
                    break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the job API at {url} did not come up in 120 s:\n{log.read_text()[-5000:]}")
            time.sleep(1)
        yield Head(url=url, env=env, token=token, log=log)
    finally:
        _stop_head(proc, marker)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_job(head: Head, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), "job", *args], env=head.env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_ray_job_submit_raytrainer_fit_digits(ray_head, tmp_path):
    storage = tmp_path / "runs"
    submission_id = f"raytrainer-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"},
                   "excludes": [".venv/", "raytrainer_runs/", ".git/"]}
    submit = _ray_job(
        ray_head, "submit", "--address", ray_head.url, "--submission-id", submission_id, "--no-wait",
        "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
        "raytrainer", "fit", "--config", "examples/configs/digits.yaml", "--trainer.max_epochs", "2",
        "--trainer.storage_path", str(storage), "--trainer.enable_progress_bar", "false", timeout=180)
    assert submit.returncode == 0, submit.stdout + submit.stderr

    status, deadline = None, time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        code, body = _get(f"{ray_head.url}/api/jobs/{submission_id}", ray_head.token)
        assert code == 200, body
        status = json.loads(body)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = _ray_job(ray_head, "logs", "--address", ray_head.url, submission_id)
    if status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        _ray_job(ray_head, "stop", "--address", ray_head.url, submission_id, timeout=60)
    assert status == "SUCCEEDED", f"job {status}:\n{logs.stdout[-8000:]}\n{logs.stderr[-2000:]}"

    assert "launcher=ray workers=2" in logs.stdout, logs.stdout[-5000:]
    assert "[raytrainer] fit finished: epochs=2" in logs.stdout, logs.stdout[-5000:]
    run_dir = storage / "digits"
    committed = [u.rsplit("/", 1)[1] for u in ckpt_io.list_committed(str(run_dir / "checkpoints"))]
    assert committed, sorted(str(p) for p in run_dir.rglob("*"))
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["trainer"]["max_epochs"] == 2 and saved["trainer"]["storage_path"] == str(storage)
    assert saved["model"]["class_path"] == "examples.digits.DigitsCNN"
