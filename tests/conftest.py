import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray runtime for the session, its temp files in a folder of its own."""
    import ray

    from pipeline.config import load_config
    from pipeline.runtime import init_ray

    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    os.environ["RAY_TMPDIR"] = tmp
    init_ray(load_config(), verbose=False)
    yield ray
    ray.shutdown()


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and every process it started (its local Ray included), by PID."""
    import psutil

    try:
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = [proc.pid]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def listening(pid: int) -> dict[str, set[str]]:
    """The addresses that `pid` and every process it started listen on (TCP and UDP), each with the
    names of the processes bound there."""
    import psutil

    found = {}
    try:
        family = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return found
    for p in family:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr):
                    found.setdefault(c.laddr.ip, set()).add(p.name())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(folder: Path, artifacts: str | None = None, env: dict | None = None
                        ) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on 127.0.0.1 over a store in `folder` (started again later, the same
    store), serving artifacts it keeps at `artifacts` (default: a folder in `folder`)."""
    port = free_port()
    env = {**(env or os.environ), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", artifacts or str(folder / "server-artifacts"), "--host", "127.0.0.1",
         "--port", str(port),
         "--workers", "1"], env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if requests.get(f"{url}/health", timeout=30).ok:
                return proc, url
        except requests.RequestException:  # not listening yet, or too busy to answer
            time.sleep(0.5)
    stop_server(proc)
    pytest.fail("mlflow server did not start")


def start_model_server(model: str, store: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`mmcl serve MODEL` on 127.0.0.1 over the registry at `store`, checking its alias every second;
    returned once it answers /ping."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", model, "--port", str(port), "--poll", "1",
                             "--tracking-uri", store], cwd=Path(__file__).resolve().parents[1], env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        if proc.poll() is not None:
            pytest.fail(f"mmcl serve {model} stopped: {proc.stdout.read()}")
        try:
            if requests.get(f"{url}/ping", timeout=5).ok:
                return proc, url
        except requests.RequestException:
            time.sleep(0.5)
    stop_server(proc)
    pytest.fail(f"mmcl serve {model} did not answer")


def served(url: str, frame, columns: list[str]) -> list[dict]:
    """The server's answers for `frame`'s `columns`, posted as MLflow's JSON (dataframe_split): bytes
    base64-encoded, arrays as lists."""
    import base64

    def jsonable(v):
        if isinstance(v, bytes):
            return base64.b64encode(v).decode()
        return v.tolist() if hasattr(v, "tolist") else v

    rows = [[jsonable(frame[c].iloc[i]) for c in columns] for i in range(len(frame))]
    body = {"dataframe_split": {"columns": columns, "data": rows}}
    answer = requests.post(f"{url}/invocations", json=body, timeout=120)
    assert answer.ok, answer.text[-2000:]
    return answer.json()["predictions"]


def stop_server(proc: subprocess.Popen) -> None:
    from pipeline.cli import stop_process_group

    if proc.poll() is None:
        stop_process_group(proc)


@pytest.fixture
def mlflow_server(tmp_path):
    proc, url = start_mlflow_server(tmp_path)
    try:
        yield url
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1 with a bucket `mmcl`, one per test module; `env` is what a
    process (a driver, a `ray start` node, `mlflow server`) needs to use it, as a user's would hold
    their endpoint and credentials."""
    import boto3

    port = free_port()
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                if requests.get(env["AWS_ENDPOINT_URL"], timeout=5).ok:
                    break
            except requests.RequestException:
                time.sleep(0.25)
        keys = {k.lower(): env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", **keys)
        s3.create_bucket(Bucket="mmcl")
        yield SimpleNamespace(env=env, client=s3, keys=lambda prefix: [o["Key"] for o in s3.get_paginator(
            "list_objects_v2").paginate(Bucket="mmcl", Prefix=prefix).search("Contents[]") if o])
    finally:
        stop_server(proc)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """6 classes in two vector modalities, well separated: 30 train and 10 test rows per class."""
    rng = np.random.default_rng(0)
    rows = {k: [] for k in ("sample_id", "label", "label_name", "domain", "split", "a", "b")}
    means = {m: rng.normal(0, 3, (6, d)) for m, d in (("a", 8), ("b", 5))}
    for c in range(6):
        for i in range(40):
            rows["sample_id"].append(f"{c}-{i}")
            rows["label"].append(c)
            rows["label_name"].append(str(c))
            rows["domain"].append("d0" if i % 2 else "d1")
            rows["split"].append("test" if i < 10 else "train")
            for m in ("a", "b"):
                rows[m].append((means[m][c] + rng.normal(0, 1, len(means[m][c]))).astype(np.float32).tolist())
    path = tmp_path_factory.mktemp("synthetic") / "synthetic.parquet"
    pq.write_table(pa.table(rows), path)
    return path


# Tests and CI read the Free Spoken Digit Dataset and the Tux Paint stamps from the shared folder
# beside the checkout (docs/data.md says how a user gets each).
_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
for _variable, _folder in (("MMCL_FSDD_DIR", "fsdd"), ("MMCL_TUXPAINT_DIR", "tuxpaint")):
    if (_SHARED / _folder).is_dir():
        os.environ.setdefault(_variable, str(_SHARED / _folder))


@pytest.fixture(scope="session")
def synthetic_text(tmp_path_factory):
    """6 classes, a vector modality and a caption (text, through the MiniLM encoder): 30 train and
    10 test rows per class."""
    rng = np.random.default_rng(1)
    words = [["red", "apple", "fruit"], ["blue", "ocean", "wave"], ["green", "forest", "tree"],
             ["loud", "drum", "music"], ["fast", "car", "road"], ["cold", "snow", "winter"]]
    means = rng.normal(0, 3, (6, 8))
    rows = {k: [] for k in ("sample_id", "label", "label_name", "domain", "split", "a", "caption")}
    for c in range(6):
        for i in range(40):
            rows["sample_id"].append(f"{c}-{i}")
            rows["label"].append(c)
            rows["label_name"].append(words[c][1])
            rows["domain"].append("d0")
            rows["split"].append("test" if i < 10 else "train")
            rows["a"].append((means[c] + rng.normal(0, 2, 8)).astype(np.float32).tolist())
            rows["caption"].append(" ".join(rng.choice(words[c], 2)) + f" number {i}")
    path = tmp_path_factory.mktemp("synthetic-text") / "synthetic-text.parquet"
    pq.write_table(pa.table(rows), path)
    return path
