"""Walks a task sequence: one Ray Train fit over its tasks, MLflow as each task ends, resume after a crash."""
import json
import logging
import os
import shutil
import socket
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray.train
from ray.train import UserCallback

from models.methods import get_method
from pipeline.benchmarks import benchmark_path
from pipeline.cache import build_features, encoder_specs
from pipeline.config import ConfigError, RunConfig
from pipeline.data import load_data
from pipeline.evaluate import summarize
from pipeline.lock import RunLock
from pipeline.scenario import default_tasks, make_scenario
from pipeline.tracking import (TRACKING_ERRORS, NoTracker, Tracker, check_tracking_server, data_fingerprint,
                               task_labels, tracking_uri)
from pipeline.worker import learn_sequence_local, save_model, train_func_per_worker

STATE_FILE = "state.json"
CONTROLLER_POLL_S = 0.1


class SequenceState:
    """What has finished, written atomically after each task so a crash resumes at the next one."""

    def __init__(self, folder: Path, data: dict):
        self.folder, self.data = folder, data

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
    def tasks(self) -> list[dict]:
        return self.data["tasks"]

    def save(self) -> None:
        tmp = self.folder / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.folder / STATE_FILE)


def check_ray_address(address: str | None, timeout_s: float = 5) -> None:
    """A Ray that does not answer fails in seconds, not after Ray's own retries (minutes)."""
    from ray._private.services import get_ray_address_from_environment

    if address == "local":
        return
    env = os.environ.get("RAY_ADDRESS")
    source = "RAY_ADDRESS" if env else "--address (ray_address)" if address not in (None, "auto") else \
        "the last `ray start` on this machine (ray_current_cluster in Ray's temp folder)"
    try:
        found = get_ray_address_from_environment(address, None)
    except ConnectionError:  # "auto" with no cluster: ray.init says so
        return
    if found is None:
        return  # a local Ray is started
    host, _, port = found.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise ConfigError(f"Ray at {found} (from {source}) does not answer ({e.strerror or e}); start that cluster, "
                          "or pass --address local for a Ray of this process's own") from None


