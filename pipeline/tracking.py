"""MLflow: a parent run per sequence, a child run and a registered model version per task."""
import hashlib
import json
import re
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import requests
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (MLFLOW_DATASET_CONTEXT, MLFLOW_MODEL_VERSIONS, MLFLOW_PARENT_RUN_ID,
                                      MLFLOW_RUN_NOTE)

from pipeline import storage
from pipeline.config import ConfigError, RunConfig
from pipeline.lock import file_lock
from pipeline.pyfunc import load_task_model, log_task_model
from pipeline.state import TaskRecord

TASK_TAG = "mmcl.task_index"
CHAMPION, CHALLENGER = "champion", "challenger"  # the registry aliases `mmcl update` moves
TRACKING_ERRORS = (mlflow.exceptions.MlflowException, requests.RequestException, OSError)
TRANSIENT = ("database is locked", "database table is locked")  # SQLite under concurrent writers
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the UI's model-training view
SUMMARY = {  # metric: what it means (the sequence run's description lists them)
    "seq/avg_acc": "average accuracy: the mean of the last row of the accuracy matrix (every task seen so far)",
    "seq/avg_inc_acc": "average incremental accuracy: the mean over tasks of each row's average accuracy",
    "seq/forgetting": "forgetting: per earlier task, its best accuracy before the last task minus its last, "
                      "averaged",
    "seq/bwt": "backward transfer: per earlier task, its last accuracy minus its accuracy right after it was "
               "learned, averaged (negative: forgotten)",
    "acc/task_J": "accuracy on task J's test rows after each task (step = the task just learned)",
    "only/M": "average accuracy of the final model with every modality but M masked at test time",
    "val/...": "the same summaries on the validation rows held out of training",
    "time/sequence_s": "wall-clock seconds of the whole sequence",
}


def _round(value) -> float:
    return round(float(value), 4)


def _summary_metrics(summary: dict, prefix: str, step: int) -> list[Metric]:
    return [Metric(f"{prefix}/{k}", _round(v), 0, step) for k, v in summary.items()]


def experiment_name(cfg: RunConfig) -> str:
    return cfg.tracking.experiment or (cfg.benchmark if not cfg.data else Path(cfg.data).stem)


def registered_model_name(cfg: RunConfig) -> str:
    """One name per (data, scenario, method): a sequence's versions chain inside one model."""
    return f"{experiment_name(cfg)}-{cfg.scenario}-{cfg.method}"


def data_fingerprint(path: str | Path) -> str:
    """sha256 over the bytes of the Parquet file, or of every file under the folder in order (a
    local path or a URI)."""
    path = str(path).rstrip("/")
    files = [f for f, _ in storage.files_under(path)] if storage.is_dir(path) else [path]
    h = hashlib.sha256()
    for f in files:
        h.update((f[len(path) + 1:] if f != path else storage.name(f)).encode())
        for chunk in storage.chunks(f):
            h.update(chunk)
    return h.hexdigest()[:16]


def tracking_uri(cfg: RunConfig) -> str:
    return cfg.tracking.uri or local_store(cfg)


def local_store(cfg: RunConfig) -> str:
    return f"sqlite:///{Path(cfg.output_dir).resolve() / 'mlflow.db'}"


def check_tracking_server(uri: str, timeout_s: float = 5) -> None:
    """A tracking server that does not answer fails in seconds, before anything runs."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
        reason = None if response.ok else f"HTTP {response.status_code} from /health"
    except requests.RequestException as e:
        reason = "connection refused" if "refused" in str(e) else type(e).__name__
    if reason:
        raise ConfigError(f"tracking.uri: {uri} does not answer ({reason}); start the MLflow server there, or leave "
                          "tracking.uri unset for the store under output_dir")


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def open_client(uri: str) -> MlflowClient:
    """A client whose store exists: a new SQLite store's schema is created by one process at a time."""
    db = sqlite_path(uri)
    if db is None:
        return Retrying(MlflowClient(uri))
    with file_lock(db.with_name(db.name + ".lock")):
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
    return Retrying(client)


