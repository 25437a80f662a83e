"""Walks a task sequence, as a recipe: `setup` (data, scenario, run folder, MLflow), `train` (the
executor's tasks, each recorded and logged as it ends), `cleanup` (the result, checkpoints freed).
A rerun resumes after the last finished task; a finished sequence reports itself."""
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray.train

from models.methods import get_method
from pipeline import storage
from pipeline.benchmarks import benchmark_path
from pipeline.cache import build_features, encoder_specs
from pipeline.checkpoint import read_checkpoint
from pipeline.config import ConfigError, RunConfig
from pipeline.data import MultiModalData, load_data, plan_data
from pipeline.evaluate import summarize
from pipeline.executors import EXECUTORS
from pipeline.lock import RunLock
from pipeline.runtime import init_ray, quiet_logs
from pipeline.scenario import Scenario, default_tasks, make_scenario
from pipeline.state import SequenceState, TaskRecord
from pipeline.streams import row_bytes
from pipeline.tracking import (TRACKING_ERRORS, NoTracker, Tracker, check_tracking_server, data_fingerprint,
                               task_labels, tracking_uri)


@dataclass
class PreparedData:
    """The data a sequence reads, checked (and encoded) once."""
    data: MultiModalData  # what the model reads (the file, or its frozen features), with only the plan's columns
    source: str  # the file the user gave, or the benchmark's build
    fingerprint: str  # of the source's bytes
    features: str | None = None  # the feature cache folder, when the source needed encoding
    encoders: dict = field(default_factory=dict)  # modality -> the encoder spec that made its features

    @property
    def name(self) -> str:
        return Path(self.source).stem

    def load(self) -> MultiModalData:
        """Every row and column the model reads, in this process (analysis scripts; training streams them)."""
        return load_data(self.features or self.source)

    def dataset_input(self) -> dict:
        return {"name": self.name, "path": self.source, "fingerprint": self.fingerprint, "features": self.features}


def hold_out_validation(split: np.ndarray, labels: np.ndarray, sample_ids: np.ndarray, fraction: float,
                        groups: np.ndarray | None = None):
    """Marks a seeded `fraction` of each class's train rows 'val' unless the data has 'val' rows.
    With `groups`, whole groups move: rows that share one (the same image paired with several
    recordings, say) are never on both sides.

    Returns the new split column and the ids of the rows moved out of training.
    """
    if fraction <= 0 or (split == "val").any():
        return split, []
    split, rng = split.copy(), np.random.default_rng(12345)
    train = np.flatnonzero(split == "train")
    groups = groups[train] if groups is not None else np.arange(len(train))
    classes, class_of_row = np.unique(labels[train], return_inverse=True)
    wanted = np.round(fraction * np.bincount(class_of_row)).astype(int)
    taken = np.zeros_like(wanted)
    order, group_of_row = np.unique(groups, return_inverse=True)
    rows_of_group = np.split(np.argsort(group_of_row, kind="stable"), np.cumsum(np.bincount(group_of_row))[:-1])
    for g in rng.permutation(len(order)):
        counts = np.bincount(class_of_row[rows_of_group[g]], minlength=len(classes))
        if np.all(taken + counts <= wanted):
            taken += counts
            split[train[rows_of_group[g]]] = "val"
    return split, sample_ids[split == "val"].tolist()


def check_locations(cfg: RunConfig) -> None:
    """Storage that is not there stops a run before Ray starts."""
    for key, where in (("cache.dir", cfg.cache.dir), ("storage_path", cfg.storage_path)):
        if problem := storage.unreachable(where or ""):
            raise ConfigError(f"{key}: {problem}")


def prepare_data(cfg: RunConfig, log=print, verbose: bool = False) -> PreparedData:
    """The data the model reads: the file itself, or its features from the cache (encoded first if
    needed), once `num_tasks` is set and checked against it. Only the plan's columns are read here."""
    source = str(cfg.data or benchmark_path(cfg.benchmark, Path(cfg.output_dir) / "data"))
    data = load_data(source)  # several files: checked by Ray Data tasks when the caller started Ray
    check_tasks(cfg, data)
    return prepare_source(cfg, source, data, log, verbose)