def init_ray(cfg: RunConfig, verbose: bool) -> None:
    import ray
    import ray.data

    # Ray's tqdm replaces builtins.print in the driver once a Ray Data bar reaches it; a print
    # that is not builtins.print no longer pickles (Tune pickles a sweep's callbacks).
    os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")
    if ray.is_initialized():
        return
    check_ray_address(cfg.ray_address)
    env = {"RAY_TRAIN_V2_ENABLED": "1", "PYTHONWARNINGS": "ignore" if not verbose else "default"}
    if not cfg.train.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    ray.init(address=cfg.ray_address, runtime_env={"env_vars": env},
             logging_level=logging.INFO if verbose else logging.ERROR, log_to_driver=verbose,
             configure_logging=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose


WORKER_MEMORY = 2 << 30  # a worker's peak resident memory, 10 cmoe tasks on mfeat (BENCHMARKS.md, "Growth")
MAX_DEFAULT_WORKERS = 8  # 256 rows a step at the default batch; past that set num_workers and lr by hand


def worker_resources(cfg: RunConfig) -> tuple[int | tuple[int, int], float, str]:
    """(workers, CPUs per worker, placement strategy). Unset (0): on GPUs one worker per GPU; on CPUs
    one worker of one CPU per CPU, as many as each node's memory holds, at most MAX_DEFAULT_WORKERS:
    two torch threads are slower than one on this small adapter, so processes scale where threads
    do not (BENCHMARKS.md, "The distributed path"). On several nodes the group is elastic, from one
    worker to that many: a lost node leaves the sequence going on the others from the latest
    checkpoint, and a node that joins is taken up at Ray Train's next resize check."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    if cfg.train.use_gpu:
        gpus = int(sum(n.get("GPU", 0) for n in nodes))
        return cfg.train.num_workers or max(1, gpus), cfg.train.cpus_per_worker or 1, "PACK"
    cpus = cfg.train.cpus_per_worker or 1
    if cfg.train.num_workers:
        return cfg.train.num_workers, cpus, "PACK"
    fits = sum(max(1, min(int(n["CPU"] // cpus), int(n.get("memory", WORKER_MEMORY) // WORKER_MEMORY)))
               for n in nodes)
    workers = min(fits, MAX_DEFAULT_WORKERS)
    return ((1, workers) if len(nodes) > 1 else workers), cpus, "SPREAD" if len(nodes) > 1 else "PACK"


def check_storage(cfg: RunConfig) -> None:
    """Ray Train workers write their checkpoints to `storage_path`: on machines that share no disk it
    must be a URI or a mount every node sees."""
    import ray

    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    if len(hosts) > 1 and not cfg.storage_path:
        raise ConfigError(f"storage_path: the Ray cluster spans {len(hosts)} machines; set storage_path to "
                          "storage every node sees (s3://..., gs://..., or a shared mount)")


def _quiet(verbose: bool) -> None:
    if verbose:
        return
    warnings.filterwarnings("ignore")
    for name in ("ray", "ray.train", "ray.data", "ray.tune", "DeepSpeed", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class ForwardReports(UserCallback):
    """Forwards rank 0's reports and their persisted checkpoints from the Ray Train controller to
    the driver's queue."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put({"metrics": metrics[0], "checkpoint": checkpoint})


def _epoch_line(m: dict) -> str:
    if "loss" not in m:
        return f"  task {m['task'] + 1}/{m['num_tasks']}: head fitted from statistics ({m['seconds']:.1f}s)"
    terms = " ".join(f"{k} {m[k]:.3f}" for k in ("ce", "kd", "rel", "align", "bal") if k in m)
    return (f"  task {m['task'] + 1}/{m['num_tasks']} epoch {m['epoch']}/{m['epochs']} "
            f"loss {m['loss']:.4f} ({terms}) {m['seconds']:.0f}s")


def fit_sequence(cfg: RunConfig, config: dict, table, name: str, storage: str, verbose: bool, on_report):
    """One Ray Train fit over the remaining tasks: `trainer.fit()` runs in a daemon thread while this
    thread hands every report to `on_report(metrics, checkpoint)`; Ctrl-C returns at once (the thread
    dies with the process, Ray's exit hook stops the workers)."""
    import ray.data
    from ray.train import DataConfig, FailureConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # The controller takes one report per poll and a worker's next report waits for it: at Ray's 2 s
    # default an epoch shorter than that would wait (BENCHMARKS.md, "Fixed costs").
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(CONTROLLER_POLL_S))
    workers, cpus, placement = worker_resources(cfg)
    precision = cfg.train.precision if cfg.train.precision != "auto" else "bf16" if cfg.train.use_gpu else "fp32"
    config = {**config, "train": {**config["train"], "cpus_per_worker": cpus, "precision": precision}}
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue, outcome = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here}), {}  # beside the controller
    trainer = TorchTrainer(
        train_func_per_worker, train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=cfg.train.use_gpu, resources_per_worker={"CPU": cpus},
            placement_strategy=placement),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage, callbacks=[ForwardReports(queue)],
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            logging_config=ray.train.LoggingConfig("INFO" if verbose else "ERROR")),
        datasets={"rows": ray.data.from_arrow(table)},
        dataset_config=DataConfig(datasets_to_split=[]),  # every worker holds the rows; see pipeline/worker.py
    )

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive() or not queue.empty():
            try:
                report = queue.get(timeout=0.2)
            except Empty:
                continue
            on_report(report["metrics"], report["checkpoint"])
    finally:
        queue.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def task_rows(task, scenario, joint: bool):
    """(column, values) selecting a task's rows; with `joint`, every task's so far."""
    tasks = scenario.tasks[:task.index + 1] if joint else [task]
    if scenario.kind == "domain-il":
        return "domain", [d for t in tasks for d in t.domains]
    return "label", [c for t in tasks for c in t.classes]


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


