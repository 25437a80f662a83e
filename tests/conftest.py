import os
import tempfile

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray runtime for the session, its temp files in a folder of its own."""
    import ray

    from pipeline.config import load_config
    from pipeline.driver import init_ray

    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    os.environ["RAY_TMPDIR"] = tmp
    init_ray(load_config(), verbose=False)
    yield ray
    ray.shutdown()
