"""The task sequence on one worker: `train_func_per_worker` on Ray Train workers (DeepSpeed over the
adapter), or `learn_sequence_local` in this process; both run the same `learn_sequence` loop.

Every worker holds the feature table (frozen features, not media) and draws its share of each
epoch's rows the way PyTorch's DistributedSampler does: one permutation per (seed, task, epoch),
rank r taking every world-th row. Runs are therefore reproducible, restartable at any epoch, and
with one worker identical to the in-process loop.
"""
import copy
import json
import logging
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
import torch.nn as nn

from models.losses import LossWeights
from models.methods import ContinualModel
from pipeline.checkpoint import build_model, load_model, save_model
from pipeline.data import batch_to_arrays

GRADIENT_CLIP = 1.0  # max gradient norm, both executors
EVAL_BATCH = 512
DEEPSPEED_TAG = "epoch"  # the engine's folder inside an epoch checkpoint


class Rows:
    """A table's rows as dense tensors (features per modality, present mask, head targets) plus the
    columns that select tasks and splits."""

    def __init__(self, table: pa.Table, modalities: dict[str, int], class_index: np.ndarray):
        columns = {"label": table["label"].to_numpy()}
        for m in modalities:
            col = table[m].combine_chunks()
            if pa.types.is_fixed_size_list(col.type) and col.null_count == 0:  # fast path: one reshape
                columns[m] = col.flatten().to_numpy().reshape(len(col), -1)
            else:
                columns[m] = col.to_numpy(zero_copy_only=False)
        feats, present, labels = batch_to_arrays(columns, modalities)
        self.features = {m: torch.from_numpy(x) for m, x in feats.items()}
        self.present = torch.from_numpy(present)
        self.targets = torch.from_numpy(class_index[labels])
        self.select = {c: table[c].to_numpy(zero_copy_only=False).astype(str if c != "label" else np.int64)
                       for c in ("label", "domain", "split")}

    def where(self, split: str, column: str, values: list) -> np.ndarray:
        return np.flatnonzero((self.select["split"] == split) & np.isin(self.select[column], values))

    def take(self, index: np.ndarray, device="cpu"):
        i = torch.from_numpy(index)
        return ({m: x[i].to(device) for m, x in self.features.items()}, self.present[i].to(device),
                self.targets[i].to(device))


