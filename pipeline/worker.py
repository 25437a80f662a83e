"""One task of the sequence: `train_func_per_worker` on Ray Train workers (DeepSpeed over the
trainable parts), or `train_task_local` in-process; both run the same `learn_task` loop."""
import copy
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from models.methods import ContinualModel, LossWeights, create_model
from pipeline.data import batch_to_arrays

MODEL_FILE = "model.pt"
GRADIENT_CLIP = 1.0  # max gradient norm, both executors


def build_model(spec: dict) -> ContinualModel:
    return create_model(spec["family"], spec["modalities"], spec["num_classes"], spec["model"])


def save_model(model: ContinualModel, spec: dict, folder: str | Path) -> None:
    shapes = model.shape_args()
    spec = {**spec, "num_classes": shapes.pop("num_classes"), "model": {**spec["model"], **shapes}}
    torch.save({"spec": spec, "state_dict": model.state_dict()}, Path(folder) / MODEL_FILE)


def load_model(folder: str | Path) -> tuple[ContinualModel, dict]:
    saved = torch.load(Path(folder) / MODEL_FILE, map_location="cpu", weights_only=False)
    model = build_model(saved["spec"])
    model.load_state_dict(saved["state_dict"])
    return model, saved["spec"]


def to_tensors(batch: dict, modalities: dict[str, int], class_index: np.ndarray, device="cpu"):
    feats, present, labels = batch_to_arrays(batch, modalities)
    return ({m: torch.from_numpy(x).to(device) for m, x in feats.items()}, torch.from_numpy(present).to(device),
            torch.from_numpy(class_index[labels]).to(device))


