"""MLflow: a parent run per sequence, a child run per finished task, logged once each."""
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pipeline.config import RunConfig

TASK_TAG = "mmcl.task_index"


def tracking_uri(cfg: RunConfig) -> str:
    return cfg.tracking.uri or f"sqlite:///{Path(cfg.output_dir).resolve() / 'mlflow.db'}"


def ui_command(cfg: RunConfig) -> str:
    uri = tracking_uri(cfg)
    if not uri.startswith("sqlite:"):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000 --workers 1"


class Tracker:
    def __init__(self, cfg: RunConfig):
        self.client = MlflowClient(tracking_uri(cfg))
        name = cfg.tracking.experiment or (cfg.benchmark if not cfg.data else Path(cfg.data).stem)
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            artifacts = None
            if not cfg.tracking.uri:
                artifacts = (Path(cfg.output_dir).resolve() / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
        else:
            self.experiment_id = exp.experiment_id

    def start_sequence(self, cfg: RunConfig, run_name: str, run_id: str | None = None) -> str:
        """The sequence's parent run: reopened when resuming, else created with the config as params."""
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={
            "mmcl.method": cfg.method, "mmcl.scenario": cfg.scenario, "mmcl.config_fingerprint": cfg.fingerprint()})
        params = [Param(k, str(v)) for k, v in cfg.flat().items()]
        for lo in range(0, len(params), 100):
            self.client.log_batch(run.info.run_id, params=params[lo:lo + 100])
        return run.info.run_id

    def task_run(self, parent_id: str, task_index: int):
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{parent_id}' and tags.`{TASK_TAG}` = '{task_index}'")
        return found[0] if found else None

    def log_task(self, parent_id: str, task: dict, num_tasks: int, checkpoint_dir: str | None) -> str:
        """A FINISHED child run with the task's history and row of the matrix; skipped if already there."""
        existing = self.task_run(parent_id, task["index"])
        if existing is not None and existing.info.status == "FINISHED":
            return existing.info.run_id
        i = task["index"]
        run_id = existing.info.run_id if existing else self.client.create_run(
            self.experiment_id, run_name=f"task-{i}",
            tags={MLFLOW_PARENT_RUN_ID: parent_id, TASK_TAG: str(i)}).info.run_id
        metrics = [Metric(k, float(v), 0, int(h["epoch"])) for h in task["history"]
                   for k, v in h.items() if k not in ("epoch", "task", "epochs", "num_tasks")]
        metrics += [Metric(f"acc_task_{j}", float(a), 0, 0) for j, a in enumerate(task["row"]) if a is not None]
        metrics += [Metric(k, float(v), 0, 0) for k, v in task["summary"].items()]
        tags = [RunTag("mmcl.task_classes", ",".join(map(str, task["classes"]))),
                RunTag(MLFLOW_RUN_NAME, f"task-{i} of {num_tasks}")]
        for lo in range(0, len(metrics), 500):
            self.client.log_batch(run_id, metrics=metrics[lo:lo + 500], tags=tags if lo == 0 else [])
        if checkpoint_dir:
            self.client.log_artifacts(run_id, checkpoint_dir, "checkpoint")
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def finish_sequence(self, parent_id: str, result: dict) -> None:
        summary = {k: result[k] for k in ("avg_acc", "avg_inc_acc", "forgetting", "bwt", "seconds")}
        self.client.log_batch(parent_id, metrics=[Metric(k, float(v), 0, 0) for k, v in summary.items()])
        self.client.log_dict(parent_id, {"acc_matrix": result["acc_matrix"], **summary}, "acc_matrix.json")
        self.client.set_terminated(parent_id, "FINISHED")

    def fail_sequence(self, parent_id: str) -> None:
        self.client.set_terminated(parent_id, "FAILED")
