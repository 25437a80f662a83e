"""A real two-node Ray cluster on this machine: a head and a second node, each a `ray start --block`
process of its own, and a real S3 server (moto) that both nodes reach. Train workers on both nodes;
the data, the feature cache, Ray Train's storage_path and MLflow's artifacts on S3; MLflow over HTTP
through a real `mlflow server`; the second node's raylet killed mid-task; and `mmcl run` /
`mmcl sweep` submitted through the Ray Jobs API."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import psutil
import pyarrow.parquet as pq
import pytest
import requests
import yaml
from conftest import free_port, served, start_mlflow_server, start_model_server, stop_server

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
# Ray's token authentication, as a cluster started with `ray start` has it: the token in
# ~/.ray/auth_token (made if missing), every client of this cluster in token mode.
ENV = {**os.environ, "RAY_AUTH_MODE": "token"}


def ray_list(kind: str, dashboard: str, *filters: str) -> list[dict]:
    """`ray list KIND` against the cluster, as JSON."""
    out = subprocess.run([RAY, "list", kind, "--address", dashboard, "--format", "json", "--limit", "10000",
                          *(a for f in filters for a in ("--filter", f))], env=ENV, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out) if out.lstrip().startswith("[") else []  # "No resource in the cluster"


def start_node(env: dict, *args: str) -> subprocess.Popen:
    ports = {p: free_port() for p in ("node-manager-port", "object-manager-port", "metrics-export-port",
                                      "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                      "runtime-env-agent-port")}
    return subprocess.Popen([RAY, "start", "--block", "--num-cpus=2", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
                             *(f"--{k}={v}" for k, v in ports.items()), *args],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_node(proc: subprocess.Popen) -> None:
    """SIGTERM to the `ray start --block` process stops its node; whatever is left goes by group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # drains the node, then stops its processes
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="module")
def two_nodes(s3_server):
    """The cluster, its nodes holding the S3 server's endpoint and credentials in their environment.
    One for the module: the Ray Jobs test first, then the test that loses the second node."""
    env = {**s3_server.env, "RAY_AUTH_MODE": ENV["RAY_AUTH_MODE"]}
    subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True)
    gcs, dashboard = free_port(), free_port()
    # Short: Ray's socket paths have a length limit. A temp dir per node, as on separate machines:
    # nodes sharing one would unpack a job's working_dir into the same folder, each replacing the other's.
    temps = [tempfile.mkdtemp(prefix="rc-", dir="/tmp") for _ in range(2)]
    head = start_node(env, "--head", f"--port={gcs}", f"--temp-dir={temps[0]}", "--include-dashboard=true",
                      "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                      f"--ray-client-server-port={free_port()}", "--min-worker-port=10002", "--max-worker-port=14999")
    nodes = [head]
    url = f"http://127.0.0.1:{dashboard}"
    try:
        for _ in range(120):
            try:
                requests.get(f"{url}/api/version", timeout=5)  # up (it answers 401 without the token)
                break
            except requests.RequestException:  # not listening yet, or too busy starting to answer
                pass
            time.sleep(0.5)
        nodes.append(start_node(env, f"--address=127.0.0.1:{gcs}", f"--temp-dir={temps[1]}",
                                "--min-worker-port=15000", "--max-worker-port=19999"))
        refused = ""
        for _ in range(120):
            try:
                if len(ray_list("nodes", url, "state=ALIVE")) == 2:
                    break
            except subprocess.CalledProcessError as e:  # the state API can lag the dashboard's first answer
                refused = (e.stderr or "").strip().rpartition("\n")[2]
            time.sleep(0.5)
        else:
            pytest.fail(f"the second node did not join {refused}")
        yield SimpleNamespace(address=f"127.0.0.1:{gcs}", dashboard=url, second=nodes[1], env=env, s3=s3_server)
    finally:
        for proc in reversed(nodes):
            stop_node(proc)
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)


def raylet_of(node: subprocess.Popen) -> psutil.Process:
    return next(p for p in psutil.Process(node.pid).children(recursive=True) if p.name() == "raylet")


def train_worker_nodes(dashboard: str) -> dict[str, str]:
    """RayTrainWorker actor id -> node id, for every worker the cluster ever had (dead ones too)."""
    return {a["actor_id"]: a["node_id"] for a in ray_list("actors", dashboard, "class_name=RayTrainWorker")}


def mlflow_runs(server: str, experiment: str) -> list[dict]:
    api = f"{server}/api/2.0/mlflow"
    exp = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": experiment}).json()["experiment"]
    runs = requests.post(f"{api}/runs/search", json={"experiment_ids": [exp["experiment_id"]]}).json()["runs"]
    for r in runs:
        r["tags"] = {t["key"]: t["value"] for t in r["data"].get("tags", [])}
    return runs


