"""A short sequence tracked over HTTP by a real `mlflow server`, read back through its REST API."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import requests

from pipeline.cli import main
from pipeline.tracking import open_client

pytestmark = pytest.mark.slow


def test_sequence_tracked_over_http(ray_local, mlflow_server, tmp_path):
    api = f"{mlflow_server}/api/2.0/mlflow"
    out = tmp_path / "r.json"
    assert main(["run", "--out", str(out), "--tasks", "2", "train.epochs=1", f"tracking.uri={mlflow_server}",
                 f"output_dir={tmp_path}"]) == 0
    result = json.loads(out.read_text())

    exp = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "mfeat"}).json()["experiment"]
    runs = requests.post(f"{api}/runs/search", json={"experiment_ids": [exp["experiment_id"]]}).json()["runs"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    parent = next(r for r in runs if r["info"]["run_id"] == result["mlflow_run_id"])
    assert parent["info"]["status"] == "FINISHED"
    children = [rid for rid, t in tags.items() if t.get("mlflow.parentRunId") == result["mlflow_run_id"]]
    assert sorted(tags[c]["mmcl.task_index"] for c in children) == ["0", "1"]

    versions = requests.get(f"{api}/model-versions/search", params={"filter": "name='mfeat-class-il-cmoe'"}).json()
    versions = sorted(versions["model_versions"], key=lambda v: int(v["version"]))
    lineage = [{t["key"]: t["value"] for t in v["tags"]} for v in versions]
    assert [v["run_id"] for v in versions] == sorted(children, key=lambda c: tags[c]["mmcl.task_index"])
    assert lineage[1]["mmcl.continued_from_version"] == versions[0]["version"]
    assert lineage[0]["mmcl.data_fingerprint"] == lineage[1]["mmcl.data_fingerprint"]
    assert lineage[1]["mmcl.sequence_run_id"] == result["mlflow_run_id"]

    for v, run_id in zip(versions, [v["run_id"] for v in versions]):  # the logged model lists its version
        model = requests.get(f"{api}/logged-models/{v['source'].removeprefix('models:/')}").json()["model"]
        assert model["info"]["name"] == f"task-{tags[run_id]['mmcl.task_index']}"
        listed = json.loads({t["key"]: t["value"] for t in model["info"]["tags"]}["mlflow.modelVersions"])
        assert [(m["name"], str(m["version"])) for m in listed] == [("mfeat-class-il-cmoe", v["version"])]
        inputs = requests.get(f"{api}/runs/get", params={"run_id": run_id}).json()["run"]["inputs"]
        assert inputs["dataset_inputs"][0]["dataset"]["digest"] == lineage[0]["mmcl.data_fingerprint"]
    history = requests.get(f"{api}/metrics/get-history", params={"run_id": result["mlflow_run_id"],
                                                                 "metric_key": "seq/avg_acc"}).json()["metrics"]
    assert [m["step"] for m in history] == [0, 1] and history[-1]["value"] == round(result["avg_acc"], 4)

    files = requests.get(f"{api}/artifacts/list", params={"run_id": result["mlflow_run_id"]}).json()["files"]
    assert {"acc_matrix.json", "acc_matrix.png", "acc_curves.png", "config.yaml"} <= {f["path"] for f in files}
    matrix = requests.get(f"{mlflow_server}/get-artifact",
                          params={"path": "acc_matrix.json", "run_uuid": result["mlflow_run_id"]}).json()
    assert matrix["acc_matrix"] == result["acc_matrix"]


def test_mmcl_ui_serves_the_store_on_localhost_and_stops_with_ctrl_c(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = f"sqlite:///{tmp_path / 'ui.db'}"
    command = [sys.executable, "-m", "pipeline.cli", "ui", "--port", str(port), "--tracking-uri", store]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "no MLflow store at" in refused.stderr  # ui never creates a store
    assert not (tmp_path / "ui.db").exists()
    experiment = open_client(store).create_experiment("mfeat")  # the store a run creates
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert f"http://127.0.0.1:{port}" in proc.stdout.readline()
        # a link straight to the experiment's runs, in the model-training view (not the GenAI landing page)
        link = f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs?workflowType=machine_learning"
        assert proc.stdout.readline().split() == ["mfeat:", link]
        for _ in range(120):
            try:
                response = requests.post(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                                         json={"max_results": 10}, timeout=30)  # the first request migrates the store
                break
            except requests.ConnectionError:
                time.sleep(0.5)
        assert response.ok and {e["name"] for e in response.json()["experiments"]} == {"Default", "mfeat"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/health", timeout=1)
    finally:
        if proc.poll() is None:  # the server runs in a session of its own: stop it by its PID too
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
