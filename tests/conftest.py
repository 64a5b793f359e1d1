import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray for the whole session (a start costs seconds); shut down at the end."""
    import ray

    from raytrainer.runtime.cluster import ensure_ray
    ensure_ray()
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------- S3 (moto server on loopback)

@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server mode) on 127.0.0.1:<free port>, for the whole session."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    from s3_server import S3Server

    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Configure S3 through the standard AWS environment variables only; yield ``s3://bucket/prefix``
    in a fresh bucket. s3fs's instance and listing caches are cleared around each test."""
    import s3fs
    from s3_server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY

    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = s3_server.create_bucket()
    try:
        yield f"s3://{bucket}/prefix"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


# ---------------------------------------------------------------- order

def pytest_collection_modifyitems(session, config, items):
    """Tests that start a Ray of their own (a simulated multi-node cluster, a `ray start` head, a
    notebook kernel's, a subprocess's) run first, before any test starts the session's Ray: they
    then have the 2 cores to themselves (the multi-node job: 80-90 s alone, 115 s beside an idle
    session Ray). The rest keeps its order (a stable sort).

    The Ray tests run in one process, after the in-process ones (`make test`: two phases; only
    the in-process phase uses pytest-xdist): run beside the Ray tests (two processes, the
    in-process ones at nice 19), the in-process tests made the Ray tests up to 2.7x slower and
    the suite no faster (751-785 s against 762 s), on 2 cores nearly all CPU-bound."""
    def own_ray_first(item) -> bool:
        return not (item.get_closest_marker("ray") and "ray_cluster" not in item.fixturenames)
    items.sort(key=own_ray_first)


# ---------------------------------------------------------------- raytrainer's log notices

@pytest.fixture
def rt_log(caplog):
    """raytrainer's log notices (INFO and up: the resolved config, retries, summaries) as a user
    sees them by default; read ``rt_log.text`` or ``rt_log.messages``."""
    import logging
    caplog.set_level(logging.INFO, logger="raytrainer")
    return caplog
