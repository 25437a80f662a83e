"""Loading files that others can write runs no code: checkpoints, optimizer states and registered
models crafted to create a file when unpickled are refused, or their pickle is left unread, and the
file is never created. A real MLflow SQLite store; no Ray."""
import os

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from models.methods import create_model
from pipeline.checkpoint import CheckpointError, load_model, load_tensors, save_model
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.pyfunc import TaskModel, log_task_model
from pipeline.worker import weights_only_engine

DIMS = {"a": 5, "b": 3}


class CreatesFile:
    """Unpickled, runs `touch path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


class CraftedModel(mlflow.pyfunc.PythonModel):
    """A pyfunc whose python_model.pkl runs `touch path` when MLflow unpickles it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


def checkpoint(folder):
    model = create_model("cmoe", DIMS, 3, vars(load_config().model))
    model.begin_task(3)
    spec = {"family": "cmoe", "modalities": DIMS, "class_order": [7, 8, 9], "encoders": {}, "tokens": 1,
            "model": vars(load_config().model)}
    folder.mkdir()
    save_model(model.eval(), spec, folder)
    return folder


def test_crafted_checkpoints_and_optimizer_states_are_refused_before_they_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"spec": CreatesFile(marker), "state_dict": {}}, tmp_path / "crafted.pt")
    torch.load(tmp_path / "crafted.pt", weights_only=False)  # what loading it used to do
    assert marker.exists()
    marker.unlink()

    folder = tmp_path / "task-0"
    folder.mkdir()
    (tmp_path / "crafted.pt").rename(folder / "model.pt")  # a checkpoint of the earlier format
    with pytest.raises(CheckpointError, match=r"model\.pt: refused to load, it calls posix\.system") as e:
        load_model(folder)
    assert "\n" not in str(e.value)
    torch.save({"adapter": {}, "optimizer": CreatesFile(marker)}, folder / "local.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_tensors(folder / "local.pt")  # the local loop's epoch state
    with pytest.raises(CheckpointError, match="refused"):
        weights_only_engine().load(str(folder / "local.pt"))  # DeepSpeed's epoch state
    assert not marker.exists()

    good = checkpoint(tmp_path / "task-1")
    (good / "model.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(CheckpointError, match="task-1: unreadable checkpoint"):
        load_model(good)


def test_predict_reads_a_registered_models_checkpoint_and_never_its_pickle(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    marker, folder = tmp_path / "ran", checkpoint(tmp_path / "task-0")
    mlflow.set_tracking_uri(uri)
    models = {}
    with mlflow.start_run():
        models["ours"] = log_task_model("task-0", str(folder)).model_uri
        models["earlier"] = mlflow.pyfunc.log_model(name="earlier", python_model=CraftedModel(marker), pip_requirements=[],
                                                    artifacts={"checkpoint": str(folder)}).model_uri
        models["foreign"] = mlflow.pyfunc.log_model(name="foreign", python_model=CraftedModel(marker),
                                                    pip_requirements=[]).model_uri
    for name, model_uri in models.items():
        mlflow.register_model(model_uri, name)
    assert not marker.exists()
    rng = np.random.default_rng(0)
    rows = pa.table({m: [rng.normal(size=d).astype(np.float32).tolist() for _ in range(6)] for m, d in DIMS.items()})
    pq.write_table(rows, tmp_path / "rows.parquet")
    expected = TaskModel(folder).predict(rows.to_pandas())["prediction"].tolist()
    assert set(expected) <= {7, 8, 9}

    assert mlflow.pyfunc.load_model("models:/ours/1").predict(rows.to_pandas())["prediction"].tolist() == expected
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")  # predict reads the store it is given
    for name in ("ours", "earlier"):
        out = tmp_path / f"{name}.parquet"
        assert main(["predict", "--model-uri", f"models:/{name}/1", "--input", str(tmp_path / "rows.parquet"),
                     "--out", str(out), "--tracking-uri", uri]) == 0
        assert pq.read_table(out)["prediction"].to_pylist() == expected
    assert main(["predict", "--model-uri", "models:/foreign/1", "--input", str(tmp_path / "rows.parquet"),
                 "--out", str(tmp_path / "foreign.parquet"), "--tracking-uri", uri]) == 2
    assert "not a model that mmcl logged (its pyfunc loader is mlflow.pyfunc.model)" in capsys.readouterr().err
    assert not marker.exists()
    mlflow.set_tracking_uri(uri)
    with pytest.raises(AttributeError):  # what mlflow.pyfunc (and mmcl predict before) does with it: the pickle
        mlflow.pyfunc.load_model("models:/earlier/1")  # runs, then MLflow finds no model in what it returned
    assert marker.exists()
