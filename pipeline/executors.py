"""Where a sequence's tasks train: `ray` (one Ray Train fit, DeepSpeed over the adapter) or
`local` (the same loop in the driver's process, a debugging aid). One interface for the driver,
`mmcl bench` and `mmcl sweep`: start the runtime, train the remaining tasks, run many sequences."""
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import ray.train
from ray.train import UserCallback

from pipeline import storage
from pipeline.checkpoint import save_model
from pipeline.config import RunConfig
from pipeline.runtime import check_storage, init_ray, torch_config, worker_resources
from pipeline.state import TaskRecord
from pipeline.streams import ROWS, StreamSplits, held, sequence_streams
from pipeline.worker import learn_sequence_local, train_func_per_worker

CONTROLLER_POLL_S = 0.1


def epoch_line(m: dict) -> str:
    if "loss" not in m:
        return f"  task {m['task'] + 1}/{m['num_tasks']}: head fitted from statistics ({m['seconds']:.1f}s)"
    terms = " ".join(f"{k} {m[k]:.3f}" for k in ("ce", "kd", "rel", "align", "bal") if k in m)
    return (f"  task {m['task'] + 1}/{m['num_tasks']} epoch {m['epoch']}/{m['epochs']} "
            f"loss {m['loss']:.4f} ({terms}) {m['seconds']:.0f}s")


class LocalExecutor:
    """The remaining tasks in this process, with a torch AdamW in place of DeepSpeed. It starts Ray
    only where it must: to encode the data (driver.py), to stream it (streamed passes are Ray Data
    jobs), and to run many sequences."""

    def start(self, cfg: RunConfig, verbose: bool) -> None:
        pass

    def train(self, cfg: RunConfig, plan: dict, last: TaskRecord | None, run_dir: Path, verbose: bool, log,
              finish_task) -> None:
        """The tasks after `last` (None: from the start); `finish_task(entry, checkpoint, local)` after each."""
        progress = {"num_tasks": len(plan["tasks"]), "epochs": plan["train"]["epochs"]}

        def on_task_end(model, entry):
            local = run_dir / f"task-{entry['index']}"
            local.mkdir(parents=True, exist_ok=True)
            save_model(model, plan["spec"], local)
            log(epoch_line({**entry["history"][-1], **progress, "task": entry["index"]}))
            finish_task(entry, str(local), local)

        on_epoch = lambda t, m: log(epoch_line({**m, **progress, "task": t}))  # noqa: E731
        if not held(plan):
            init_ray(cfg, verbose)
        learn_sequence_local(plan, sequence_streams(plan), last.local if last else None, on_epoch, on_task_end)

    def run_many(self, configs: list[RunConfig], run_one, on_done) -> None:
        """Each sequence a Ray task of one CPU (its own process), as many at once as there are CPUs."""
        init_ray(configs[0], verbose=False)
        remote = ray.remote(num_cpus=1)(_one_thread(run_one))
        pending = {remote.remote(cfg): cfg for cfg in configs}
        while pending:
            done, _ = ray.wait(list(pending))
            on_done(pending.pop(done[0]), ray.get(done[0]))

    def trial_resources(self, cfg: RunConfig, cpus: float) -> tuple[dict, int]:
        """(a Tune trial's resources, trials at once): the trial trains in its own process on one CPU."""
        return {"CPU": 1}, max(1, int(cpus))


def _one_thread(run_one):
    def run(cfg):
        import torch
        torch.set_num_threads(1)
        return run_one(cfg)
    return run