def retry(call, *args, attempts: int = 6, **kwargs):
    """`call`, again after the store's transient errors (a locked SQLite database)."""
    for attempt in range(attempts):
        try:
            return call(*args, **kwargs)
        except mlflow.exceptions.MlflowException as e:
            if attempt == attempts - 1 or not any(t in str(e) for t in TRANSIENT):
                raise
            time.sleep(0.2 * 2 ** attempt)


class Retrying:
    """An MlflowClient whose every call goes through `retry`."""

    def __init__(self, client: MlflowClient):
        self.client = client

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        return (lambda *a, **k: retry(attr, *a, **k)) if callable(attr) else attr


def ui_command(cfg: RunConfig) -> str:
    uri = tracking_uri(cfg)
    if not uri.startswith("sqlite:"):
        return f"open {uri} in a browser"
    return f"mmcl ui --tracking-uri {uri}"


class Tracker:
    def __init__(self, cfg: RunConfig, model_name: str | None = None):
        self.uri = tracking_uri(cfg)
        self.client = open_client(self.uri)
        self.model_name = model_name or registered_model_name(cfg)
        name = experiment_name(cfg)
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            artifacts = None  # a tracking server's own artifact store, or a local store's folder beside it
            if self.uri == local_store(cfg):  # (a sweep passes its local store on to its trials by URI)
                artifacts = (Path(cfg.output_dir).resolve() / "mlartifacts").as_uri()
            try:
                exp = self.client.get_experiment(self.client.create_experiment(
                    name, artifact_location=artifacts, tags=dict([EXPERIMENT_KIND])))
            except mlflow.exceptions.MlflowException:
                exp = self.client.get_experiment_by_name(name)  # created meanwhile by a run beside this one
                if exp is None:
                    raise
        if EXPERIMENT_KIND[0] not in exp.tags:  # made by an earlier version, or by hand
            self.client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        self.experiment_id = exp.experiment_id

    def start_sequence(self, cfg: RunConfig, run_name: str, run_id: str | None = None) -> str:
        """The sequence's parent run: reopened when resuming, else created with the config as params."""
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        tags = {"mmcl.method": cfg.method, "mmcl.scenario": cfg.scenario, "mmcl.config_fingerprint": cfg.fingerprint()}
        if cfg.tracking.parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = cfg.tracking.parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        params = [Param(k, str(v)) for k, v in cfg.flat().items()]
        for lo in range(0, len(params), 100):
            self.client.log_batch(run.info.run_id, params=params[lo:lo + 100])
        self.client.log_dict(run.info.run_id, cfg.to_dict(), "config.yaml")
        return run.info.run_id

    def task_run(self, parent_id: str, task_index: int):
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{parent_id}' and tags.`{TASK_TAG}` = '{task_index}'")
        return found[0] if found else None

    def start_task(self, parent_id: str, cfg: RunConfig, task, num_tasks: int, data: dict,
                   started_at: float | None = None) -> str:
        """The task's child run, created when the task starts (once: a resumed task reopens it), with
        the task's settings as parameters and the data as a dataset input (on the sequence run too)
        carrying its fingerprint."""
        existing = self.task_run(parent_id, task.index)
        if existing is not None:
            return existing.info.run_id
        run_id = self.client.create_run(
            self.experiment_id, run_name=f"task-{task.index} of {num_tasks}",
            start_time=int(started_at * 1000) if started_at else None,
            tags={MLFLOW_PARENT_RUN_ID: parent_id, TASK_TAG: str(task.index)}).info.run_id
        params = {**cfg.flat(), "task.index": task.index, "task.classes": ",".join(map(str, task.classes)),
                  "task.domains": ",".join(task.domains or [])}
        params = [Param(k, str(v)) for k, v in params.items()]
        for lo in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[lo:lo + 100])
        for run in (parent_id, run_id):  # (logging the same dataset twice on a run adds nothing)
            self.client.log_inputs(run, datasets=[dataset_input(**data)])
        return run_id

    def log_task(self, parent_id: str, task: TaskRecord, num_tasks: int, checkpoint_dir: str, lineage: dict) -> dict:
        """The task's run FINISHED with its history and row of the matrix, the sequence run's stepped
        metrics, and a registered model version of its checkpoint; all looked up first, so that a
        resumed sequence logs nothing twice. Returns {"run_id", "model_version"}."""
        existing = self.task_run(parent_id, task.index)
        i = task.index
        if existing is not None and existing.info.status == "FINISHED":
            run_id = existing.info.run_id
        else:
            run_id = existing.info.run_id if existing else self.client.create_run(
                self.experiment_id, run_name=f"task-{i} of {num_tasks}",
                tags={MLFLOW_PARENT_RUN_ID: parent_id, TASK_TAG: str(i)}).info.run_id
            metrics = [Metric(f"train/{'elapsed_s' if k == 'seconds' else k}", _round(v), 0, int(h["epoch"]))
                       for h in task.history for k, v in h.items() if k != "epoch"]
            after = [Metric(f"acc/task_{j}", _round(a), 0, i) for j, a in enumerate(task.row) if a is not None]
            after += _summary_metrics(task.summary, "seq", i)
            after += _summary_metrics(task.val_summary or {}, "val", i)
            self.client.log_batch(parent_id, metrics=after)  # the sequence's curves, step = task index
            metrics += after
            for lo in range(0, len(metrics), 500):
                self.client.log_batch(run_id, metrics=metrics[lo:lo + 500],
                                      tags=[RunTag("mmcl.task_classes", ",".join(map(str, task.classes)))])
        version = self.register_task_model(run_id, i, checkpoint_dir, lineage)
        self.client.set_terminated(run_id, "FINISHED")
        return {"run_id": run_id, "model_version": version}

    def register_task_model(self, run_id: str, task_index: int, checkpoint_dir: str, lineage: dict) -> str:
        """One registered version per task, linked to its logged model (`task-N`) the way
        mlflow.register_model links them; its tags say what it continued from and what it saw."""
        found = self.client.search_model_versions(f"name = '{self.model_name}' and run_id = '{run_id}'")
        if found:
            return str(found[0].version)
        mlflow.set_tracking_uri(self.uri)  # the fluent API and the registry's model-URI lookup use it
        with mlflow.start_run(run_id=run_id):
            info = retry(log_task_model, f"task-{task_index}", str(checkpoint_dir))
        tags = {"mmcl.task_index": str(task_index), "mmcl.run_id": run_id, **lineage}
        try:
            self.client.create_registered_model(self.model_name)
        except mlflow.exceptions.MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(self.model_name, info.model_uri, run_id=run_id, tags=tags,
                                                   description=f"after task {task_index}", model_id=info.model_id)
        link = [{"name": self.model_name, "version": version.version}]  # as mlflow.register_model sets it
        self.client.set_logged_model_tags(info.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(link)})
        return str(version.version)

    def finish_sequence(self, parent_id: str, result: dict, labels: list[str]) -> None:
        final = [Metric("time/sequence_s", round(result["seconds"], 1), 0, result["num_tasks"] - 1)]
        final += [Metric(f"only/{m}", _round(v), 0, result["num_tasks"] - 1)
                  for m, v in result.get("avg_acc_only", {}).items()]
        self.client.log_batch(parent_id, metrics=final, tags=[RunTag(MLFLOW_RUN_NOTE, description(result, labels))])
        self.client.log_dict(parent_id, {k: result[k] for k in ("acc_matrix", "avg_acc", "avg_inc_acc", "forgetting",
                                                                "bwt", "seconds")}, "acc_matrix.json")
        import matplotlib.pyplot as plt

        for name, figure in plots(result, labels).items():
            self.client.log_figure(parent_id, figure, name)
            plt.close(figure)  # a sweep runs many sequences in one process
        self.client.set_terminated(parent_id, "FINISHED")

    def fail_sequence(self, parent_id: str) -> None:
        self.client.set_terminated(parent_id, "FAILED")

    def start_sweep(self, run_name: str, settings: dict) -> str:
        """The sweep's run, its settings as `sweep.*` params; trials nest under it."""
        run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags={"mmcl.sweep": "true"}).info.run_id
        self.client.log_batch(run_id, params=[Param(f"sweep.{k}", str(v)) for k, v in settings.items()])
        return run_id

    def record_invalid_trial(self, sweep_id: str, params: dict, error: Exception) -> None:
        """A trial whose config is rejected still leaves a FAILED run under the sweep."""
        run_id = self.client.create_run(self.experiment_id, run_name="invalid trial", tags={
            MLFLOW_PARENT_RUN_ID: sweep_id, "mmcl.error": str(error)[:5000]}).info.run_id
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        self.client.set_terminated(run_id, "FAILED")

    def end_stopped_trials(self, sweep_id: str) -> None:
        """A trial that the scheduler stopped was ended mid-sequence: its run says so instead of RUNNING."""
        for run in self.client.search_runs([self.experiment_id], filter_string=(
                f"tags.{MLFLOW_PARENT_RUN_ID} = '{sweep_id}' and attributes.status = 'RUNNING'")):
            self.client.set_tag(run.info.run_id, "mmcl.stopped_early", "true")
            self.client.set_terminated(run.info.run_id, "KILLED")

    def finish_sweep(self, sweep_id: str, summary: dict, best_config: str) -> None:
        self.client.log_batch(sweep_id, metrics=[Metric(k, float(v), 0, 0) for k, v in summary.items()
                                                 if isinstance(v, (int, float))])
        self.client.log_artifact(sweep_id, best_config)
        self.client.set_terminated(sweep_id, "FINISHED")


