"""launcher="ray" and rt.sweep with storage on a real S3 API server (moto, loopback), configured
only by the standard AWS environment variables."""
import json
import os
import subprocess
import sys

import pytest
from helpers import TESTS_DIR

import raytrainer as rt

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(420)]
HERE = str(TESTS_DIR)


def test_ray_fit_and_sweep_store_everything_in_the_bucket(s3_env, s3_server):
    from s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "s3_ray_job.py"), s3_env],
                          capture_output=True, text=True, timeout=400, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = json.loads(lines[-1])
    bucket, prefix = s3_env[len("s3://"):].split("/", 1)
    objects = s3_server.all_objects(bucket)
    assert out["fit_step"] == 8 and out["fit_last"].startswith(f"{s3_env}/ray-fit/checkpoints/step=")
    last = out["fit_last"][len(f"s3://{bucket}/"):]
    assert last.endswith(".ckpt") and last in objects  # one file, committed, in the bucket...
    assert sorted(rt.load_checkpoint(out["fit_last"])["rank_states"]) == [0, 1]  # ...with both ranks' state
    assert any(k.startswith(f"{prefix}/ray-fit/tensorboard/events.out.tfevents") for k in objects)
    assert [s for s, _ in out["trials"]] == ["completed", "completed"]
    for _, ckpt in out["trials"]:
        assert ckpt.startswith(f"{s3_env}/sweep/trial_")
        assert ckpt[len(f's3://{bucket}/'):] in objects and ckpt.endswith(".ckpt")
    assert any(k.startswith(f"{prefix}/sweep/_tune/") for k in objects)  # Tune's state too
    for key, blob in objects.items():                # and no credential anywhere
        assert SECRET_ACCESS_KEY.encode() not in blob and ACCESS_KEY_ID.encode() not in blob, key
