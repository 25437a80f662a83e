"""The whole pipeline for real: local Ray, DeepSpeed engines in 2 workers, an MLflow SQLite store."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import is_loopback, kill_tree, listening
from pipeline.cli import main
from test_security import CreatesFile

pytestmark = pytest.mark.slow
SHORT = ["--tasks", "2", "train.epochs=3", "model.projection=256"]  # at 2048 ridge solves are most of a task end


def mlflow_runs(out_dir: Path):
    client = MlflowClient(f"sqlite:///{out_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mfeat")
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_sequence_end_to_end(ray_local, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["run", "--out", str(out), *SHORT, f"output_dir={tmp_path}"]) == 0
    printed = capsys.readouterr().out
    assert "Task 2/2" in printed and "epoch 3/3" in printed and "average accuracy" in printed

    result = json.loads(out.read_text())
    assert set(result) >= {"benchmark", "scenario", "method", "seed", "num_tasks", "acc_matrix", "avg_acc",
                           "avg_inc_acc", "forgetting", "seconds", "mlflow_run_id"}
    matrix = result["acc_matrix"]
    assert result["num_tasks"] == 2 and len(matrix) == 2 and matrix[0][1] is None
    assert matrix[0][0] >= 0.9 and matrix[1][1] >= 0.9  # each task is learned
    assert result["avg_acc"] == pytest.approx((matrix[1][0] + matrix[1][1]) / 2)
    assert result["forgetting"] == pytest.approx(matrix[0][0] - matrix[1][0])

    client, runs = mlflow_runs(tmp_path)
    parent = next(r for r in runs if r.info.run_id == result["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.num_workers"] == "0" and parent.data.params["train.zero_stage"] == "0"
    assert parent.data.metrics["seq/avg_acc"] == pytest.approx(result["avg_acc"], abs=1e-4)
    assert [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "acc/task_0")] == \
        [(0, pytest.approx(matrix[0][0], abs=1e-4)), (1, pytest.approx(matrix[1][0], abs=1e-4))]  # the curve
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "seq/forgetting")] == [0, 1]
    assert "| T1: " in parent.data.tags["mlflow.note.content"]  # the matrix as a table in the description
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["mmcl.task_index"] for r in children) == ["0", "1"]
    last = next(r for r in children if r.data.tags["mmcl.task_index"] == "1")
    assert last.data.metrics["acc/task_0"] == pytest.approx(matrix[1][0], abs=1e-4)
    first = next(r for r in children if r.data.tags["mmcl.task_index"] == "0")
    # cmoe: the adapter trains on every task (3 epochs logged); from the second on, with rows drawn
    # from the first task's class Gaussians, distillation and relation preservation to the first's model.
    for run in (first, last):
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
        # a task's run spans the task: created when it starts, ended when it ends
        assert (run.info.end_time - run.info.start_time) / 1000 >= run.data.metrics["train/elapsed_s"]
        assert run.data.params["task.index"] == run.data.tags["mmcl.task_index"]
        dataset = client.get_run(run.info.run_id).inputs.dataset_inputs[0].dataset
        assert dataset.name == "mfeat"
    assert client.get_metric_history(first.info.run_id, "train/rel") == []
    assert len(client.get_metric_history(last.info.run_id, "train/rel")) == 3 and last.data.metrics["train/kd"] > 0
    artifact = client.download_artifacts(parent.info.run_id, "acc_matrix.json", str(tmp_path))
    assert json.loads(Path(artifact).read_text())["acc_matrix"] == matrix
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"acc_matrix.png", "acc_curves.png", "config.yaml"} <= parent_artifacts
    assert client.list_artifacts(last.info.run_id) == []  # the checkpoint is stored once, in the logged model

    # Lineage: one registered version per task, the second continuing from the first.
    v1, v2 = sorted(client.search_model_versions("name = 'mfeat-class-il-cmoe'"), key=lambda v: int(v.version))
    assert (v1.run_id, v2.run_id) == (first.info.run_id, last.info.run_id)
    assert v2.tags["mmcl.continued_from_version"] == str(v1.version) and v1.tags["mmcl.continued_from_version"] == ""
    assert v1.tags["mmcl.config_hash"] == v2.tags["mmcl.config_hash"] == parent.data.tags["mmcl.config_fingerprint"]
    assert len(v1.tags["mmcl.data_fingerprint"]) == 16 and v1.tags["mmcl.classes_seen"].count(",") == 4
    assert dataset.digest == v1.tags["mmcl.data_fingerprint"]
    for v, task in ((v1, 0), (v2, 1)):  # each version linked to its logged model, named after its task
        model = client.get_logged_model(v.source.removeprefix("models:/"))
        assert model.name == f"task-{task}" and model.source_run_id == v.run_id
        listed = json.loads(model.tags["mlflow.modelVersions"])
        assert [(m["name"], str(m["version"])) for m in listed] == [("mfeat-class-il-cmoe", str(v.version))]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["lineage", "mfeat-class-il-cmoe", "--tracking-uri", uri]) == 0
    assert f"version {v2.version}: task 1 <- version {v1.version}" in capsys.readouterr().out

    # Roll-back: the older version still predicts its own task's classes.
    task0 = [int(c) for c in v1.tags["mmcl.classes_seen"].split(",")]
    data = pq.read_table(tmp_path / "data" / "mfeat.parquet").to_pandas()
    rows = data[(data.split == "test") & data.label.isin(task0)]
    rows.drop(columns=["label"]).to_parquet(tmp_path / "task0.parquet")
    for version, expected in ((v1.version, matrix[0][0]), (v2.version, matrix[1][0])):
        out_file = tmp_path / f"pred-v{version}.parquet"
        assert main(["predict", "--model-uri", f"models:/mfeat-class-il-cmoe/{version}", "--input",
                     str(tmp_path / "task0.parquet"), "--out", str(out_file), "--tracking-uri", uri]) == 0
        pred = pq.read_table(out_file).to_pandas()
        assert list(pred.sample_id) == list(rows.sample_id)
        assert (pred.prediction.to_numpy() == rows.label.to_numpy()).mean() == pytest.approx(expected)
    assert set(pq.read_table(tmp_path / f"pred-v{v1.version}.parquet")["prediction"].to_pylist()) <= set(task0)


def test_a_killed_sequence_resumes_at_the_last_finished_task(ray_local, tmp_path, capsys):
    """The default path as users start it (a local Ray of its own), which listens on loopback only
    all along, killed after its first task; a rerun refuses that task's checkpoint crafted to run
    code, and resumes from the real one."""
    args = ["--tasks", "3", "train.epochs=2", "model.projection=256", f"output_dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", *args], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "RAY_ADDRESS": ""})
    try:
        deadline = time.time() + 400
        state_file, bound = None, {}
        while time.time() < deadline and proc.poll() is None:
            for ip, names in listening(proc.pid).items():
                bound.setdefault(ip, set()).update(names)
            found = list(tmp_path.glob("*/state.json"))
            if found and len(json.loads(found[0].read_text())["tasks"]) >= 1:
                state_file = found[0]
                break
            time.sleep(0.5)
        assert state_file is not None, "the first task never finished"
    finally:
        kill_tree(proc)
    names = set().union(*bound.values())
    assert {"gcs_server", "raylet"} <= names and any("TrainWorker" in n for n in names), names
    assert all(is_loopback(ip) for ip in bound), {ip: n for ip, n in bound.items() if not is_loopback(ip)}
    before = json.loads(state_file.read_text())
    assert len(before["tasks"]) < 3, "the run finished before it could be killed"

    last, marker = Path(before["tasks"][-1]["local"]), tmp_path / "ran"  # its checkpoint swapped for a crafted one
    (last / "model.safetensors").rename(tmp_path / "model.safetensors")
    torch.save({"spec": CreatesFile(marker), "state_dict": {}}, last / "model.pt")
    assert main(["run", *args]) == 2
    assert "model.pt: refused to load, it calls posix.system" in capsys.readouterr().err
    assert not marker.exists() and json.loads(state_file.read_text()) == before
    (last / "model.pt").unlink()
    (tmp_path / "model.safetensors").rename(last / "model.safetensors")

    out = tmp_path / "r.json"
    assert main(["run", "--out", str(out), *args]) == 0
    assert "Resuming" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert len(result["acc_matrix"]) == 3
    assert result["acc_matrix"][0] == before["tasks"][0]["row"]  # task 0 was not trained again
    assert result["mlflow_run_id"] == before["mlflow_run_id"]

    _, runs = mlflow_runs(tmp_path)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result["mlflow_run_id"]]
    assert sorted(r.data.tags["mmcl.task_index"] for r in children) == ["0", "1", "2"]  # each logged once
    assert all(r.info.status == "FINISHED" for r in children)


def test_sensor_streams_train_through_the_timeseries_kind(ray_local, tmp_path, capsys):
    """BasicMotions (the copy `aeon` ships): accelerometer and gyroscope series, tokens by time segment."""
    out = tmp_path / "r.json"
    assert main(["run", "--benchmark", "basicmotions", "--out", str(out), "--tasks", "2", "train.epochs=3",
                 "model.projection=256", "tracking.enabled=false", f"output_dir={tmp_path}"]) == 0
    assert "accelerometer only" in capsys.readouterr().out
    assert json.loads(out.read_text())["avg_acc"] >= 0.8  # 4 activities, chance 0.25
    (manifest,) = tmp_path.glob("cache/*/_mmcl_features.json")
    encoded = json.loads(manifest.read_text())["modalities"]
    assert {m: (e["kind"], e["tokens"], e["dim"]) for m, e in encoded.items()} == {
        "accelerometer": ("timeseries", 4, 15), "gyroscope": ("timeseries", 4, 15)}  # 3 axes x 5 statistics