def versions(server: str, name: str) -> list[dict]:
    found = requests.get(f"{server}/api/2.0/mlflow/model-versions/search", params={"filter": f"name='{name}'"})
    return found.json().get("model_versions", [])


def test_run_and_sweep_submitted_as_ray_jobs(two_nodes, mlflow_server, tmp_path):
    def submit(*command: str) -> str:
        job = subprocess.run([RAY, "job", "submit", "--address", two_nodes.dashboard, "--working-dir", str(ROOT),
                              "--", sys.executable, "-m", "pipeline.cli", *command],
                             env=ENV, capture_output=True, text=True, timeout=900)
        assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-6000:] + job.stderr[-1500:]
        return job.stdout

    common = [f"tracking.uri={mlflow_server}", f"storage_path={tmp_path / 'shared'}", f"output_dir={tmp_path / 'out'}"]
    printed = submit("run", "--tasks", "1", "train.epochs=1", "model.projection=256", *common)  # Jobs, not tasks
    assert "average accuracy" in printed
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"num_tasks": 1, "train": {"epochs": 1}, "model": {"projection": 256}, "sweep": {
        "samples": 2, "scheduler": "fifo", "space": {"loss.align": {"uniform": [0.0, 0.5]}}}}))
    printed = submit("sweep", "--config", str(sweep), "--best-out", str(tmp_path / "best.yaml"), *common)
    assert "2 trials" in printed

    runs = mlflow_runs(mlflow_server, "mfeat")
    sweep_run = next(r for r in runs if r["tags"].get("mmcl.sweep") == "true")
    trials = [r for r in runs if r["tags"].get("mlflow.parentRunId") == sweep_run["info"]["run_id"]]
    assert sweep_run["info"]["status"] == "FINISHED" and len(trials) == 2
    sequences = [r for r in runs if "mlflow.parentRunId" not in r["tags"] and "mmcl.sweep" not in r["tags"]]
    assert [r["info"]["status"] for r in sequences] == ["FINISHED"]