class RayExecutor:
    """The remaining tasks in one Ray Train fit: the worker group and its data live for the whole
    sequence; storage keeps the newest task's checkpoint and the current task's epoch checkpoints."""

    def start(self, cfg: RunConfig, verbose: bool) -> None:
        init_ray(cfg, verbose)
        check_storage(cfg)

    def train(self, cfg: RunConfig, plan: dict, last: TaskRecord | None, run_dir: Path, verbose: bool, log,
              finish_task) -> None:
        plan = {**plan, "init_checkpoint": ray.train.Checkpoint(last.checkpoint) if last else None}
        storage_path = cfg.storage_path or str((run_dir / "ray").resolve())
        stale = []

        def on_report(metrics: dict, checkpoint) -> None:
            log(epoch_line(metrics))
            if metrics["kind"] == "epoch":
                stale.append(checkpoint)
                return
            entry = metrics["entry"]
            local = run_dir / f"task-{entry['index']}"
            checkpoint.to_directory(str(local))
            finish_task(entry, storage.uri(checkpoint.filesystem, checkpoint.path), local)
            for c in stale:  # the task's epoch checkpoints and the previous task's
                c.filesystem.delete_dir(c.path)
            stale[:] = [checkpoint]

        name = f"{run_dir.name}-from-task-{plan['first_task']}-{int(time.time())}"
        fit_sequence(cfg, plan, name, storage_path, verbose, on_report)

    def run_many(self, configs: list[RunConfig], run_one, on_done) -> None:
        """Each sequence driven by a thread of this process, its workers holding their own CPUs: as many
        at once as the cluster's CPUs hold."""
        init_ray(configs[0], verbose=False)
        at_once = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_sequence(configs[0])))
        with ThreadPoolExecutor(at_once) as pool:
            futures = {pool.submit(run_one, cfg): cfg for cfg in configs}
            for future in as_completed(futures):
                on_done(futures[future], future.result())

    def trial_resources(self, cfg: RunConfig, cpus: float) -> tuple[dict, int]:
        """The trial only drives its fit (Tune refuses 0 CPUs); the workers reserve their own, and one
        CPU is left for the trials' own small reservations."""
        return {"CPU": 0.01}, max(1, int((cpus - 1) // cpus_per_sequence(cfg)))


def cpus_per_sequence(cfg: RunConfig) -> float:
    return cfg.train.num_workers * (1 if cfg.train.use_gpu else cfg.train.cpus_per_worker)


def one_cpu_each(cfg: RunConfig) -> None:
    """Many sequences side by side: unless set, each gets one Ray Train worker of one CPU."""
    cfg.train.num_workers = cfg.train.num_workers or 1
    cfg.train.cpus_per_worker = cfg.train.cpus_per_worker or 1


EXECUTORS = {"ray": RayExecutor(), "local": LocalExecutor()}


class ForwardReports(UserCallback):
    """Forwards rank 0's reports and their persisted checkpoints from the Ray Train controller to
    the driver's queue."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put({"metrics": metrics[0], "checkpoint": checkpoint})


def fit_sequence(cfg: RunConfig, plan: dict, name: str, storage: str, verbose: bool, on_report):
    """One Ray Train fit over the remaining tasks: `trainer.fit()` runs in a daemon thread while this
    thread hands every report to `on_report(metrics, checkpoint)`; Ctrl-C returns at once (the thread
    dies with the process, Ray's exit hook stops the workers)."""
    from ray.train import FailureConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # The controller takes one report per poll and a worker's next report waits for it: at Ray's 2 s
    # default an epoch shorter than that would wait (BENCHMARKS.md, "Fixed costs").
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(CONTROLLER_POLL_S))
    workers, cpus, placement = worker_resources(cfg)
    precision = cfg.train.precision if cfg.train.precision != "auto" else "bf16" if cfg.train.use_gpu else "fp32"
    plan = {**plan, "train": {**plan["train"], "cpus_per_worker": cpus, "precision": precision}}
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue, outcome = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here}), {}  # beside the controller
    streams = sequence_streams(plan)
    trainer = TorchTrainer(
        train_func_per_worker, train_loop_config=plan,
        torch_config=torch_config("nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=cfg.train.use_gpu, resources_per_worker={"CPU": cpus},
            placement_strategy=placement),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage, callbacks=[ForwardReports(queue)],
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            logging_config=ray.train.LoggingConfig("INFO" if verbose else "ERROR")),
        datasets={name: s.dataset for name, s in streams.items()}, dataset_config=StreamSplits(streams.get(ROWS)),
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
