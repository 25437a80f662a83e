"""The task sequence on one worker: `train_func_per_worker` on Ray Train workers (DeepSpeed over the
adapter), or `learn_sequence_local` in this process; both run the same `learn_sequence` loop.

A worker reads its rows of each stream (pipeline/streams.py): the current task's train rows, and
the val and test rows. When all of them fit `train.hold_mb` the worker reads them once and keeps
them, and each epoch takes the rank's rows of a seeded permutation of the task's; otherwise it
streams its share of each on every pass. Runs are reproducible and restartable at any epoch, and
with one worker identical to the in-process loop.
"""
import copy
import json
import logging
import shutil
import sys
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
from pipeline.checkpoint import build_model, load_model, load_tensors, save_model
from pipeline.data import batch_to_arrays
from pipeline.streams import DROP, EVAL, ROWS, chosen, stream_names, train_stream

GRADIENT_CLIP = 1.0  # max gradient norm, both executors
EVAL_BATCH = 512
DEEPSPEED_TAG = "epoch"  # the engine's folder inside an epoch checkpoint


class Rows:
    """Arrow rows as dense tensors (features per modality, present mask, head targets) plus the
    columns that select tasks and splits, and the ridge hold-out (pipeline/streams.py: select_rows)."""

    def __init__(self, tables: list[pa.Table], modalities: dict[str, int], class_index: np.ndarray):
        tables = [t for t in tables if t.num_rows]
        if not tables:
            self.features = {m: torch.zeros(0, d) for m, d in modalities.items()}
            self.present = torch.zeros(0, len(modalities), dtype=torch.bool)
            self.targets = torch.zeros(0, dtype=torch.long)
            self.select = {"label": np.zeros(0, np.int64), "domain": np.zeros(0, str), "split": np.zeros(0, str),
                           "holdout": np.zeros(0, bool), DROP: np.zeros(0, np.int64)}
            return
        table = pa.concat_tables(tables)
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
        self.select["holdout"] = table["holdout"].to_numpy(zero_copy_only=False)
        if DROP in table.column_names:
            self.select[DROP] = table[DROP].to_numpy()

    def __len__(self) -> int:
        return len(self.targets)

    def take(self, index: np.ndarray, device="cpu"):
        i = torch.from_numpy(index)
        return ({m: x[i].to(device) for m, x in self.features.items()}, self.present[i].to(device),
                self.targets[i].to(device))


SHUFFLE_BUFFER_ROWS = 10_000  # a streamed shard's rows mix within windows of this many


class Held:
    """Every row of a held sequence (pipeline/streams.py: ROWS), read whole by this worker when first
    needed and kept for the sequence."""

    def __init__(self, stream, modalities: dict[str, int], class_index: np.ndarray):
        self.stream, self.modalities, self.class_index = stream, modalities, class_index
        self._rows: Rows | None = None

    @property
    def rows(self) -> Rows:
        if self._rows is None:
            self._rows = Rows(list(self.stream.iter_batches(batch_size=None, batch_format="pyarrow")),
                              self.modalities, self.class_index)
        return self._rows


