"""The Ray Train path for real: one worker gives the in-process loop's numbers, the workers'
evaluation gives the driver's, and a RayTrainWorker killed mid-task is replaced without changing
the result. A local Ray runtime, DeepSpeed engines on gloo, an MLflow SQLite store."""
import os
import signal
import subprocess
import sys
import threading

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors

from pipeline.config import load_config
from pipeline.driver import run_sequence
from pipeline.evaluate import accuracy_row
from pipeline.scenario import make_scenario
from pipeline.worker import autocast, deepspeed_config

pytestmark = pytest.mark.slow


def config(path, out, *overrides):
    return load_config(None, [f"data={path}", "num_tasks=3", "train.epochs=3", "model.projection=256",
                              "tracking.enabled=false", f"output_dir={out}", *overrides])


@pytest.mark.parametrize("hold_mb", ["1024", "0"], ids=["held", "streamed"])
def test_one_worker_gives_the_in_process_loops_matrix(synthetic, tmp_path, ray_local, hold_mb):
    both = ["train.num_workers=1", "train.cpus_per_worker=1", f"train.hold_mb={hold_mb}"]
    on_ray = run_sequence(config(synthetic, tmp_path / "ray", *both), log=lambda *_: None)
    local = run_sequence(config(synthetic, tmp_path / "local", "executor=local", *both), log=lambda *_: None)
    assert on_ray["acc_matrix"] == local["acc_matrix"]
    assert on_ray["avg_acc_only"] == local["avg_acc_only"]


def test_the_workers_evaluation_gives_the_drivers_numbers_and_a_killed_worker_changes_nothing(
        synthetic, tmp_path, ray_local):
    args = ["train.num_workers=2", "train.cpus_per_worker=0.5", "train.epochs=4"]
    undisturbed = run_sequence(config(synthetic, tmp_path / "a", *args, "tracking.enabled=true"), log=lambda *_: None)
    # Each row of the accuracy matrix, as the workers computed it, is what the registered task model gives here.
    client = MlflowClient(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")
    mlflow.set_tracking_uri(client.tracking_uri)
    children = {int(r.data.tags["mmcl.task_index"]): r for r in client.search_runs(
        [client.get_experiment_by_name("synthetic").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{undisturbed['mlflow_run_id']}'")}
    table = pq.read_table(synthetic).to_pandas()
    labels = table.label.to_numpy()
    scenario = make_scenario("class-il", labels, table.domain.to_numpy(), 3, 0)
    test = [np.flatnonzero((table.split == "test").to_numpy() & np.isin(labels, t.classes)) for t in scenario.tasks]
    columns = {c: table[c].to_numpy() for c in ("label", "a", "b")}
    targets = np.array([scenario.class_order.index(v) for v in labels])
    for i, row in enumerate(undisturbed["acc_matrix"]):
        version = client.search_model_versions(f"run_id = '{children[i].info.run_id}'")[0]
        task_model = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}").get_raw_model()
        model, spec = task_model.model, task_model.spec
        assert accuracy_row(model, columns, test, i, targets, spec["modalities"]) == row

    killed, lines = [], []

    def log(line: str) -> None:  # in task 2, after its second epoch's checkpoint: kill a worker by PID
        lines.append(line)
        if "task 2/3 epoch 2/4" in line and not killed:
            workers = list_actors(ray.get_runtime_context().gcs_address, limit=10_000,  # this cluster; limit before filters
                                  filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            killed.append(workers[-1].pid)
            threading.Timer(0.3, os.kill, (killed[0], signal.SIGKILL)).start()  # mid-epoch 3

    result = run_sequence(config(synthetic, tmp_path / "b", *args), log=log)
    assert killed, "the kill never happened"
    assert result["acc_matrix"] == undisturbed["acc_matrix"]
    epochs = [line for line in lines if "task 2/3 epoch 3/4" in line]
    assert len(epochs) == 1, lines  # restored from epoch 2's checkpoint, epoch 3 ran again once and reported once
    assert sum("Task 2/3" in line for line in lines) == 1


def test_deepspeed_and_precision_settings_reach_the_engine_and_the_loop(synthetic, tmp_path):
    train = {"batch_size": 16, "zero_stage": 2, "bucket_size": 1e6, "overlap_comm": True, "precision": "bf16",
             "epochs": 1, "lr": 1e-3, "weight_decay": 0.0}
    ds = deepspeed_config(train)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1_000_000,
                                       "allgather_bucket_size": 1_000_000, "overlap_comm": True}
    assert "bf16" not in ds and deepspeed_config({**train, "zero_stage": 0})["zero_optimization"] == {"stage": 0}
    assert autocast(train, "cpu").fast_dtype == torch.bfloat16
    assert not hasattr(autocast({**train, "precision": "fp32"}, "cpu"), "fast_dtype")
    # bf16 autocast around the forward pass, fp32 master weights: the loop still learns every task.
    result = run_sequence(config(synthetic, tmp_path, "executor=local", "train.precision=bf16"), log=lambda *_: None)
    assert all(result["acc_matrix"][i][i] > 0.8 for i in range(3)), result["acc_matrix"]


def test_a_train_worker_imports_deepspeed_without_mlflow():
    """DeepSpeed's autotuner imports MLflow at import time: 2 s of every worker's start."""
    code = ("import sys; from pipeline.worker import import_deepspeed; ds = import_deepspeed(); "
            "print(ds.initialize is not None, 'mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "DS_ACCELERATOR": "cpu"}).stdout
    assert out.split()[-2:] == ["True", "False"]