def test_two_nodes_data_cache_checkpoints_and_artifacts_on_s3_and_a_lost_node(two_nodes, synthetic_text, tmp_path):
    s3 = two_nodes.s3
    s3.client.upload_file(str(synthetic_text), "mmcl", "data/synthetic-text.parquet")
    server, mlflow_server = start_mlflow_server(tmp_path, "s3://mmcl/mlartifacts", two_nodes.env)
    args = [sys.executable, "-m", "pipeline.cli", "run", "--address", two_nodes.address,
            "--data", "s3://mmcl/data/synthetic-text.parquet", "--tasks", "3", "train.epochs=2", "model.projection=256",
            "cache.dir=s3://mmcl/cache", "storage_path=s3://mmcl/ray",
            "train.cpus_per_worker=2",  # one worker per node: tasks long enough to lose a node in
            f"tracking.uri={mlflow_server}", f"output_dir={tmp_path / 'out'}", "--out", str(tmp_path / "r.json")]
    earlier = train_worker_nodes(two_nodes.dashboard)  # the Ray Jobs test's
    try:
        proc = subprocess.Popen(args, cwd=ROOT, env=two_nodes.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        lines, raylet = [], None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if "task 1/3 epoch 1/2" in line:
                placed = {a: n for a, n in train_worker_nodes(two_nodes.dashboard).items() if a not in earlier}
            if "task 2/3 epoch 1/2" in line and raylet is None:  # the second node goes away mid-task
                raylet = raylet_of(two_nodes.second)
                threading.Timer(0.3, raylet.kill).start()
        assert proc.wait() == 0, "\n".join(lines[-30:])
        assert raylet is not None and not raylet.is_running()
        assert len(set(placed.values())) == 2, placed  # one worker on each node
        after = {a: n for a, n in train_worker_nodes(two_nodes.dashboard).items() if a not in {*earlier, *placed}}
        assert after and set(after.values()) < set(placed.values()), "\n".join(lines[-40:])  # restarted on the node left
        assert sum("Task 2/3" in line for line in lines) == 1
        assert "Features: encoding" in "\n".join(lines)  # the text column went through the encoders

        # The cache entry, the checkpoints and the models' artifacts are objects in the bucket, nothing on disk.
        cache = s3.keys("cache/")
        assert any(k.endswith("/_mmcl_features.json") for k in cache) and any(k.endswith(".parquet") for k in cache)
        assert not any("/.building-" in k for k in cache), cache
        # Ray Train's run (its task checkpoints released once the sequence ended), and no local copy of it.
        assert any(k.endswith("/checkpoint_manager_snapshot.json") for k in s3.keys("ray/"))
        assert not list((tmp_path / "out").glob("*/ray"))
        assert any(k.endswith("MLmodel") for k in s3.keys("mlartifacts/"))
        assert not (tmp_path / "server-artifacts").exists() and not (tmp_path / "out" / "mlartifacts").exists()
        listed = subprocess.run([sys.executable, "-m", "pipeline.cli", "cache", "ls", "cache.dir=s3://mmcl/cache"],
                                cwd=ROOT, env=two_nodes.env, capture_output=True, text=True)
        assert "240 rows of s3://mmcl/data/synthetic-text.parquet" in listed.stdout, listed.stdout + listed.stderr

        # MLflow over HTTP, read back through the server's REST API: the runs, the chain of versions,
        # each logged model's link to its version, the data as each run's input, curves and plots.
        result, api = json.loads((tmp_path / "r.json").read_text()), f"{mlflow_server}/api/2.0/mlflow"
        runs = mlflow_runs(mlflow_server, "synthetic-text")
        parent = next(r for r in runs if "mlflow.parentRunId" not in r["tags"])
        assert len(runs) == 4 and parent["info"]["status"] == "FINISHED"
        assert parent["info"]["run_id"] == result["mlflow_run_id"]
        children = {r["tags"]["mmcl.task_index"]: r["info"]["run_id"] for r in runs
                    if r["tags"].get("mlflow.parentRunId") == result["mlflow_run_id"]}
        assert sorted(children) == ["0", "1", "2"]
        chain = sorted(versions(mlflow_server, "synthetic-text-class-il-cmoe"), key=lambda v: int(v["version"]))
        lineage = [{t["key"]: t["value"] for t in v["tags"]} for v in chain]
        assert [v["run_id"] for v in chain] == [children[i] for i in "012"]
        assert [t["mmcl.continued_from_version"] for t in lineage[1:]] == [v["version"] for v in chain[:2]]
        assert {t["mmcl.sequence_run_id"] for t in lineage} == {result["mlflow_run_id"]}
        for v in chain:
            model = requests.get(f"{api}/logged-models/{v['source'].removeprefix('models:/')}").json()["model"]
            listed = json.loads({t["key"]: t["value"] for t in model["info"]["tags"]}["mlflow.modelVersions"])
            assert [(m["name"], str(m["version"])) for m in listed] == [("synthetic-text-class-il-cmoe", v["version"])]
            inputs = requests.get(f"{api}/runs/get", params={"run_id": v["run_id"]}).json()["run"]["inputs"]
            assert inputs["dataset_inputs"][0]["dataset"]["digest"] == lineage[0]["mmcl.data_fingerprint"]
        history = requests.get(f"{api}/metrics/get-history", params={"run_id": result["mlflow_run_id"],
                                                                     "metric_key": "seq/avg_acc"}).json()["metrics"]
        assert [m["step"] for m in history] == [0, 1, 2] and history[-1]["value"] == round(result["avg_acc"], 4)
        files = requests.get(f"{api}/artifacts/list", params={"run_id": result["mlflow_run_id"]}).json()["files"]
        assert {"acc_matrix.json", "acc_matrix.png", "acc_curves.png", "config.yaml"} <= {f["path"] for f in files}
        matrix = requests.get(f"{mlflow_server}/get-artifact",  # through the server, from the bucket
                              params={"path": "acc_matrix.json", "run_uuid": result["mlflow_run_id"]}).json()
        assert matrix["acc_matrix"] == result["acc_matrix"]
        mlflow.set_tracking_uri(mlflow_server)  # the task's model, uploaded through the server and read back
        assert mlflow.pyfunc.load_model("models:/synthetic-text-class-il-cmoe/1").get_raw_model().model.head_size

        # `mmcl serve` over that registry answers raw captions and vectors as the model does in-process.
        rows = pq.read_table(synthetic_text).to_pandas().query("split == 'test'")
        model, url = start_model_server("synthetic-text-class-il-cmoe/3", mlflow_server, two_nodes.env)
        try:
            answers = served(url, rows, ["a", "caption"])
        finally:
            stop_server(model)
        expected = mlflow.pyfunc.load_model("models:/synthetic-text-class-il-cmoe/3").predict(rows)
        assert [a["prediction"] for a in answers] == expected["prediction"].tolist()
        assert {a["model_version"] for a in answers} == {3}
    finally:
        stop_server(server)