def prepare_source(cfg: RunConfig, source: str, data: MultiModalData, log=print, verbose: bool = False,
                   fingerprint: str | None = None) -> PreparedData:
    """A checked source (`load_data`) as the model reads it: itself, or its cached features."""
    fingerprint = fingerprint or data_fingerprint(source)
    if not data.needs_encoding:
        return PreparedData(data, source, fingerprint)
    init_ray(cfg, verbose)  # the encoders are a Ray Data actor pool
    # frozen encoders run once per (encoders, data): training reads the cache
    features = str(build_features(data, fingerprint, cfg.encoders, cfg.encoder_tokens, cfg.cache_dir(),
                                  cfg.cache.actors, cfg.cache.batch_size, log))
    return PreparedData(plan_data(features), source, fingerprint, features, encoder_specs(data, cfg.encoders))


def check_tasks(cfg: RunConfig, data) -> None:
    """`num_tasks` from the data when unset (0), and whether the data makes that many tasks."""
    labels, domains = data.column("label"), data.column("domain").astype(str)
    cfg.num_tasks = cfg.num_tasks or default_tasks(cfg.scenario, labels, domains)
    try:
        make_scenario(cfg.scenario, labels, domains, cfg.num_tasks, cfg.seed)
    except ValueError as e:
        raise ConfigError(f"num_tasks: {e}") from None


def run_sequence(cfg: RunConfig, verbose: bool = False, log=print, on_task_end=None, fresh: bool = False) -> dict:
    """Runs, resumes or (when it has finished) reports the whole sequence, and returns the
    output-contract dict. `fresh`: a new sequence, whatever the run folder holds.

    `on_task_end(record)` is called after each task trained in this call (a sweep reports there).
    """
    quiet_logs(verbose)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "4")  # a server gone costs 30 s a call, not 4 min
    started = time.time()
    if cfg.tracking.enabled:
        check_tracking_server(tracking_uri(cfg))
    check_locations(cfg)
    executor = EXECUTORS[cfg.executor]
    executor.start(cfg, verbose)
    prepared = prepare_data(cfg, log, verbose)
    labels, domains = prepared.data.column("label"), prepared.data.column("domain").astype(str)
    scenario = make_scenario(cfg.scenario, labels, domains, cfg.num_tasks, cfg.seed)
    name = f"{prepared.name}-{cfg.scenario}-{cfg.method}-seed{cfg.seed}"
    run_dir = Path(cfg.output_dir) / f"{name}-{cfg.fingerprint()}"
    with RunLock(run_dir) as lock:
        if lock.taken_over:
            log(f"Taking over {run_dir} from {lock.taken_over}, which is no longer running")
        state = SequenceState.open(run_dir, cfg.fingerprint(), fresh)
        tracker = Tracker(cfg) if cfg.tracking.enabled else NoTracker()
        recipe = SequenceRecipe(cfg, prepared, scenario, state, tracker, log, started)
        if state.data["complete"]:
            return recipe.report_finished()
        plan = recipe.setup(name, verbose)
        try:
            recipe.train(executor, plan, verbose, on_task_end)
        except BaseException:
            recipe.to_mlflow(tracker.fail_sequence, state.data["mlflow_run_id"])
            raise
        return recipe.cleanup()