def epoch_rows(rows: np.ndarray, seed: int, task: int, epoch: int | None, rank: int, world: int) -> np.ndarray:
    """This rank's rows of an epoch. `epoch=None`: an unshuffled pass over every row once
    (statistics); otherwise a seeded permutation padded by wrapping to a multiple of the world size,
    so that every rank takes the same number of steps."""
    if epoch is None:
        return rows[rank::world]
    order = rows[np.random.default_rng([seed, task, epoch]).permutation(len(rows))]
    return np.resize(order, -(-len(order) // world) * world)[rank::world]


def batches_of(rows: Rows, index: np.ndarray, batch_size: int, device="cpu"):
    for lo in range(0, len(index), batch_size):
        yield rows.take(index[lo:lo + batch_size], device)


def deepspeed_config(train: dict) -> dict:
    """DeepSpeed over the adapter. bf16 is torch autocast around the forward pass (fp32 master
    weights), not DeepSpeed's bf16 mode, which would cast the whole model, the ridge head's float64
    statistics included."""
    zero = {"stage": train["zero_stage"]}
    if train["zero_stage"] > 0:
        zero.update(reduce_bucket_size=int(train["bucket_size"]), allgather_bucket_size=int(train["bucket_size"]),
                    overlap_comm=bool(train["overlap_comm"]))
    return {
        "train_micro_batch_size_per_gpu": train["batch_size"],
        "gradient_accumulation_steps": 1,
        "gradient_clipping": GRADIENT_CLIP,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # a torch AdamW: DeepSpeed's own compiles a C++ op first
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def autocast(train: dict, device) -> object:
    if train["precision"] == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


def adamw(params, train: dict) -> torch.optim.Optimizer:
    """The optimizer of both executors (DeepSpeed wraps it; the local loop steps it itself). Fused:
    one kernel over all tensors instead of a Python loop over them, about 20% of a CPU step on
    this adapter's many small tensors."""
    return torch.optim.AdamW(params, lr=train["lr"], weight_decay=train["weight_decay"], fused=True)


def clip_gradients(params, max_norm: float = GRADIENT_CLIP) -> None:
    """DeepSpeed's fp32 gradient clipping, operation for operation, so that one Ray worker and the
    in-process loop take bit-identical steps."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    total = torch.stack([p.grad.detach().float().norm(2) for p in params]).pow(2.0).sum().float().pow(0.5)
    coef = torch.min(torch.tensor([1.0]), torch.tensor([float(max_norm)]) / (total * 1.0 / 1.0 + 1e-6))
    for p in params:
        p.grad.data.mul_(coef)


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over data-parallel workers; the identity in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def adapter_of(model: nn.Module) -> nn.ModuleList:
    """The submodules that own parameters: what DeepSpeed wraps and an epoch checkpoint holds (the
    statistics buffers change only at a task's end)."""
    return nn.ModuleList([c for c in model.children() if next(c.parameters(), None) is not None])


def fit_standardizer(model: ContinualModel, batches, modalities: dict[str, int], device="cpu"):
    """Per-feature mean and variance over every worker's rows (all-reduced sums), for each modality
    not yet fitted that this task's rows have."""
    fitted = model.standardizer.fitted.tolist()
    sums = {m: torch.zeros(3, d, dtype=torch.float64, device=device) for m, d in modalities.items()}
    for feats, present, _ in batches:
        for i, m in enumerate(sums):
            x = feats[m][present[:, i]].double()
            x = x.reshape(-1, x.shape[-1])  # tokens share one standardisation
            sums[m] += torch.stack([x.new_full((x.shape[1],), len(x)), x.sum(0), x.pow(2).sum(0)])
    for (m, s), done in zip(sums.items(), fitted):
        n, total, sq = all_reduce(s)  # every worker reduces every modality, in the same order
        if not done and n[0] > 0:
            mean = total / n
            model.standardizer.set(m, mean, (sq / n - mean**2).clamp_min(0))


class Stepper:
    """One optimizer step per batch, with its state saved and restored at epoch boundaries."""

    def step(self, loss): ...
    def save(self, folder: str) -> None: ...
    def load(self, folder: str) -> None: ...


class LocalStepper(Stepper):
    def __init__(self, model, params, train):
        self.adapter, self.params, self.optimizer = adapter_of(model), params, adamw(params, train)

    def step(self, loss):
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(self.params)
        self.optimizer.step()

    def save(self, folder):
        torch.save({"adapter": self.adapter.state_dict(), "optimizer": self.optimizer.state_dict()},
                   Path(folder) / "local.pt")

    def load(self, folder):
        saved = torch.load(Path(folder) / "local.pt", weights_only=False)
        self.adapter.load_state_dict(saved["adapter"])
        self.optimizer.load_state_dict(saved["optimizer"])


class DeepSpeedStepper(Stepper):
    def __init__(self, model, params, train):
        import deepspeed

        self.engine, *_ = deepspeed.initialize(model=adapter_of(model), optimizer=adamw(params, train),
                                               config=deepspeed_config(train))

    def step(self, loss):
        self.engine.backward(loss)
        self.engine.step()

    def save(self, folder):
        self.engine.save_checkpoint(folder, tag=DEEPSPEED_TAG, save_latest=False)

    def load(self, folder):
        self.engine.load_checkpoint(folder, tag=DEEPSPEED_TAG)


def learn_task(model: ContinualModel, rows: Rows, task: dict, config: dict, new_stepper, on_epoch,
               rank: int = 0, world: int = 1, resume: tuple[int, str] | None = None, device="cpu") -> list[dict]:
    """One task: grow, fit the standardiser, the epochs, then the statistics pass and `end_task`.
    `on_epoch(task, metrics, history, stepper)` after every epoch but the last; `resume=(epoch, folder)` continues from the
    stepper state saved after that epoch. Returns the per-epoch history."""
    train, seed, t = config["train"], config["seed"], task["index"]
    mine = lambda epoch: epoch_rows(task["train_rows"], seed, t, epoch, rank, world)  # noqa: E731
    model.to(device)
    seen_before = model.head_size
    model.begin_task(task["head_size"])
    if config["spec"].get("joint"):  # this task's rows include every earlier task's
        model.forget_statistics()
    torch.manual_seed(seed * 1000 + t)
    if not bool(model.standardizer.fitted.all()):
        fit_standardizer(model, batches_of(rows, mine(None), train["batch_size"], device),
                         config["spec"]["modalities"], device)
    params = model.trainable_parameters()
    old_model = copy.deepcopy(model).eval().requires_grad_(False) if t > 0 and params else None
    start, weights = time.time(), LossWeights(**config["loss"])
    history, first_epoch = [], 0
    if params:
        stepper = new_stepper(model, params, train)
        if resume:
            first_epoch, folder = resume
            stepper.load(folder)
            history = json.loads((Path(folder) / "history.json").read_text())
        for epoch in range(first_epoch, train["epochs"]):
            torch.manual_seed(((seed * 1000 + t) * 1000 + epoch) * 1000 + rank)  # dropout, draws: restartable
            model.train()
            totals, steps = {}, 0
            for feats, present, targets in batches_of(rows, mine(epoch), train["batch_size"], device):
                with autocast(train, device):
                    loss, terms = model.objective(feats, present, targets, weights, old_model, seen_before)
                stepper.step(loss)
                steps += 1
                for k, v in {"loss": loss.item(), **terms}.items():
                    totals[k] = totals.get(k, 0.0) + v
            stats = all_reduce(torch.tensor([steps] + list(totals.values()), dtype=torch.float64, device=device))
            metrics = {k: float(v) / max(float(stats[0]), 1) for k, v in zip(totals, stats[1:])}
            metrics.update(epoch=epoch + 1, seconds=time.time() - start)
            history.append(metrics)
            if epoch + 1 < train["epochs"]:
                on_epoch(t, metrics, history, stepper)
    model.eval()
    if type(model).accumulate is not ContinualModel.accumulate:
        with torch.set_grad_enabled(model.accumulate_needs_grad):
            for batch in batches_of(rows, mine(None), train["batch_size"], device):
                model.accumulate(*batch)
    model.end_task(all_reduce)
    if not history:
        history.append({"epoch": 0, "seconds": time.time() - start})
    return history


@torch.no_grad()
def evaluate(model: ContinualModel, rows: Rows, config: dict, upto: int, rank: int = 0, world: int = 1,
             only: str | None = None, device="cpu") -> dict:
    """Accuracy on each task 0..upto's val and test rows (None for later tasks), every seen class
    competing; each worker predicts its share of the rows, the counts are all-reduced."""
    model.eval()
    tasks = config["tasks"]
    splits = [s for s in ("val", "test") if (rows.select["split"] == s).any()]
    counts = torch.zeros(len(splits), len(tasks), 2, dtype=torch.float64)
    for s, split in enumerate(splits):
        for j in range(upto + 1):
            index = rows.where(split, *tasks[j]["eval"])[rank::world]
            for feats, present, targets in batches_of(rows, index, EVAL_BATCH, device):
                if only is not None:
                    present = present & torch.tensor([m == only for m in feats], device=present.device)
                pred = model(feats, present)["logits"].argmax(-1)
                counts[s, j] += torch.tensor([float((pred == targets).sum()), len(targets)], dtype=torch.float64)
    counts = all_reduce(counts.to(device)).cpu()
    return {split: [float(c / n) if j <= upto and n else None for j, (c, n) in enumerate(counts[s].tolist())]
            for s, split in enumerate(splits)}


def learn_sequence(model: ContinualModel | None, rows: Rows, config: dict, new_stepper, on_epoch, on_task_end,
                   rank: int = 0, world: int = 1, resume: tuple[int, str] | None = None, device="cpu") -> None:
    """Tasks `config['first_task']`.. to the end: learn, evaluate, `on_task_end(model, entry)`."""
    spec = config["spec"]
    if model is None:
        torch.manual_seed(config["seed"])  # the initial weights and the ridge head's random projection
        model = build_model({**spec, "num_classes": 0})
    for task in config["tasks"][config["first_task"]:]:
        model = rebuilt(model, spec)
        task = {**task, "train_rows": rows.where("train", *task["train"])}
        history = learn_task(model, rows, task, config, new_stepper, on_epoch, rank, world, resume, device)
        resume = None
        i = task["index"]
        entry = {"index": i, "history": history, "rows": evaluate(model, rows, config, i, rank, world, device=device)}
        if len(spec["modalities"]) > 1 and i == len(config["tasks"]) - 1:
            entry["modality_acc"] = {m: float(np.mean(evaluate(model, rows, config, i, rank, world, m, device)["test"]))
                                     for m in spec["modalities"]}
        on_task_end(model, entry)


def rebuilt(model: ContinualModel, spec: dict) -> ContinualModel:
    """The same model with new parameter objects: the previous task's DeepSpeed engine leaves its
    gradient hooks on the old ones."""
    shapes = model.shape_args()
    fresh = build_model({**spec, "num_classes": shapes.pop("num_classes"), "model": {**spec["model"], **shapes}})
    fresh.load_state_dict(model.state_dict())
    return fresh


def train_func_per_worker(config: dict):
    """Ray Train: the whole remaining sequence in one worker group. Reports a checkpoint after every
    epoch but a task's last (the restart point after a worker failure) and after every task (the
    task's model, its history and its rows of the accuracy matrix, for the driver to log)."""
    import ray.train
    import ray.train.torch

    if not config.get("verbose"):
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    ctx = ray.train.get_context()
    rank, world, train = ctx.get_world_rank(), ctx.get_world_size(), config["train"]
    if not train["use_gpu"]:  # one intra-op thread per CPU reserved, not one per core of the node
        torch.set_num_threads(max(1, int(train["cpus_per_worker"])))
    device = ray.train.torch.get_device()
    shard = ray.train.get_dataset_shard("rows")
    rows = Rows(pa.concat_tables(shard.iter_batches(batch_size=1 << 16, batch_format="pyarrow")),
                config["spec"]["modalities"], np.asarray(config["class_index"]))
    model, resume = restore(config)
    progress = {"num_tasks": len(config["tasks"]), "epochs": train["epochs"]}

    def report(metrics: dict, folder: str, meta: dict, name: str):
        (Path(folder) / "meta.json").write_text(json.dumps(meta))
        ray.train.report({**metrics, **meta, **progress}, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=name)

    def on_epoch(task, metrics, history, stepper):
        with tempfile.TemporaryDirectory() as tmp:
            stepper.save(tmp)
            (Path(tmp) / "history.json").write_text(json.dumps(history))
            report(metrics, tmp, {"kind": "epoch", "task": task, "epoch": metrics["epoch"]},
                   f"task-{task}-epoch-{metrics['epoch']}")

    def on_task_end(model, entry):
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                save_model(model, config["spec"], tmp)
            report({**entry["history"][-1], "entry": entry}, tmp, {"kind": "task", "task": entry["index"]},
                   f"task-{entry['index']}")

    try:
        learn_sequence(model, rows, config, DeepSpeedStepper, on_epoch, on_task_end, rank, world, resume, device)
    finally:
        if resume:
            shutil.rmtree(resume[1], ignore_errors=True)


def restore(config: dict):
    """(model to start from, resume point) after a worker failure, from the latest checkpoint of this
    fit (a task's end, or an epoch on top of the previous task's end); else the sequence's start.
    Updates `config['first_task']`."""
    import ray.train

    start, resume = config["init_checkpoint"], None
    latest = ray.train.get_checkpoint()
    if latest is not None:
        folder = tempfile.mkdtemp(prefix="mmcl-restore-")
        latest.to_directory(folder)
        meta = json.loads((Path(folder) / "meta.json").read_text())
        if meta["kind"] == "task":
            config["first_task"] = meta["task"] + 1
            return load_model(folder)[0], None
        config["first_task"] = meta["task"]
        resume = (meta["epoch"], folder)
        ends = [c.checkpoint for c in ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED)
                if c.metrics.get("kind") == "task" and c.metrics["task"] == meta["task"] - 1]
        start = ends[-1] if ends else start
    if start is None:
        return None, resume
    with start.as_directory() as folder:
        return load_model(folder)[0], resume


def learn_sequence_local(config: dict, table: pa.Table, init_folder: str | None, on_epoch, on_task_end) -> None:
    """The same sequence in this process with a plain torch AdamW instead of DeepSpeed: the
    debugging aid, and the reference the Ray path is measured against."""
    if config["train"]["cpus_per_worker"]:
        torch.set_num_threads(max(1, int(config["train"]["cpus_per_worker"])))
    rows = Rows(table, config["spec"]["modalities"], np.asarray(config["class_index"]))
    model = load_model(init_folder)[0] if init_folder else None
    learn_sequence(model, rows, config, LocalStepper, lambda t, m, h, s: on_epoch(t, m), on_task_end)
