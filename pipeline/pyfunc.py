"""A task's model as an MLflow pyfunc by loader module: a logged model holds the checkpoint's files
(safetensors and JSON) and no pickle, and MLflow loads it by importing this module and calling
`_load_pyfunc`, so loading runs installed code only."""
import base64
import binascii
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import yaml

from pipeline.checkpoint import CheckpointError, load_model

REQUIREMENTS = ["torch", "numpy", "pandas", "pyarrow", "safetensors"]


class TaskModel:
    """A DataFrame with the modality columns in, labels out. Raw images, audio or text are encoded
    with the encoders the model was trained on; images and audio may come base64-encoded (as JSON
    carries them)."""

    def __init__(self, folder: str | Path):
        self.model, self.spec = load_model(folder)
        self.encoders = {}

    def get_raw_model(self):
        """What `mlflow.pyfunc.load_model(uri).get_raw_model()` gives: this, with `.model` and `.spec`."""
        return self

    def _encode(self, column: str, values: np.ndarray, rates) -> np.ndarray:
        from models.encoders import create_encoder

        spec = self.spec.get("encoders", {}).get(column)
        if spec is None or not any(isinstance(v, (bytes, str)) for v in values):
            return values  # already features
        if column not in self.encoders:
            self.encoders[column] = create_encoder(spec, self.spec["tokens"])
        encoder, out = self.encoders[column], np.empty(len(values), dtype=object)
        rows = [i for i, v in enumerate(values) if v is not None]
        if encoder.kind in ("image", "audio"):
            values = values.copy()
            for i in rows:
                if isinstance(values[i], str):
                    try:
                        values[i] = base64.b64decode(values[i], validate=True)
                    except binascii.Error:
                        raise ValueError(f"column {column}, row {i}: text where {encoder.kind} bytes are expected "
                                         "(send them base64-encoded)") from None
        kwargs = {"sample_rates": [rates[i] for i in rows]} if encoder.kind == "audio" and rates is not None else {}
        for i, e in zip(rows, encoder.encode([values[i] for i in rows], **kwargs) if rows else []):
            out[i] = e.reshape(-1)
        return out

    def predict(self, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from pipeline.evaluate import predict

        missing = [m for m in self.spec["modalities"] if m not in model_input.columns]
        if missing:
            raise ValueError(f"input lacks the model's modality columns: {', '.join(missing)}")
        rates = model_input["sample_rate"].to_numpy() if "sample_rate" in model_input.columns else None
        columns = {m: self._encode(m, model_input[m].to_numpy(), rates) for m in self.spec["modalities"]}
        for m, dim in self.spec["modalities"].items():
            for i, v in enumerate(columns[m]):
                if v is not None and (np.ndim(v) != 1 or len(v) % dim):
                    raise ValueError(f"column {m}, row {i}: {np.size(v)} values; the model takes {dim} per token")
        columns["label"] = np.zeros(len(model_input), dtype=np.int64)
        index = predict(self.model, columns, self.spec["modalities"])
        order = np.asarray(self.spec["class_order"])
        return pd.DataFrame({"prediction": order[index]})


def _load_pyfunc(data_path: str, model_config=None) -> TaskModel:
    return TaskModel(data_path)


def log_task_model(name: str, checkpoint_dir: str):
    """Logs the checkpoint as model `name` of the active run; returns MLflow's ModelInfo."""
    return mlflow.pyfunc.log_model(name=name, loader_module=__name__, data_path=checkpoint_dir,
                                   pip_requirements=REQUIREMENTS)


def load_task_model(model_uri: str, tracking_uri: str) -> TaskModel:
    """A logged or registered model (`download_checkpoint`), loaded."""
    with tempfile.TemporaryDirectory(prefix="mmcl-model-") as tmp:
        return TaskModel(download_checkpoint(model_uri, tracking_uri, tmp))


def download_checkpoint(model_uri: str, tracking_uri: str, dst: str | Path) -> Path:
    """The checkpoint folder of a logged or registered model, downloaded under `dst`, its MLmodel
    checked to name this module before anything else is read: mlflow.pyfunc.load_model would import
    whatever loader a crafted MLmodel names, or unpickle its python_model.pkl. Versions logged before
    this module (a pickled PythonModel with the checkpoint as its artifact) give that checkpoint,
    their pickle unread."""
    mlflow.set_tracking_uri(tracking_uri)  # models:/ resolves in the global registry, whatever it is passed
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    flavor = (yaml.safe_load((local / "MLmodel").read_text()) or {}).get("flavors", {}).get("python_function", {})
    loader = flavor.get("loader_module")
    if loader == __name__:
        return local / flavor["data"]
    earlier = flavor.get("artifacts", {}).get("checkpoint", {}).get("path")
    if loader == "mlflow.pyfunc.model" and earlier:
        return local / earlier
    raise CheckpointError(f"{model_uri}: not a model that mmcl logged (its pyfunc loader is {loader}); "
                          "mmcl loads only its own, whose files hold no code")