def prepare_data(cfg: RunConfig, log=print, verbose: bool = False):
    """The data the model reads: the file itself, or its features from the cache (encoded first if
    needed), once `num_tasks` is set and checked against it. Returns (data, raw path, raw fingerprint,
    path read, encoder specs)."""
    raw_path = str(cfg.data or benchmark_path(cfg.benchmark, Path(cfg.output_dir) / "data"))
    data = load_data(raw_path)
    check_tasks(cfg, data)
    fingerprint = data_fingerprint(raw_path)
    if not data.needs_encoding:
        return data, raw_path, fingerprint, raw_path, {}
    init_ray(cfg, verbose)  # frozen encoders run once per (encoders, data): training reads the cache
    features = str(build_features(data, fingerprint, cfg.encoders, cfg.encoder_tokens, cfg.cache_dir(),
                                  cfg.cache.actors, cfg.cache.batch_size, log))
    return load_data(features), raw_path, fingerprint, features, encoder_specs(data, cfg.encoders)


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

    `on_task_end(task_entry)` is called after each task trained in this call (a sweep reports there).
    """
    _quiet(verbose)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "4")  # a server gone costs 30 s a call, not 4 min
    started = time.time()
    if cfg.tracking.enabled:
        check_tracking_server(tracking_uri(cfg))
    data, raw_path, fingerprint, data_path, encoders = prepare_data(cfg, log, verbose)
    if cfg.executor == "ray":
        init_ray(cfg, verbose)
        check_storage(cfg)
    labels, domains, split = data.column("label"), data.column("domain").astype(str), data.column("split")
    scenario = make_scenario(cfg.scenario, labels, domains, cfg.num_tasks, cfg.seed)
    class_index = np.full(int(labels.max()) + 1, -1, dtype=np.int64)
    class_index[scenario.class_order] = np.arange(len(scenario.class_order))
    name = f"{Path(raw_path).stem}-{cfg.scenario}-{cfg.method}-seed{cfg.seed}"
    run_dir = Path(cfg.output_dir) / f"{name}-{cfg.fingerprint()}"
    with RunLock(run_dir) as lock:
        if lock.taken_over:
            log(f"Taking over {run_dir} from {lock.taken_over}, which is no longer running")
        state = SequenceState.open(run_dir, cfg.fingerprint(), fresh)
        tracker = Tracker(cfg) if cfg.tracking.enabled else NoTracker()
        if state.data["complete"]:
            return report_finished(cfg, state, scenario, tracker, raw_path, fingerprint, data_path, log)
        method = get_method(cfg.method)
        spec = {"family": method.family, "modalities": data.modalities, "class_order": scenario.class_order,
                "encoders": encoders, "tokens": cfg.encoder_tokens, "model": vars(cfg.model)}
        split, _ = hold_out_validation(split, labels, data.column("sample_id"), cfg.train.val_fraction,
                                       data.column("group") if "group" in data.table.column_names else None)
        table = data.table.select(["label", "domain", *data.modalities]).append_column("split", pa.array(split))
        tasks = [{"index": t.index, "head_size": scenario.head_size_after(t.index),
                  "train": task_rows(t, scenario, method.joint), "eval": task_rows(t, scenario, False)}
                 for t in scenario.tasks]
        config = {"tasks": tasks, "first_task": len(state.tasks), "seed": cfg.seed, "spec": spec,
                  "train": vars(cfg.train), "loss": vars(cfg.loss), "class_index": class_index.tolist(),
                  "verbose": verbose}

        resumed = bool(state.tasks)
        seconds_before = state.data.get("seconds", 0.0)
        state.data["mlflow_run_id"] = tracker.start_sequence(cfg, name, state.data["mlflow_run_id"])
        state.save()
        if resumed:
            log(f"Resuming {run_dir}: tasks 0-{len(state.tasks) - 1} already finished")
        offline = []  # the first MLflow error: not asked again in this call; the next run logs what is left

        def to_mlflow(call, *args) -> bool:
            if offline:
                return False
            try:
                call(*args)
                return True
            except TRACKING_ERRORS as e:
                offline.append(e)
                log(f"  MLflow at {tracker.uri} failed ({str(e).splitlines()[0][:200]}): finished tasks stay in "
                    f"{run_dir}, and `mmcl run` with the same arguments logs them")
                return False

        dataset = {"name": Path(raw_path).stem, "path": raw_path, "fingerprint": fingerprint,
                   "features": data_path if data_path != raw_path else None}

        def task_header(i: int) -> None:
            if i < len(scenario.tasks):
                t = scenario.tasks[i]
                log(f"Task {i + 1}/{len(scenario.tasks)}: "
                    + (f"classes {t.classes}" if scenario.kind == "class-il" else f"domains {t.domains}"))
                to_mlflow(tracker.start_task, state.data["mlflow_run_id"], cfg, t, len(scenario.tasks), dataset)

        def finish_task(entry: dict, checkpoint_path: str, local: Path) -> None:
            """A task's model is in `local` (and at `checkpoint_path`, where the next run resumes from):
            record it, log it to MLflow, tell the caller."""
            task = scenario.tasks[entry["index"]]
            matrix = [t["row"] for t in state.tasks] + [entry["rows"]["test"]]
            done = {"index": task.index, "classes": task.classes, "domains": task.domains,
                    "checkpoint": checkpoint_path, "local": str(local), "row": entry["rows"]["test"],
                    "history": entry["history"], "summary": summarize(matrix), "logged": False}
            if "val" in entry["rows"]:
                done["val_row"] = entry["rows"]["val"]
                done["val_summary"] = summarize([t["val_row"] for t in state.tasks] + [done["val_row"]])
            if "modality_acc" in entry:
                done["modality_acc"] = entry["modality_acc"]
            state.tasks.append(done)
            state.data["seconds"] = seconds_before + time.time() - started
            state.save()
            log(f"  accuracy on tasks seen so far: {' '.join(f'{a:.3f}' for a in done['row'] if a is not None)}")
            to_mlflow(_log_unlogged_tasks, tracker, state, scenario, cfg, raw_path, fingerprint, data_path)
            for t in state.tasks[:-1]:  # the next task and a resume start from the last; MLflow holds the rest
                if t["logged"]:
                    shutil.rmtree(t["local"], ignore_errors=True)
            if on_task_end:
                on_task_end(done)
            task_header(task.index + 1)

        try:
            to_mlflow(_log_unlogged_tasks, tracker, state, scenario, cfg, raw_path, fingerprint, data_path)
            task_header(len(state.tasks))
            if len(state.tasks) < len(scenario.tasks):
                if cfg.executor == "local":
                    run_local(config, table, state, run_dir, log, finish_task)
                else:
                    run_on_ray(cfg, config, table, state, run_dir, verbose, log, finish_task)
        except BaseException:
            to_mlflow(tracker.fail_sequence, state.data["mlflow_run_id"])
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
        state.data.update(complete=True, result=result, result_logged=False)
        state.save()
        state.data["result_logged"] = to_mlflow(tracker.finish_sequence, state.data["mlflow_run_id"], result,
                                                task_labels(state.tasks))
        state.save()
        if cfg.tracking.enabled:
            release_checkpoints(state, run_dir)
        return result


def release_checkpoints(state: SequenceState, run_dir: Path) -> None:
    """A finished sequence with every task in MLflow needs none of its own checkpoints (the logged
    models hold them): the task folders and Ray Train's copies go."""
    if not state.data.get("result_logged") or not all(t["logged"] for t in state.tasks):
        return
    for t in state.tasks:
        shutil.rmtree(t["local"], ignore_errors=True)
        if t["checkpoint"] != t["local"]:  # Ray Train's copy, maybe on storage_path
            checkpoint = ray.train.Checkpoint(t["checkpoint"])
            try:
                checkpoint.filesystem.delete_dir(checkpoint.path)
            except OSError:  # gone already
                pass
    shutil.rmtree(run_dir / "ray", ignore_errors=True)