def deepspeed_config(train: dict) -> dict:
    return {
        "train_micro_batch_size_per_gpu": train["batch_size"],
        "gradient_accumulation_steps": 1,
        "gradient_clipping": GRADIENT_CLIP,
        "zero_optimization": {"stage": train["zero_stage"]},
        "zero_allow_untested_optimizer": True,  # a torch AdamW: DeepSpeed's own compiles a C++ op first
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def adamw(params, train: dict) -> torch.optim.Optimizer:
    """The optimizer of both executors (DeepSpeed wraps it; the local loop steps it itself)."""
    return torch.optim.AdamW(params, lr=train["lr"], weight_decay=train["weight_decay"])


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over data-parallel workers; the identity in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def fit_standardizer(model: ContinualModel, batches, modalities, class_index, device="cpu"):
    """Per-feature mean and variance over every worker's rows (all-reduced sums), for each modality
    not yet fitted that this task's rows have."""
    fitted = model.standardizer.fitted.tolist()
    sums = {m: torch.zeros(3, d, dtype=torch.float64, device=device) for m, d in modalities.items()}
    for batch in batches():
        feats, present, _ = to_tensors(batch, modalities, class_index, device)
        for i, m in enumerate(modalities):
            x = feats[m][present[:, i]].double()
            x = x.reshape(-1, x.shape[-1])  # tokens share one standardisation
            sums[m] += torch.stack([x.new_full((x.shape[1],), len(x)), x.sum(0), x.pow(2).sum(0)])
    for (m, s), done in zip(sums.items(), fitted):
        n, total, sq = all_reduce(s)  # every worker reduces every modality, in the same order
        if not done and n[0] > 0:
            mean = total / n
            model.standardizer.set(m, mean, (sq / n - mean**2).clamp_min(0))


def learn_task(model: ContinualModel, batches, config: dict, make_step, report, device="cpu") -> list[dict]:
    """The per-task hooks around the epochs. `batches(shuffle)` iterates this worker's rows;
    `make_step(model, params)` returns (module, step(loss)); `report(metrics)` after each epoch
    but the last. Returns the per-epoch history."""
    model.to(device)
    train, spec, task = config["train"], config["spec"], config["task_index"]
    modalities, class_index = spec["modalities"], np.asarray(config["class_index"])
    seen_before = model.head_size
    model.begin_task(config["head_size"])
    if not bool(model.standardizer.fitted.all()):
        fit_standardizer(model, lambda: batches(False), modalities, class_index, device)
    params = model.trainable_parameters()
    old_model = copy.deepcopy(model).eval().requires_grad_(False) if task > 0 and params else None
    start, history, weights = time.time(), [], LossWeights(**config["loss"])
    if params:
        module, step = make_step(model, params)
        for epoch in range(train["epochs"]):
            module.train()
            totals, steps = {}, 0
            for batch in batches(True):
                feats, present, targets = to_tensors(batch, modalities, class_index, device)
                loss, terms = module.objective(feats, present, targets, weights, old_model, seen_before)
                step(loss)
                steps += 1
                for k, v in {"loss": loss.item(), **terms}.items():
                    totals[k] = totals.get(k, 0.0) + v
            stats = all_reduce(torch.tensor([steps] + list(totals.values()), dtype=torch.float64, device=device))
            metrics = {k: float(v) / max(float(stats[0]), 1) for k, v in zip(totals, stats[1:])}
            metrics.update(epoch=epoch + 1, seconds=time.time() - start)
            history.append(metrics)
            if epoch + 1 < train["epochs"]:
                report(metrics)
    model.eval()
    if type(model).accumulate is not ContinualModel.accumulate:
        with torch.set_grad_enabled(model.accumulate_needs_grad):
            for batch in batches(False):
                model.accumulate(*to_tensors(batch, modalities, class_index, device))
    model.end_task(all_reduce)
    if not history:
        history.append({"epoch": 0, "seconds": time.time() - start})
    return history


def train_func_per_worker(config: dict):
    import deepspeed
    import ray.train
    import ray.train.torch

    if not config.get("verbose"):
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    ctx = ray.train.get_context()
    train, task = config["train"], config["task_index"]
    torch.manual_seed(config["seed"] * 1000 + task)
    if not train["use_gpu"]:  # one intra-op thread per CPU reserved, not one per core of the node
        torch.set_num_threads(max(1, int(train["cpus_per_worker"])))
    if config["init_checkpoint"] is not None:
        with config["init_checkpoint"].as_directory() as folder:
            model, _ = load_model(folder)
    else:
        model = build_model({**config["spec"], "num_classes": 0})
    shard = ray.train.get_dataset_shard("train")

    def batches(shuffle):
        return shard.iter_batches(batch_size=train["batch_size"], batch_format="numpy",
                                  local_shuffle_buffer_size=4 * train["batch_size"] if shuffle else None)

    def make_step(module, params):
        optimizer = adamw(params, train)
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=deepspeed_config(train))

        def step(loss):
            engine.backward(loss)
            engine.step()
        return engine.module, step

    progress = {"task": task, "epochs": train["epochs"], "num_tasks": config["num_tasks"]}
    history = learn_task(model, batches, config, make_step, lambda m: ray.train.report({**m, **progress}),
                         ray.train.torch.get_device())
    model.cpu()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ctx.get_world_rank() == 0:
            save_model(model, config["spec"], tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({**history[-1], **progress, "history": history}, checkpoint=checkpoint)


def train_task_local(config: dict, table, init_folder: str | None, out_folder: Path, log=None) -> list[dict]:
    """The same task in this process, on an Arrow table of the task's rows, with a plain torch
    AdamW instead of DeepSpeed: for benchmarks that run many short sequences side by side."""
    train, task = config["train"], config["task_index"]
    torch.manual_seed(config["seed"] * 1000 + task)
    model = load_model(init_folder)[0] if init_folder else build_model({**config["spec"], "num_classes": 0})
    rng = np.random.default_rng(config["seed"] * 1000 + task)
    columns = {c: table[c].to_numpy(zero_copy_only=False) for c in ["label", *config["spec"]["modalities"]]}

    def batches(shuffle):
        order = rng.permutation(table.num_rows) if shuffle else np.arange(table.num_rows)
        for lo in range(0, len(order), train["batch_size"]):
            rows = order[lo:lo + train["batch_size"]]
            yield {c: v[rows] for c, v in columns.items()}

    def make_step(module, params):
        optimizer = adamw(params, train)

        def step(loss):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRADIENT_CLIP)
            optimizer.step()
        return module, step

    progress = {"task": task, "epochs": train["epochs"], "num_tasks": config["num_tasks"]}
    history = learn_task(model, batches, config, make_step, lambda m: log and log({**m, **progress}))
    if log:
        log({**history[-1], **progress})
    out_folder.mkdir(parents=True, exist_ok=True)
    save_model(model, config["spec"], out_folder)
    return history
