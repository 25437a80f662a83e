"""The project's method: a cross-modal MoE adapter over standardised frozen features.

The classifier (`head`) is either `analytic` (default): a ridge head over a random ReLU
projection of [the pooled frozen features, the adapter's fused vector z], fitted from statistics
accumulated task by task, so it keeps every class's decision statistics exactly; or `cosine`: a
growing cosine classifier trained by gradient (the literal reading of the paper, which forgets).
The adapter trains on every task (or the first `adapt_tasks`), with a cosine head as its training
signal. Features that move would invalidate statistics gathered under the old adapter (measured:
class-IL 0.21 with stale statistics against 0.77 recomputed), so each class keeps a Gaussian of its
frozen features (`class_gaussians`, their covariance rank), which never move: rows drawn from
earlier tasks' Gaussians join each training batch, and after each task the ridge statistics of
earlier tasks are rebuilt from such rows passed through the current adapter.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from models import losses
from models.adapter import MMEncoder
from models.heads import CosineClassifier
from models.losses import LossWeights
from models.methods.analytic import RidgeStatistics
from models.methods.base import ContinualModel
from models.methods.gaussians import ClassGaussians

REFIT_CHUNK = 256


class CMoE(ContinualModel):
    loss_terms = ("ce", "kd", "rel", "align", "bal", "kd_temperature", "align_temperature")

    def __init__(self, modality_dims: dict[str, int], num_classes: int = 0, dim: int = 128, blocks: int = 2,
                 heads: int = 4, num_experts: int = 4, top_k: int = 2, bottleneck: int = 32, dropout: float = 0.1,
                 freeze_per_task: int = 1, experts_per_task: int = 0, head: str = "analytic", adapt_tasks: int = 0,
                 projection: int = 2048, class_gaussians: int = 64):
        super().__init__(modality_dims)
        if head not in ("analytic", "cosine"):
            raise ValueError(f"head must be analytic or cosine, not '{head}'")
        self.freeze_per_task, self.experts_per_task, self.adapt_tasks = freeze_per_task, experts_per_task, adapt_tasks
        self.encoder = MMEncoder(modality_dims, dim, blocks, heads, num_experts, top_k, bottleneck, dropout)
        self.head = CosineClassifier(dim, num_classes)
        self.ridge = RidgeStatistics(sum(modality_dims.values()) + dim, projection, num_classes) \
            if head == "analytic" else None
        self.gaussians = ClassGaussians(class_gaussians, len(modality_dims)) if class_gaussians else None
        self.register_buffer("tasks_done", torch.zeros((), dtype=torch.long))

    @property
    def head_size(self) -> int:
        return self.head.num_classes

    def shape_args(self) -> dict:
        return {"num_classes": self.head_size, "num_experts": self.encoder.moe_layers[0].num_experts}

    def begin_task(self, head_size: int) -> None:
        later_task = self.head.num_classes > 0
        self.head.grow(head_size - self.head.num_classes)
        if self.ridge is not None:
            self.ridge.begin_task(head_size)
        if self.gaussians is not None:
            self.gaussians.begin_task()
        for moe in self.encoder.moe_layers:
            if later_task:
                moe.add_experts(self.experts_per_task)
            moe.routing_mass.zero_()

    def end_task(self, reduce) -> None:
        """Routing mass over every worker's data decides which experts this task made influential."""
        self.freeze_most_used_experts([reduce(m.routing_mass.clone()) for m in self.encoder.moe_layers],
                                      self.freeze_per_task)
        if self.ridge is not None:
            if self.gaussians is not None and len(self.gaussians) and self.adapting and not self.gaussians.replacing:
                self.refit_ridge_inputs()
            self.ridge.end_task(reduce)
        if self.gaussians is not None:
            self.gaussians.end_task(reduce, self.head_size)
        self.tasks_done += 1

    @property
    def adapting(self) -> bool:
        """Whether the adapter trains in the current task."""
        return self.ridge is None or not self.adapt_tasks or int(self.tasks_done) < self.adapt_tasks

    def replayed(self, entries: torch.Tensor, generator=None):
        """Rows drawn from the given class Gaussians, as raw features like the real rows."""
        features, present, targets = self.gaussians.sample(entries, self.modalities, generator)
        return self.standardizer.invert(features), present, targets

    @torch.no_grad()
    def refit_ridge_inputs(self) -> None:
        """The adapter has moved: the ridge statistics of earlier tasks, gathered under the old
        adapter, are replaced by as many rows drawn from each of their class Gaussians, passed
        through the current adapter. The chunks of draws are dealt out among the workers and summed
        at `end_task` like real rows; each chunk has its own seed, so what is drawn does not depend
        on how many workers there are."""
        self.ridge.forget()
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        entries = torch.repeat_interleave(torch.arange(len(self.gaussians)), self.gaussians.counts.long().cpu())
        for k, chunk in list(enumerate(entries.split(REFIT_CHUNK)))[rank::world]:
            generator = torch.Generator().manual_seed(int(self.tasks_done) * 1_000_003 + k)
            features, present, targets = self.replayed(chunk.to(self.gaussians.counts.device), generator)
            self.ridge.accumulate(self.ridge_input(features, present), targets)

    def forget_statistics(self) -> None:
        """The head is fitted on this task's rows alone, which hold every earlier one (no drawn rows
        join them); the class Gaussians are re-estimated from them."""
        if self.ridge is not None:
            self.ridge.forget()
        if self.gaussians is not None:
            self.gaussians.forget()

    def accumulate(self, features, present, targets, holdout=None) -> None:
        if self.gaussians is not None:
            self.gaussians.accumulate(self.standardizer(features), present, targets)
        if self.ridge is not None:
            self.ridge.accumulate(self.ridge_input(features, present), targets, holdout)

    def ridge_input(self, features, present, z=None):
        """[pooled frozen features, z], z scaled to the modalities' unit mean squared norm (it leaves
        a LayerNorm, so its squared norm is about `dim`, which would swamp the random features)."""
        if z is None:
            z = self.forward_features(features, present)[1]
        return torch.cat([self.pooled(features, present), z / z.shape[1] ** 0.5], 1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Marks frozen experts `requires_grad=False` and returns what the optimizer may change:
        nothing once an analytic head's adapter has had its `adapt_tasks`."""
        if not self.adapting:
            self.requires_grad_(False)
            return []
        for moe in self.encoder.moe_layers:
            for expert, frozen in zip(moe.experts, moe.frozen.tolist()):
                expert.requires_grad_(not frozen)
        return [p for p in self.parameters() if p.requires_grad]

    def freeze_most_used_experts(self, routing_mass: list[torch.Tensor], how_many: int) -> None:
        """Expert lifecycle: after a task, freeze the `how_many` unfrozen experts with most routing mass."""
        for moe, mass in zip(self.encoder.moe_layers, routing_mass):
            mass = mass.clone()
            mass[moe.frozen] = -1
            for e in mass.argsort(descending=True)[:how_many].tolist():
                if mass[e] > 0:
                    moe.frozen[e] = True

    def forward_features(self, features, present):
        return self.encoder(self.standardizer(features), present)

    def adapter_outputs(self, features, present):
        """What trains the adapter: the cosine head's logits and the representations."""
        z_m, z = self.forward_features(features, present)
        return {"cosine_logits": self.head(z), "z": z, "z_m": z_m}

    def forward(self, features, present):
        """`logits` classify (the analytic head once fitted)."""
        out = self.adapter_outputs(features, present)
        out["logits"] = out["cosine_logits"] if self.ridge is None or not int(self.tasks_done) else self.ridge(
            self.ridge_input(features, present, out["z"]))
        return out

    def objective(self, features, present, targets, w: LossWeights, old_model=None, seen_before: int = 0):
        """Loss terms for one batch. `targets` index the head; classes < seen_before are old. With
        class Gaussians, the batch is joined by rows drawn from earlier tasks' classes, as many per
        class as the batch has per class; alignment reads only the real rows, whose modalities come
        from one sample (a drawn row's modalities share its class Gaussian, not a sample)."""
        real = len(targets)
        if self.gaussians is not None and len(self.gaussians):
            per_class = len(targets) / len(targets.unique())
            drawn = self.replayed(self.gaussians.draw(round(per_class * len(self.gaussians.labels.unique()))))
            features = {m: torch.cat([x, drawn[0][m]]) for m, x in features.items()}
            present, targets = torch.cat([present, drawn[1]]), torch.cat([targets, drawn[2]])
        out = self.adapter_outputs(features, present)
        terms = {"ce": F.cross_entropy(out["cosine_logits"], targets)}
        if w.align:
            terms["align"] = losses.alignment(out["z_m"][:real], present[:real], w.align_temperature)
        if w.bal:
            terms["bal"] = self.encoder.balance_loss()
        if old_model is not None:
            with torch.no_grad():
                old = old_model.adapter_outputs(features, present)
            if w.kd and seen_before:
                terms["kd"] = losses.distillation(out["cosine_logits"], old["cosine_logits"][:, :seen_before],
                                                  w.kd_temperature)
            if w.rel:
                new_r = torch.cat([out["z_m"].transpose(0, 1), out["z"][None]])
                old_r = torch.cat([old["z_m"].transpose(0, 1), old["z"][None]])
                terms["rel"] = losses.relation(new_r, old_r)
        total = sum(getattr(w, k) * v for k, v in terms.items())
        return total, {k: v.item() for k, v in terms.items()}