class Shard:
    """This worker's rows of one stream. Of a held sequence, the stream's rows of `Held` (`select`:
    splits, column, values); each pass takes this rank's rows of them: of a seeded permutation padded
    by wrapping to a multiple of the world size in an epoch (as PyTorch's DistributedSampler draws
    them: batches mix every class, whatever the source's order), every world-th row in a statistics
    or evaluation pass. Otherwise the worker's `streaming_split` share is read on every pass, an
    epoch's rows shuffled within a seeded window of SHUFFLE_BUFFER_ROWS, so that no worker holds
    more than its buffers."""

    def __init__(self, source, rank: int, world: int, modalities: dict[str, int], class_index: np.ndarray,
                 select: tuple | None = None):
        self.source, self.select, self.rank, self.world = source, select, rank, world
        self.modalities, self.class_index = modalities, class_index
        self.mine: np.ndarray | None = None

    def batches(self, batch_size: int, order: list[int] | None = None, device="cpu", select=False):
        """(features, present, targets[, selection columns]) batches of one pass; `order`: the seed of
        an epoch's shuffle, else the stream's order."""
        if isinstance(self.source, Held):
            rows = self.source.rows
            if self.mine is None:
                self.mine = np.flatnonzero(chosen(rows.select["split"], rows.select, *self.select))
            n = len(self.mine)
            if order is None:
                index = self.mine[self.rank::self.world]
            else:
                drawn = np.resize(np.random.default_rng(order).permutation(n), -(-n // self.world) * self.world)
                index = self.mine[drawn[self.rank::self.world]]
            for lo in range(0, len(index), batch_size):
                yield self._out(rows, index[lo:lo + batch_size], device, select)
            return
        seed = None if order is None else int(np.random.SeedSequence(order).generate_state(1)[0])
        shuffle = {} if seed is None else {"local_shuffle_buffer_size": max(SHUFFLE_BUFFER_ROWS, batch_size),
                                           "local_shuffle_seed": seed}
        for batch in self.source.iter_batches(batch_size=batch_size, batch_format="pyarrow", **shuffle):
            rows = Rows([batch], self.modalities, self.class_index)
            yield self._out(rows, np.arange(len(rows)), device, select)

    @staticmethod
    def _out(rows: Rows, index: np.ndarray, device, select: bool):
        batch = rows.take(index, device)
        return (*batch, {c: v[index] for c, v in rows.select.items()}) if select else batch


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
        saved = load_tensors(Path(folder) / "local.pt")
        self.adapter.load_state_dict(saved["adapter"])
        self.optimizer.load_state_dict(saved["optimizer"])


def import_deepspeed():
    """`import deepspeed` without the `import mlflow` of DeepSpeed's autotuner (never run here, and the
    only user of it): 2 of a Train worker's 2.5 s to import DeepSpeed, paid by every worker of every fit."""
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # the autotuner's `import mlflow` raises ImportError, which it catches
        try:
            import deepspeed  # noqa: F401
        finally:
            del sys.modules["mlflow"]
    import deepspeed
    return deepspeed


class DeepSpeedStepper(Stepper):
    def __init__(self, model, params, train):
        deepspeed = import_deepspeed()
        self.engine, *_ = deepspeed.initialize(model=adapter_of(model), optimizer=adamw(params, train),
                                               config=deepspeed_config(train))
        self.engine.checkpoint_engine = weights_only_engine(self.engine._config)

    def step(self, loss):
        self.engine.backward(loss)
        self.engine.step()

    def save(self, folder):
        self.engine.save_checkpoint(folder, tag=DEEPSPEED_TAG, save_latest=False)

    def load(self, folder):
        self.engine.load_checkpoint(folder, tag=DEEPSPEED_TAG)


def weights_only_engine(config=None):
    """DeepSpeed's torch checkpoint engine with its files read by the weights-only unpickler (DeepSpeed
    unpickles them in full), allowing the three DeepSpeed classes that ZeRO's optimizer states hold."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    class WeightsOnly(TorchCheckpointEngine):
        def load(self, path, map_location=None):
            return load_tensors(path, (LossScaler, ZeroStageEnum, fragment_address), map_location)

    return WeightsOnly(config)


def learn_task(model: ContinualModel, rows: Shard, task: dict, config: dict, new_stepper, on_epoch,
               rank: int = 0, resume: tuple[int, str] | None = None, device="cpu") -> list[dict]:
    """One task: grow, fit the standardiser, the epochs, then the statistics pass and `end_task`.
    `on_epoch(task, metrics, history, stepper)` after every epoch but the last; `resume=(epoch, folder)` continues from the
    stepper state saved after that epoch. Returns the per-epoch history."""
    train, seed, t = config["train"], config["seed"], task["index"]
    model.to(device)
    seen_before = model.head_size
    model.begin_task(task["head_size"])
    if config["spec"].get("joint"):  # this task's rows include every earlier task's
        model.forget_statistics()
    torch.manual_seed(seed * 1000 + t)
    if not bool(model.standardizer.fitted.all()):
        fit_standardizer(model, rows.batches(train["batch_size"], device=device),
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
            for feats, present, targets in rows.batches(train["batch_size"], [seed, t, epoch], device):
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
            for feats, present, targets, select in rows.batches(train["batch_size"], device=device, select=True):
                model.accumulate(feats, present, targets, torch.from_numpy(select["holdout"]).to(device))
    model.end_task(all_reduce)
    if not history:
        history.append({"epoch": 0, "seconds": time.time() - start})
    return history


@torch.no_grad()
def evaluate(model: ContinualModel, rows: Shard, config: dict, upto: int, only: str | None = None,
             device="cpu") -> dict:
    """Accuracy on each task 0..upto's val and test rows (None for later tasks), every seen class
    competing; each worker predicts its share of the rows, the counts are all-reduced."""
    model.eval()
    tasks, splits = config["tasks"], config["data"]["eval_splits"]
    counts = torch.zeros(len(splits), len(tasks), 2, dtype=torch.float64)
    for feats, present, targets, select in rows.batches(EVAL_BATCH, device=device, select=True):
        of_task = np.stack([np.isin(select[col], values) for col, values in (t["eval"] for t in tasks[:upto + 1])])
        seen = of_task.any(0)
        if not seen.any():
            continue
        keep = torch.from_numpy(np.flatnonzero(seen)).to(device)
        feats, present, targets = {m: x[keep] for m, x in feats.items()}, present[keep], targets[keep]
        if only is not None:
            present = present & torch.tensor([m == only for m in feats], device=present.device)
        correct = (model(feats, present)["logits"].argmax(-1) == targets).cpu().numpy()
        for s, split in enumerate(splits):
            for j, mask in enumerate(of_task[:, seen] & (select["split"][seen] == split)):
                counts[s, j] += torch.tensor([float(correct[mask].sum()), float(mask.sum())], dtype=torch.float64)
    counts = all_reduce(counts.to(device)).cpu()
    return {split: [float(c / n) if j <= upto and n else None for j, (c, n) in enumerate(counts[s].tolist())]
            for s, split in enumerate(splits)}


def learn_sequence(model: ContinualModel | None, shards, config: dict, new_stepper, on_epoch, on_task_end,
                   rank: int = 0, resume: tuple[int, str] | None = None, device="cpu") -> None:
    """Tasks `config['first_task']`.. to the end: learn, evaluate, `on_task_end(model, entry)`.
    `shards(name)`: this worker's Shard of a stream (pipeline/streams.py)."""
    spec = config["spec"]
    if model is None:
        torch.manual_seed(config["seed"])  # the initial weights and the ridge head's random projection
        model = build_model({**spec, "num_classes": 0})
    held = shards(EVAL)
    for task in config["tasks"][config["first_task"]:]:
        model = rebuilt(model, spec)
        history = learn_task(model, shards(train_stream(task["index"])), task, config, new_stepper, on_epoch, rank,
                             resume, device)
        resume = None
        i = task["index"]
        entry = {"index": i, "history": history, "rows": evaluate(model, held, config, i, device=device)}
        if len(spec["modalities"]) > 1 and i == len(config["tasks"]) - 1:
            entry["modality_acc"] = {m: float(np.mean(evaluate(model, held, config, i, m, device)["test"]))
                                     for m in spec["modalities"]}
        entry["ended_at"] = time.time()  # the next task starts after it: where its MLflow run starts
        on_task_end(model, entry)


def shards_of(streams: dict, config: dict, rank: int, world: int):
    """Stream name (a task's train stream, or the eval stream) -> this worker's Shard of it."""
    modalities, class_index = config["spec"]["modalities"], np.asarray(config["class_index"])
    if ROWS not in streams:
        return lambda name: Shard(streams[name], rank, world, modalities, class_index)
    held = Held(streams[ROWS], modalities, class_index)
    select = {EVAL: (config["data"]["eval_splits"], None, ()),
              **{train_stream(t["index"]): (["train"], *t["train"]) for t in config["tasks"]}}
    return lambda name: Shard(held, rank, world, modalities, class_index, select[name])


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
    model, resume = restore(config)
    streams = {name: ray.train.get_dataset_shard(name) for name in stream_names(config)}
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
        learn_sequence(model, shards_of(streams, config, rank, world), config, DeepSpeedStepper, on_epoch, on_task_end, rank,
                       resume, device)
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


def learn_sequence_local(config: dict, streams: dict, init_folder: str | None, on_epoch, on_task_end) -> None:
    """The same sequence in this process with a plain torch AdamW instead of DeepSpeed: the
    debugging aid, and the reference the Ray path is measured against."""
    if config["train"]["cpus_per_worker"]:
        torch.set_num_threads(max(1, int(config["train"]["cpus_per_worker"])))
    model = load_model(init_folder)[0] if init_folder else None
    learn_sequence(model, shards_of(streams, config, 0, 1), config, LocalStepper, lambda t, m, h, s: on_epoch(t, m),
                   on_task_end)