def report_finished(cfg: RunConfig, state: SequenceState, scenario, tracker, raw_path, fingerprint, data_path,
                    log) -> dict:
    """A finished sequence is not trained again: what MLflow still lacks is logged, the result returned."""
    run_id, result = state.data["mlflow_run_id"], state.data["result"]
    if not state.data.get("result_logged", True) or not all(t["logged"] for t in state.tasks):
        tracker.start_sequence(cfg, "", run_id)
        _log_unlogged_tasks(tracker, state, scenario, cfg, raw_path, fingerprint, data_path)
        tracker.finish_sequence(run_id, result, task_labels(state.tasks))
        state.data["result_logged"] = True
        state.save()
        release_checkpoints(state, state.folder)
    versions = ", ".join(str(t.get("model_version")) for t in state.tasks if t.get("model_version"))
    log(f"Already finished: {state.folder}" + (f" (MLflow run {run_id}, model {tracker.model_name} versions "
                                                f"{versions})" if run_id else "")
        + "; --force starts a new sequence")
    return result


def run_local(config: dict, table, state: SequenceState, run_dir: Path, log, finish_task) -> None:
    """The remaining tasks in this process (`executor=local`)."""
    def on_task_end(model, entry):
        local = run_dir / f"task-{entry['index']}"
        local.mkdir(parents=True, exist_ok=True)
        save_model(model, config["spec"], local)
        log(_epoch_line({**entry["history"][-1], **progress, "task": entry["index"]}))
        finish_task(entry, str(local), local)

    progress = {"num_tasks": len(config["tasks"]), "epochs": config["train"]["epochs"]}
    init = state.tasks[-1]["local"] if state.tasks else None
    learn_sequence_local(config, table, init, lambda t, m: log(_epoch_line({**m, **progress, "task": t})), on_task_end)


def run_on_ray(cfg: RunConfig, config: dict, table, state: SequenceState, run_dir: Path, verbose: bool, log,
               finish_task) -> None:
    """The remaining tasks in one Ray Train fit. Storage keeps the newest task's checkpoint and the
    current task's epoch checkpoints; older ones are deleted once their task is logged."""
    prev = state.tasks[-1]["checkpoint"] if state.tasks else None
    config = {**config, "init_checkpoint": ray.train.Checkpoint(prev) if prev else None}
    storage = cfg.storage_path or str((run_dir / "ray").resolve())
    stale = []

    def on_report(metrics: dict, checkpoint) -> None:
        if metrics["kind"] == "epoch":
            log(_epoch_line(metrics))
            stale.append(checkpoint)
            return
        entry = metrics["entry"]
        log(_epoch_line(metrics))
        local = run_dir / f"task-{entry['index']}"
        checkpoint.to_directory(str(local))
        finish_task(entry, checkpoint.path, local)
        for c in stale:
            c.filesystem.delete_dir(c.path)
        stale[:] = [checkpoint]

    fit_sequence(cfg, config, table, f"{run_dir.name}-from-task-{config['first_task']}-{int(time.time())}", storage,
                 verbose, on_report)


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