def dataset_input(name: str, path: str, fingerprint: str, features: str | None) -> DatasetInput:
    """The data a task trained on, as MLflow's dataset input: its file, its sha256 fingerprint as the
    digest, and the feature cache it was read through."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    where = path if storage.is_uri(path) else str(Path(path).resolve())
    dataset = MetaDataset(resolve_dataset_source(where), name=name, digest=fingerprint)
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, "train")] + ([InputTag("mmcl.features", features)] if features else [])
    return DatasetInput(dataset._to_mlflow_entity(), tags=tags)


def description(result: dict, labels: list[str]) -> str:
    """The sequence run's note (Markdown): the accuracy matrix as a table and what each metric means."""
    n = len(result["acc_matrix"])
    lines = [f"**{result['method']}**, {result['scenario']}, {n} tasks, seed {result['seed']}: average accuracy "
             f"{result['avg_acc']:.4f}, average incremental accuracy {result['avg_inc_acc']:.4f}, forgetting "
             f"{result['forgetting']:.4f}, backward transfer {result['bwt']:+.4f}.", "",
             "Accuracy matrix (row: after training that task; column: that task's test rows):", "",
             "| after \\ on | " + " | ".join(labels) + " |", "|---" * (n + 1) + "|"]
    for label, row in zip(labels, result["acc_matrix"]):
        lines.append(f"| {label} | " + " | ".join("" if v is None else f"{v:.3f}" for v in row) + " |")
    lines += ["", "Metrics (charts: step = task index, from 0):", ""]
    lines += [f"- `{k}`: {v}" for k, v in SUMMARY.items()]
    return "\n".join(lines)


