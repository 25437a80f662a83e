"""Walks a task sequence: one Ray Train fit per task, evaluation, MLflow, resume after a crash."""
import json
import logging
import os
import shutil
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import ray.train
from ray.train import UserCallback

from models.methods import get_method
from pipeline.benchmarks import benchmark_path
from pipeline.cache import build_features, encoder_specs
from pipeline.config import RunConfig
from pipeline.data import load_data
from pipeline.evaluate import predict, summarize
from pipeline.scenario import make_scenario
from pipeline.tracking import NoTracker, Tracker, data_fingerprint
from pipeline.worker import load_model, train_func_per_worker, train_task_local

STATE_FILE = "state.json"


class SequenceState:
    """What has finished, written atomically after each task so a crash resumes at the next one."""

    def __init__(self, folder: Path, data: dict):
        self.folder, self.data = folder, data

    @classmethod
    def open(cls, folder: Path, fingerprint: str) -> "SequenceState":
        path = folder / STATE_FILE
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("fingerprint") == fingerprint and not data.get("complete"):
                return cls(folder, data)
            shutil.rmtree(folder)  # a finished or different sequence: start afresh
        folder.mkdir(parents=True, exist_ok=True)
        return cls(folder, {"fingerprint": fingerprint, "complete": False, "mlflow_run_id": None, "tasks": []})

    @property
    def tasks(self) -> list[dict]:
        return self.data["tasks"]

    def save(self) -> None:
        tmp = self.folder / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.folder / STATE_FILE)


