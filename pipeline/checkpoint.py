"""The checkpoint format: a task's tensors in `model.safetensors` and the spec that rebuilds the
model in `spec.json`. Written by the workers (or the local loop), read by a resuming worker, the
driver and the registered models. Nothing here runs code from a file it reads: safetensors and JSON
hold data only, and the optimizer states and earlier `model.pt` checkpoints are read with torch's
weights-only unpickler, which refuses a file that names anything but tensors and plain containers."""
import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.methods import ContinualModel, create_model

MODEL_FILE, SPEC_FILE = "model.safetensors", "spec.json"
LEGACY_FILE = "model.pt"  # a pickle of {"spec", "state_dict"}, written before safetensors


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged or would run code when loaded."""


def build_model(spec: dict) -> ContinualModel:
    return create_model(spec["family"], spec["modalities"], spec["num_classes"], spec["model"])


def save_model(model: ContinualModel, spec: dict, folder: str | Path) -> None:
    shapes = model.shape_args()
    spec = {**spec, "num_classes": shapes.pop("num_classes"), "model": {**spec["model"], **shapes}}
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}  # clone: no shared storage
    save_file(tensors, Path(folder) / MODEL_FILE)
    (Path(folder) / SPEC_FILE).write_text(json.dumps(spec))


def load_model(folder: str | Path) -> tuple[ContinualModel, dict]:
    spec, tensors = read_checkpoint(folder)
    model = build_model(spec)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"{folder}: its tensors do not fit its spec ({str(e).splitlines()[0]})") from None
    return model, spec


def read_checkpoint(folder: str | Path) -> tuple[dict, dict]:
    """(spec, tensors) of a checkpoint folder, either format."""
    folder = Path(folder)
    if (folder / MODEL_FILE).exists():
        try:
            return json.loads((folder / SPEC_FILE).read_text()), load_file(folder / MODEL_FILE)
        except (OSError, json.JSONDecodeError, SafetensorError) as e:
            raise CheckpointError(f"{folder}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if (folder / LEGACY_FILE).exists():
        saved = load_tensors(folder / LEGACY_FILE)
        if not isinstance(saved, dict) or not {"spec", "state_dict"} <= saved.keys():
            raise CheckpointError(f"{folder / LEGACY_FILE}: not a checkpoint (no spec and state_dict)")
        return saved["spec"], saved["state_dict"]
    raise CheckpointError(f"{folder}: no checkpoint ({MODEL_FILE} and {SPEC_FILE})")


def load_tensors(path: str | Path, allowed: tuple = (), map_location="cpu"):
    """torch.load with the weights-only unpickler: tensors, plain containers and the `allowed`
    classes; a file that names anything else is refused before any of it runs."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it calls {named.group(1)}" if named else str(e).splitlines()[0]
        raise CheckpointError(f"{path}: refused to load, {what}: a checkpoint holds only tensors and plain "
                              "containers, and unpickling anything else can run code") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
