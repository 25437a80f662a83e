"""`mmcl ui`: a real MLflow UI server on 127.0.0.1 over the project's store, stopped with Ctrl-C. (A
sequence tracked over HTTP by a real `mlflow server` is read back in tests/test_cluster.py.)"""
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import requests

from pipeline.tracking import open_client

pytestmark = pytest.mark.slow


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
