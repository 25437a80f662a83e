"""One task of the sequence on one Ray Train worker: DeepSpeed over the adapter and head."""
import copy
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from models.cmoe import CMoE, LossWeights
from pipeline.data import batch_to_arrays

MODEL_FILE = "model.pt"


def build_model(spec: dict) -> CMoE:
    return CMoE(spec["modalities"], spec["num_classes"], **spec["model"])


def save_model(model: CMoE, spec: dict, folder: str | Path) -> None:
    torch.save({"spec": {**spec, "num_classes": model.head.num_classes}, "state_dict": model.state_dict()},
               Path(folder) / MODEL_FILE)


def load_model(folder: str | Path) -> tuple[CMoE, dict]:
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
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": train["zero_stage"]},
        "zero_allow_untested_optimizer": True,  # a torch AdamW: DeepSpeed's own compiles a C++ op first
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def fit_standardizer(model: CMoE, shard, modalities, class_index, batch_size):
    """First task only: per-feature mean and std over every worker's shard (all-reduced sums)."""
    sums = {m: torch.zeros(3, d, dtype=torch.float64) for m, d in modalities.items()}
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        feats, present, _ = to_tensors(batch, modalities, class_index)
        for i, m in enumerate(modalities):
            x = feats[m][present[:, i]].double()
            x = x.reshape(-1, x.shape[-1])  # tokens share one standardisation
            sums[m] += torch.stack([x.new_full((x.shape[1],), len(x)), x.sum(0), x.pow(2).sum(0)])
    for m, s in sums.items():
        n, total, sq = _all_reduce(s)
        mean = total / n.clamp_min(1)
        std = (sq / n.clamp_min(1) - mean**2).clamp_min(0).sqrt()
        getattr(model.standardizer, f"{m}_mean").copy_(mean.float())
        getattr(model.standardizer, f"{m}_std").copy_(std.float().clamp_min(1e-6))
    model.standardizer.fitted.fill_(True)


def train_func_per_worker(config: dict):
    import deepspeed
    import ray.train
    import ray.train.torch

    if not config.get("verbose"):
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    ctx = ray.train.get_context()
    rank, task, num_tasks = ctx.get_world_rank(), config["task_index"], config["num_tasks"]
    train, spec = config["train"], config["spec"]
    torch.manual_seed(config["seed"] * 1000 + task)
    if not train["use_gpu"]:  # one intra-op thread per CPU reserved, not one per core of the node
        torch.set_num_threads(max(1, int(train["cpus_per_worker"])))
    modalities = spec["modalities"]
    class_index = np.asarray(config["class_index"])  # label -> head index

    if config["init_checkpoint"] is not None:
        with config["init_checkpoint"].as_directory() as folder:
            model, _ = load_model(folder)
    else:
        model = build_model({**spec, "num_classes": 0})
    seen_before = model.head.num_classes
    model.head.grow(config["head_size"] - seen_before)
    shard = ray.train.get_dataset_shard("train")
    if not bool(model.standardizer.fitted):
        fit_standardizer(model, shard, modalities, class_index, train["batch_size"])

    old_model = None
    if task > 0:
        old_model = copy.deepcopy(model).eval().requires_grad_(False).to(ray.train.torch.get_device())
    for moe in model.encoder.moe_layers:
        moe.routing_mass.zero_()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=train["lr"], weight_decay=train["weight_decay"])
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(train))
    weights = LossWeights(**config["loss"])

    start, history = time.time(), []
    for epoch in range(train["epochs"]):
        engine.train()
        totals, steps = {}, 0
        for batch in shard.iter_batches(batch_size=train["batch_size"], batch_format="numpy",
                                        local_shuffle_buffer_size=4 * train["batch_size"]):
            feats, present, targets = to_tensors(batch, modalities, class_index, engine.device)
            loss, terms = engine.module.objective(feats, present, targets, weights, old_model, seen_before)
            engine.backward(loss)
            engine.step()
            steps += 1
            for k, v in {"loss": loss.item(), **terms}.items():
                totals[k] = totals.get(k, 0.0) + v
        stats = _all_reduce(torch.tensor([steps] + list(totals.values()), dtype=torch.float64))
        metrics = {k: float(v) / max(float(stats[0]), 1) for k, v in zip(totals, stats[1:])}
        metrics.update(task=task, epoch=epoch + 1, epochs=train["epochs"], num_tasks=num_tasks,
                       seconds=time.time() - start)
        history.append({k: v for k, v in metrics.items() if k not in ("task", "epochs", "num_tasks")})
        if epoch + 1 < train["epochs"]:
            ray.train.report(metrics)
    # Routing mass over every worker's shard decides which experts this task made influential.
    layers = engine.module.encoder.moe_layers
    engine.module.freeze_most_used_experts([_all_reduce(m.routing_mass.clone()) for m in layers],
                                           config["freeze_per_task"])
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_model(engine.module, spec, tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({**metrics, "history": history}, checkpoint=checkpoint)
