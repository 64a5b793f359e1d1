"""Multi-node on a simulated cluster (ray.cluster_utils.Cluster): workers spread over nodes, a node
removed mid-run, training resumed on the remaining nodes bit-identically."""
import json
import os
import subprocess
import sys

import pytest
from helpers import TESTS_DIR

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(660)]


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    """Both scenarios of multinode_job.py, run once in its own process: a second Ray cluster
    cannot share this process with the session's Ray."""
    tmp = tmp_path_factory.mktemp("multinode")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(TESTS_DIR / "multinode_job.py"), str(tmp)],
                          capture_output=True, text=True, timeout=600, env=env)
    out = {d["scenario"]: d for d in (json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{"))}
    return proc, out


def _scenario(scenarios, name):
    proc, out = scenarios
    assert name in out, f"exit {proc.returncode}\n" + proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc, out[name]


def test_node_removed_mid_run_resumes_on_spare_node(scenarios):
    _, out = _scenario(scenarios, "kill")
    assert out["node_removed"]
    assert out["global_step"] == 12
    first_attempt = {rank: nodes[0] for rank, nodes in out["nodes_by_rank"].items()}
    assert first_attempt["0"] != first_attempt["1"]   # spread over two nodes
    assert len(out["nodes_by_rank"]["1"]) >= 2         # rank 1 started again after the node died
    # from the newest committed checkpoint: step 5 (the node died inside step 6, before its boundary)
    assert out["start_steps"]["1"][-1] == 5
    assert out["nodes_by_rank"]["1"][-1] != first_attempt["1"]
    assert out["identical"], out


def test_node_drained_as_preempted_commits_a_just_in_time_checkpoint_then_resumes(scenarios):
    """Ray's preemption notice (a node drained with reason PREEMPTION, what a spot reclaim gives
    the cluster): the workers commit a checkpoint at once and train on; when the node goes, the
    restarted workers resume from that checkpoint, not from the last epoch end."""
    proc, out = _scenario(scenarios, "drain")
    assert out["node_removed"] and out["jit_checkpoint"], (out, proc.stdout[-3000:])
    jit_step = int(out["jit_checkpoint"].rsplit("step=", 1)[1][:9])
    # epoch-end checkpoints only (6 steps per epoch), so a mid-epoch one is the notice's; the
    # node is drained at step 8
    assert 8 <= jit_step < 12 and "-epoch_end" not in out["jit_checkpoint"], out
    assert "Ray drain notice" in proc.stdout + proc.stderr
    assert len(out["nodes_by_rank"]["1"]) >= 2  # rank 1 restarted elsewhere
    assert out["start_steps"]["1"] == [0, jit_step]  # ... from the just-in-time checkpoint
    assert out["global_step"] == 12 and out["identical"], out