def init_ray(cfg: RunConfig, verbose: bool) -> None:
    import ray
    import ray.data

    if ray.is_initialized():
        return
    env = {"RAY_TRAIN_V2_ENABLED": "1", "PYTHONWARNINGS": "ignore" if not verbose else "default"}
    if not cfg.train.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    ray.init(address=cfg.ray_address, runtime_env={"env_vars": env},
             logging_level=logging.INFO if verbose else logging.ERROR, log_to_driver=verbose,
             configure_logging=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose


def _quiet(verbose: bool) -> None:
    if verbose:
        return
    warnings.filterwarnings("ignore")
    for name in ("ray", "ray.train", "ray.data", "ray.tune", "DeepSpeed", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class ProgressCallback(UserCallback):
    """Forwards rank 0's per-epoch report from the Ray Train controller to the driver's queue."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put({k: v for k, v in metrics[0].items() if k != "history"})


def _epoch_line(m: dict) -> str:
    if "loss" not in m:
        return f"  task {m['task'] + 1}/{m['num_tasks']}: head fitted from statistics ({m['seconds']:.1f}s)"
    terms = " ".join(f"{k} {m[k]:.3f}" for k in ("ce", "kd", "rel", "align", "bal") if k in m)
    return (f"  task {m['task'] + 1}/{m['num_tasks']} epoch {m['epoch']}/{m['epochs']} "
            f"loss {m['loss']:.4f} ({terms}) {m['seconds']:.0f}s")


def fit_with_progress(trainer_factory, log):
    """Runs `trainer.fit()` in a daemon thread and prints each epoch's line as it arrives; Ctrl-C
    returns at once (the thread dies with the process, Ray's exit hook stops the workers)."""
    from ray.util.queue import Empty, Queue

    queue, outcome = Queue(actor_options={"num_cpus": 0}), {}

    def fit():
        try:
            outcome["result"] = trainer_factory(ProgressCallback(queue)).fit()
        except BaseException as e:  # re-raised in the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive() or not queue.empty():
            try:
                log(_epoch_line(queue.get(timeout=0.5)))
            except Empty:
                pass
    finally:
        queue.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def task_rows(task, scenario, joint: bool):
    """(column, values) selecting a task's training rows; with `joint`, every task's so far."""
    tasks = scenario.tasks[:task.index + 1] if joint else [task]
    if scenario.kind == "domain-il":
        return "domain", [d for t in tasks for d in t.domains]
    return "label", [c for t in tasks for c in t.classes]


def task_config(cfg: RunConfig, spec: dict, task, scenario, class_index, verbose: bool) -> dict:
    return {"task_index": task.index, "num_tasks": len(scenario.tasks), "seed": cfg.seed, "verbose": verbose,
            "spec": spec, "train": vars(cfg.train), "loss": vars(cfg.loss),
            "head_size": scenario.head_size_after(task.index), "class_index": class_index.tolist()}


def fit_task(cfg: RunConfig, config: dict, rows, data_path: str, init_checkpoint, run_dir: Path, verbose: bool, log,
             held_out_ids: list[str]):
    import ray.data
    from ray.data.expressions import col
    from ray.train.torch import TorchConfig, TorchTrainer

    column, values = rows
    expr = (col("split") == "train") & col(column).is_in(values)
    if held_out_ids:
        expr = expr & col("sample_id").not_in(held_out_ids)
    train = ray.data.read_parquet(data_path).filter(expr=expr).materialize()  # read once, not once per epoch

    trainer_factory = lambda callback: TorchTrainer(  # noqa: E731
        train_func_per_worker,
        train_loop_config={**config, "init_checkpoint": init_checkpoint},
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker=None if cfg.train.use_gpu else {"CPU": cfg.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=f"task-{config['task_index']}", storage_path=cfg.storage_path or str((run_dir / "ray").resolve()),
            callbacks=[callback], logging_config=ray.train.LoggingConfig("INFO" if verbose else "ERROR")),
        datasets={"train": train},
    )
    result = fit_with_progress(trainer_factory, log)
    return result.checkpoint, result.metrics["history"]


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


def accuracy_row(model, columns: dict, rows_per_task: list, upto: int, targets: np.ndarray, modalities,
                 only: str | None = None) -> list:
    """Accuracy on each task 0..upto's rows, with every seen class competing; None for later tasks."""
    row = [None] * len(rows_per_task)
    for j in range(upto + 1):
        rows = rows_per_task[j]
        pred = predict(model, {k: v[rows] for k, v in columns.items()}, modalities, only=only)
        row[j] = float((pred == targets[rows]).mean())
    return row


def prepare_data(cfg: RunConfig, log=print, verbose: bool = False):
    """The data the model reads: the file itself, or its features from the cache (encoded first if
    needed). Returns (data, raw path, raw fingerprint, path read, encoder specs)."""
    raw_path = str(cfg.data or benchmark_path(cfg.benchmark, Path(cfg.output_dir) / "data"))
    data = load_data(raw_path)
    fingerprint = data_fingerprint(raw_path)
    if not data.needs_encoding:
        return data, raw_path, fingerprint, raw_path, {}
    init_ray(cfg, verbose)  # frozen encoders run once per (encoders, data): training reads the cache
    features = str(build_features(data, fingerprint, cfg.encoders, cfg.encoder_tokens, cfg.cache_dir(),
                                  cfg.cache.actors, cfg.cache.batch_size, log))
    return load_data(features), raw_path, fingerprint, features, encoder_specs(data, cfg.encoders)


def run_sequence(cfg: RunConfig, verbose: bool = False, log=print, on_task_end=None) -> dict:
    """Runs (or resumes) the whole sequence and returns the output-contract dict.

    `on_task_end(task_entry)` is called after each task trained in this call (a sweep reports there).
    """
    _quiet(verbose)
    started = time.time()
    data, raw_path, fingerprint, data_path, encoders = prepare_data(cfg, log, verbose)
    labels, domains, split = data.column("label"), data.column("domain").astype(str), data.column("split")
    scenario = make_scenario(cfg.scenario, labels, domains, cfg.num_tasks, cfg.seed)
    class_index = np.full(int(labels.max()) + 1, -1, dtype=np.int64)
    class_index[scenario.class_order] = np.arange(len(scenario.class_order))
    name = f"{Path(raw_path).stem}-{cfg.scenario}-{cfg.method}-seed{cfg.seed}"
    run_dir = Path(cfg.output_dir) / f"{name}-{cfg.fingerprint()}"
    state = SequenceState.open(run_dir, cfg.fingerprint())
    method = get_method(cfg.method)
    spec = {"family": method.family, "modalities": data.modalities, "class_order": scenario.class_order,
            "encoders": encoders, "tokens": cfg.encoder_tokens, "model": vars(cfg.model)}
    split, held_out_ids = hold_out_validation(split, labels, data.column("sample_id"), cfg.train.val_fraction,
                                              data.column("group") if "group" in data.table.column_names else None)
    eval_cols = {c: data.column(c) for c in ["label", *data.modalities]}
    eval_rows = {s: [np.flatnonzero((split == s) & scenario.task_mask(t, labels, domains)) for t in scenario.tasks]
                 for s in ("val", "test") if (split == s).any()}

    tracker = Tracker(cfg) if cfg.tracking.enabled else NoTracker()
    resumed = bool(state.tasks)
    seconds_before = state.data.get("seconds", 0.0)
    state.data["mlflow_run_id"] = tracker.start_sequence(cfg, name, state.data["mlflow_run_id"])
    state.save()
    if resumed:
        log(f"Resuming {run_dir}: tasks 0-{len(state.tasks) - 1} already finished")
    try:
        _log_unlogged_tasks(tracker, state, scenario, cfg, raw_path, fingerprint, data_path)
        if cfg.executor == "ray":
            init_ray(cfg, verbose)
        for task in scenario.tasks[len(state.tasks):]:
            log(f"Task {task.index + 1}/{len(scenario.tasks)}: "
                + (f"classes {task.classes}" if scenario.kind == "class-il" else f"domains {task.domains}"))
            config = task_config(cfg, spec, task, scenario, class_index, verbose)
            rows = task_rows(task, scenario, method.joint)
            local = run_dir / f"task-{task.index}"
            if cfg.executor == "local":
                mask = (split == "train") & np.isin(data.column(rows[0]), rows[1])
                history = train_task_local(config, data.table.filter(mask), state.tasks[-1]["local"] if state.tasks
                                           else None, local, lambda m: log(_epoch_line(m)))
                checkpoint_path = str(local)
            else:
                prev = state.tasks[-1]["checkpoint"] if state.tasks else None
                checkpoint, history = fit_task(cfg, config, rows, data_path, ray.train.Checkpoint(prev) if prev else None,
                                               run_dir, verbose, log, held_out_ids)
                checkpoint.to_directory(str(local))
                checkpoint_path = checkpoint.path
            model, _ = load_model(local)
            rows = {s: accuracy_row(model, eval_cols, r, task.index, class_index[labels], data.modalities)
                    for s, r in eval_rows.items()}
            row, val_row = rows["test"], rows.get("val")
            matrix = [t["row"] for t in state.tasks] + [row]
            entry = {"index": task.index, "classes": task.classes, "domains": task.domains,
                     "checkpoint": checkpoint_path, "local": str(local), "row": row,
                     "history": history, "summary": summarize(matrix), "logged": False}
            if val_row is not None:
                entry["val_row"] = val_row
                entry["val_summary"] = summarize([t["val_row"] for t in state.tasks] + [val_row])
            if len(data.modalities) > 1 and task.index == len(scenario.tasks) - 1:
                entry["modality_acc"] = {m: float(np.mean(accuracy_row(model, eval_cols, eval_rows["test"], task.index,
                                                                       class_index[labels], data.modalities, only=m)))
                                         for m in data.modalities}
            state.tasks.append(entry)
            state.data["seconds"] = seconds_before + time.time() - started
            state.save()
            log(f"  accuracy on tasks seen so far: {' '.join(f'{a:.3f}' for a in row if a is not None)}")
            _log_unlogged_tasks(tracker, state, scenario, cfg, raw_path, fingerprint, data_path)
            for t in state.tasks[:-1]:  # the next task and a resume start from the last; MLflow holds the rest
                if t["logged"]:
                    shutil.rmtree(t["local"], ignore_errors=True)
            if on_task_end:
                on_task_end(entry)
    except BaseException:
        tracker.fail_sequence(state.data["mlflow_run_id"])
        raise
    matrix = [t["row"] for t in state.tasks]
    seconds = seconds_before + time.time() - started
    result = {"benchmark": cfg.benchmark if not cfg.data else str(cfg.data), "scenario": cfg.scenario,
              "method": cfg.method, "seed": cfg.seed, "num_tasks": len(scenario.tasks), "acc_matrix": matrix,
              **summarize(matrix), "seconds": seconds, "mlflow_run_id": state.data["mlflow_run_id"]}
    if "val_summary" in state.tasks[-1]:
        result["val"] = state.tasks[-1]["val_summary"]
    if "modality_acc" in state.tasks[-1]:
        result["avg_acc_only"] = state.tasks[-1]["modality_acc"]  # average accuracy with one modality seen
    tracker.finish_sequence(state.data["mlflow_run_id"], result)
    state.data["complete"] = True
    state.save()
    return result


def _log_unlogged_tasks(tracker, state, scenario, cfg, data_path, fingerprint, features_path) -> None:
    """Child run and registered model version for each finished task not yet in MLflow."""
    for t in state.tasks:
        if t["logged"]:
            continue
        i = t["index"]
        seen = scenario.class_order[:scenario.head_size_after(i)]
        lineage = {
            "mmcl.classes_seen": ",".join(map(str, seen)),
            "mmcl.domains_seen": ",".join(d for u in state.tasks[:i + 1] for d in (u["domains"] or [])),
            "mmcl.continued_from_version": state.tasks[i - 1]["model_version"] if i else "",
            "mmcl.data": data_path, "mmcl.data_fingerprint": fingerprint, "mmcl.config_hash": cfg.fingerprint(),
            "mmcl.features": features_path if features_path != data_path else "",
            "mmcl.sequence_run_id": state.data["mlflow_run_id"],
        }
        t.update(tracker.log_task(state.data["mlflow_run_id"], t, len(scenario.tasks), t["local"], lineage))
        t["logged"] = True
        state.save()
