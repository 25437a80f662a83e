import os
import tempfile
from pathlib import Path

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


# Tests and CI read the Free Spoken Digit Dataset from the shared folder beside the checkout.
_SHARED_FSDD = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd"
if _SHARED_FSDD.is_dir():
    os.environ.setdefault("MMCL_FSDD_DIR", str(_SHARED_FSDD))