def task_labels(tasks: list[TaskRecord]) -> list[str]:
    """'T0: 3, 7' (class-IL) or 'T0: photo' (domain-IL): the task index, as in the console's matrix."""
    return [f"T{i}: " + ", ".join(map(str, t.domains or t.classes or [])) for i, t in enumerate(tasks)]


def plots(result: dict, labels: list[str]) -> dict:
    """The accuracy matrix as a heatmap and each task's accuracy along the sequence, titled with the
    run's method, scenario, seed and summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = np.array([[np.nan if v is None else v for v in row] for row in result["acc_matrix"]])
    n = len(a)
    title = (f"{result['method']}, {result['scenario']}, seed {result['seed']}: average accuracy "
             f"{result['avg_acc']:.3f}, forgetting {result['forgetting']:.3f}")
    low = float(np.floor(np.nanmin(a) * 20) / 20)  # the data's range, down to a multiple of 0.05
    heat, ax = plt.subplots(figsize=(2.5 + 1.1 * n, 1.8 + 0.8 * n), dpi=150)
    im = ax.imshow(a, vmin=low, vmax=1, cmap="magma")
    for (i, j), v in np.ndenumerate(a):
        if not np.isnan(v):
            dark = (v - low) / max(1 - low, 1e-9) < 0.6
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w" if dark else "k", fontsize=9)
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set(xlabel="evaluated on the test rows of", ylabel="after training on")
    ax.set_title(title, fontsize=9)
    heat.colorbar(im, ax=ax, label="accuracy")
    curves, ax = plt.subplots(figsize=(7, 4.5), dpi=150)
    for j in range(a.shape[1]):
        ax.plot(range(j, n), a[j:, j], marker="o", label=labels[j])
    ax.plot(range(n), np.nanmean(a, 1), "k--", marker="s", label="mean over tasks seen")
    span = float(np.nanmax(a) - np.nanmin(a))
    ax.set_ylim(max(0.0, np.nanmin(a) - 0.1 * span - 0.005), min(1.005, np.nanmax(a) + 0.1 * span + 0.005))
    ax.set_xticks(range(n), [label.split(":")[0] for label in labels])
    ax.set(xlabel="after training task", ylabel="test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figs = {"acc_matrix.png": heat, "acc_curves.png": curves}
    for f in figs.values():
        f.tight_layout()
    return figs


class NoTracker:
    """`tracking.enabled: false`: the same calls, nothing recorded."""

    def start_sequence(self, cfg, run_name, run_id=None):
        return None

    def start_task(self, parent_id, cfg, task, num_tasks, data, started_at=None) -> None:
        pass

    def log_task(self, parent_id, task, num_tasks, checkpoint_dir, lineage) -> dict:
        return {"run_id": None, "model_version": ""}

    def finish_sequence(self, parent_id, result, labels) -> None:
        pass

    def fail_sequence(self, parent_id) -> None:
        pass


def predict(uri: str, model_uri: str, frame: pd.DataFrame) -> pd.DataFrame:
    """A registered (or logged) model's predictions, the model read from the store at `uri`."""
    return load_task_model(model_uri, uri).predict(frame)


def model_versions(uri: str, name: str) -> list:
    """A registered model's versions, oldest first."""
    return sorted(MlflowClient(uri).search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """NAME, NAME@ALIAS or NAME/VERSION (a models:/ URI too) -> (name, alias, version); NAME means
    NAME@champion."""
    ref = ref.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, alias, None
    if re.fullmatch(r".+/\d+", ref):
        name, version = ref.rsplit("/", 1)
        return name, None, version
    return ref, CHAMPION, None


def model_aliases(uri: str, name: str) -> dict[str, str]:
    """A registered model's aliases: alias -> version."""
    return {a: str(v) for a, v in MlflowClient(uri).get_registered_model(name).aliases.items()}


def experiment_links(uri: str, address: str) -> list[tuple[str, str]]:
    """Each experiment's runs (the sequences and their task runs) in the UI's model-training view
    (the UI opens in its GenAI view otherwise)."""
    found = [e for e in MlflowClient(uri).search_experiments() if e.name != "Default"]
    return [(e.name, f"{address}/#/experiments/{e.experiment_id}/runs?workflowType=machine_learning") for e in found]
