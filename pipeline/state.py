"""A sequence's run folder state: what has finished, written atomically after each task so that a
crash resumes at the next one and nothing is logged twice."""
import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.lock import RunLock

STATE_FILE = "state.json"


@dataclass
class TaskRecord:
    """A finished task."""
    index: int
    classes: list
    domains: list | None
    checkpoint: str  # where the next task and a resume start from (Ray Train's copy, maybe on storage_path)
    local: str  # the task's folder in the run folder (what MLflow logs)
    row: list  # its row of the test accuracy matrix (None for tasks not yet seen)
    history: list[dict]  # per epoch: loss terms, elapsed seconds
    summary: dict  # the test metrics of the matrix so far
    val_row: list | None = None
    val_summary: dict | None = None
    modality_acc: dict | None = None  # last task: average accuracy with one modality seen
    logged: bool = False  # its child run and model version are in MLflow
    run_id: str | None = None
    model_version: str | None = None


class SequenceState:
    def __init__(self, folder: Path, data: dict):
        self.folder, self.data = folder, data
        fields = {f.name for f in dataclasses.fields(TaskRecord)}
        self.tasks = [TaskRecord(**{k: v for k, v in t.items() if k in fields}) for t in data.pop("tasks")]

    @classmethod
    def open(cls, folder: Path, fingerprint: str, fresh: bool = False) -> "SequenceState":
        """The folder's sequence, unfinished or finished; a new one with `fresh` (the folder emptied,
        its lock kept)."""
        path = folder / STATE_FILE
        if path.is_file() and not fresh:
            data = json.loads(path.read_text())
            if data.get("fingerprint") == fingerprint and (not data.get("complete") or "result" in data):
                return cls(folder, data)
        for entry in folder.iterdir():
            if entry.name != RunLock.NAME:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        return cls(folder, {"fingerprint": fingerprint, "complete": False, "mlflow_run_id": None, "tasks": []})

    @property
    def last(self) -> TaskRecord | None:
        return self.tasks[-1] if self.tasks else None

    def save(self) -> None:
        tmp = self.folder / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps({**self.data, "tasks": [dataclasses.asdict(t) for t in self.tasks]}, indent=1))
        tmp.replace(self.folder / STATE_FILE)
