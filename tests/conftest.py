import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray for the whole session (a start costs seconds); shut down at the end."""
    import ray

    from raytrainer.ray_launcher import ensure_ray
    ensure_ray()
    yield ray
    ray.shutdown()
