"""The checkpoint format: a task's model and the spec that rebuilds it, in one `model.pt`. Written
by the workers (or the local loop), read by a resuming worker, the driver and MLflow's logged
models."""
from pathlib import Path

import torch

from models.methods import ContinualModel, create_model

MODEL_FILE = "model.pt"


def build_model(spec: dict) -> ContinualModel:
    return create_model(spec["family"], spec["modalities"], spec["num_classes"], spec["model"])


def save_model(model: ContinualModel, spec: dict, folder: str | Path) -> None:
    shapes = model.shape_args()
    spec = {**spec, "num_classes": shapes.pop("num_classes"), "model": {**spec["model"], **shapes}}
    torch.save({"spec": spec, "state_dict": model.state_dict()}, Path(folder) / MODEL_FILE)


def load_model(folder: str | Path) -> tuple[ContinualModel, dict]:
    saved = torch.load(Path(folder) / MODEL_FILE, map_location="cpu", weights_only=False)
    model = build_model(saved["spec"])
    model.load_state_dict(saved["state_dict"])
    return model, saved["spec"]