class SequenceRecipe:
    """One sequence in its run folder (held locked by the caller)."""

    def __init__(self, cfg: RunConfig, prepared: PreparedData, scenario: Scenario, state: SequenceState, tracker,
                 log, started: float):
        self.cfg, self.prepared, self.scenario, self.state, self.tracker = cfg, prepared, scenario, state, tracker
        self.log, self.started = log, started
        self.seconds_before = state.data.get("seconds", 0.0)
        self.offline = []  # the first MLflow error: not asked again in this call; the next run logs what is left

    @property
    def run_dir(self) -> Path:
        return self.state.folder

    def setup(self, name: str, verbose: bool) -> dict:
        """The plan every worker reads (the streams it trains on are made from it); the sequence's
        MLflow run opened."""
        cfg, data, scenario = self.cfg, self.prepared.data, self.scenario
        if self.state.tasks:  # what the next task starts from, refused here rather than in the workers
            read_checkpoint(self.state.last.local)
        method = get_method(cfg.method)
        labels = data.column("label")
        class_index = np.full(int(labels.max()) + 1, -1, dtype=np.int64)
        class_index[scenario.class_order] = np.arange(len(scenario.class_order))
        split, val_ids = self.validation_split(data)
        eval_splits = [s for s in ("val", "test") if (split == s).any()]
        spec = {"family": method.family, "joint": method.joint, "modalities": data.modalities,
                "class_order": scenario.class_order,
                "encoders": self.prepared.encoders, "tokens": cfg.encoder_tokens, "model": vars(cfg.model)}
        tasks = [{"index": t.index, "head_size": scenario.head_size_after(t.index),
                  "train": scenario.rows_of(t, so_far=method.joint), "eval": scenario.rows_of(t)}
                 for t in scenario.tasks]
        plan = {"data": {"path": data.path, "val_ids": [str(i) for i in val_ids], "eval_splits": eval_splits,
                         "train_rows": int((split == "train").sum()),
                         "eval_rows": int(np.isin(split, eval_splits).sum()),
                         "row_bytes": row_bytes(data.modalities, data.tokens)},
                "tasks": tasks, "first_task": len(self.state.tasks), "seed": cfg.seed, "spec": spec,
                "train": vars(cfg.train), "loss": vars(cfg.loss), "class_index": class_index.tolist(),
                "verbose": verbose}
        self.state.data["mlflow_run_id"] = self.tracker.start_sequence(cfg, name, self.state.data["mlflow_run_id"])
        self.state.save()
        if line := self.resume_line():
            self.log(line)
        return plan

    def resume_line(self) -> str | None:
        if self.state.tasks:
            return f"Resuming {self.run_dir}: tasks 0-{len(self.state.tasks) - 1} already finished"
        return None

    def validation_split(self, data: MultiModalData) -> tuple[np.ndarray, list]:
        """The split column with the rows held out for validation marked 'val', and their ids."""
        return hold_out_validation(data.column("split"), data.column("label"), data.column("sample_id"),
                                   self.cfg.train.val_fraction,
                                   data.column("group") if "group" in data.table.column_names else None)

    def lineage(self, record: TaskRecord) -> dict:
        """Tags of a task's registered version beyond the chain's own (`mmcl update` adds its drops)."""
        return {}

    def train(self, executor, plan: dict, verbose: bool, on_task_end=None) -> None:
        """The remaining tasks; each recorded, logged and reported (`on_task_end`) as it ends."""
        def finish_task(entry: dict, checkpoint: str, local: Path) -> None:
            record = self.record(entry, checkpoint, local)
            if on_task_end:
                on_task_end(record)
            self.task_header(record.index + 1, entry.get("ended_at"))

        self.to_mlflow(self.log_unlogged_tasks)
        self.task_header(len(self.state.tasks))
        if len(self.state.tasks) < len(self.scenario.tasks):
            executor.train(self.cfg, plan, self.state.last, self.run_dir, verbose, self.log, finish_task)

    def cleanup(self) -> dict:
        """The result, recorded and logged; once everything is in MLflow, the checkpoints go."""
        matrix = [t.row for t in self.state.tasks]
        last = self.state.last
        result = {"benchmark": self.cfg.benchmark if not self.cfg.data else str(self.cfg.data),
                  "scenario": self.cfg.scenario, "method": self.cfg.method, "seed": self.cfg.seed,
                  "num_tasks": len(self.scenario.tasks), "acc_matrix": matrix, **summarize(matrix),
                  "seconds": self.seconds_before + time.time() - self.started,
                  "mlflow_run_id": self.state.data["mlflow_run_id"]}
        if last.val_summary:
            result["val"] = last.val_summary
        if last.modality_acc:
            result["avg_acc_only"] = last.modality_acc  # average accuracy with one modality seen
        self.state.data.update(complete=True, result=result, result_logged=False)
        self.state.save()
        self.state.data["result_logged"] = self.to_mlflow(self.tracker.finish_sequence, result["mlflow_run_id"],
                                                          result, task_labels(self.state.tasks))
        self.state.save()
        if self.cfg.tracking.enabled:
            release_checkpoints(self.state)
        return result

    def record(self, entry: dict, checkpoint: str, local: Path) -> TaskRecord:
        """A task's model is in `local` (and at `checkpoint`, where the next run resumes from): record
        it, log it to MLflow."""
        task, tasks = self.scenario.tasks[entry["index"]], self.state.tasks
        rows = entry["rows"]
        record = TaskRecord(task.index, task.classes, task.domains, checkpoint, str(local), rows["test"],
                            entry["history"], summarize([t.row for t in tasks] + [rows["test"]]),
                            modality_acc=entry.get("modality_acc"))
        if "val" in rows:
            record.val_row = rows["val"]
            record.val_summary = summarize([t.val_row for t in tasks] + [rows["val"]])
        tasks.append(record)
        self.state.data["seconds"] = self.seconds_before + time.time() - self.started
        self.state.save()
        self.log(f"  accuracy on tasks seen so far: {' '.join(f'{a:.3f}' for a in record.row if a is not None)}")
        self.to_mlflow(self.log_unlogged_tasks)
        for t in tasks[:-1]:  # the next task and a resume start from the last; MLflow holds the rest
            if t.logged:
                shutil.rmtree(t.local, ignore_errors=True)
        return record

    def task_header(self, i: int, started_at: float | None = None) -> None:
        """Task i's header and MLflow run; `started_at`: when the workers began it (they go on while
        the driver logs the task before)."""
        if i < len(self.scenario.tasks):
            t = self.scenario.tasks[i]
            self.log(f"Task {i + 1}/{len(self.scenario.tasks)}: "
                     + (f"classes {t.classes}" if t.domains is None else f"domains {t.domains}"))
            self.to_mlflow(self.tracker.start_task, self.state.data["mlflow_run_id"], self.cfg, t,
                           len(self.scenario.tasks), self.prepared.dataset_input(), started_at)

    def to_mlflow(self, call, *args) -> bool:
        """`call(*args)` unless MLflow failed earlier in this call; a failure is told once and kept."""
        if self.offline:
            return False
        try:
            call(*args)
            return True
        except TRACKING_ERRORS as e:
            self.offline.append(e)
            self.log(f"  MLflow at {self.tracker.uri} failed ({str(e).splitlines()[0][:200]}): finished tasks stay "
                     f"in {self.run_dir}, and `mmcl run` with the same arguments logs them")
            return False

    def log_unlogged_tasks(self) -> None:
        """Child run and registered model version for each finished task not yet in MLflow."""
        state, scenario, prepared = self.state, self.scenario, self.prepared
        for t in state.tasks:
            if t.logged:
                continue
            i = t.index
            seen = scenario.class_order[:scenario.head_size_after(i)]
            lineage = {
                "mmcl.classes_seen": ",".join(map(str, seen)),
                "mmcl.domains_seen": ",".join(d for u in state.tasks[:i + 1] for d in (u.domains or [])),
                "mmcl.continued_from_version": state.tasks[i - 1].model_version or "" if i else "",
                "mmcl.data": prepared.source, "mmcl.data_fingerprint": prepared.fingerprint,
                "mmcl.config_hash": self.cfg.fingerprint(), "mmcl.features": prepared.features or "",
                "mmcl.sequence_run_id": state.data["mlflow_run_id"], **self.lineage(t),
            }
            logged = self.tracker.log_task(state.data["mlflow_run_id"], t, len(scenario.tasks), t.local, lineage)
            t.run_id, t.model_version = logged.get("run_id"), logged.get("model_version") or None
            t.logged = True
            state.save()

    def report_finished(self) -> dict:
        """A finished sequence is not trained again: what MLflow still lacks is logged, the result returned."""
        state, tracker = self.state, self.tracker
        run_id, result = state.data["mlflow_run_id"], state.data["result"]
        if not state.data.get("result_logged", True) or not all(t.logged for t in state.tasks):
            tracker.start_sequence(self.cfg, "", run_id)
            self.log_unlogged_tasks()
            tracker.finish_sequence(run_id, result, task_labels(state.tasks))
            state.data["result_logged"] = True
            state.save()
            release_checkpoints(state)
        versions = ", ".join(t.model_version for t in state.tasks if t.model_version)
        self.log(f"Already finished: {state.folder}" + (f" (MLflow run {run_id}, model {tracker.model_name} "
                                                         f"versions {versions})" if run_id else "")
                 + "; --force starts a new sequence")
        return result


def release_checkpoints(state: SequenceState) -> None:
    """A finished sequence with every task in MLflow needs none of its own checkpoints (the logged
    models hold them): the task folders and Ray Train's copies go."""
    if not state.data.get("result_logged") or not all(t.logged for t in state.tasks):
        return
    for t in state.tasks:
        shutil.rmtree(t.local, ignore_errors=True)
        if t.checkpoint != t.local:  # Ray Train's copy, maybe on storage_path
            checkpoint = ray.train.Checkpoint(t.checkpoint)
            try:
                checkpoint.filesystem.delete_dir(checkpoint.path)
            except OSError:  # gone already
                pass
    shutil.rmtree(state.folder / "ray", ignore_errors=True)
