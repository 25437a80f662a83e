"""The project's method: a cross-modal MoE adapter over standardised frozen features.

The classifier (`head`) is either `analytic` (default): a ridge head over a random ReLU
projection of [the pooled frozen features, the adapter's fused vector z], fitted from statistics
accumulated task by task, so it keeps every class's decision statistics exactly; or `cosine`: a
growing cosine classifier trained by gradient (the literal reading of the paper, which forgets).
With the analytic head the adapter learns during the first `adapt_tasks` tasks (with a cosine
head as its training signal) and is then frozen, since features that keep moving would
invalidate the statistics already accumulated (DESIGN.md section 5).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import losses
from models.adapter import MMEncoder
from models.heads import CosineClassifier
from models.methods.analytic import RidgeStatistics
from models.methods.base import ContinualModel


@dataclass
class LossWeights:
    ce: float = 1.0
    kd: float = 1.0
    rel: float = 1.0
    align: float = 0.1
    bal: float = 0.01
    ewc: float = 100.0  # the ewc family's penalty weight (no other family reads it)
    kd_temperature: float = 2.0
    align_temperature: float = 0.1


class CMoE(ContinualModel):
    def __init__(self, modality_dims: dict[str, int], num_classes: int = 0, dim: int = 128, blocks: int = 2,
                 heads: int = 4, num_experts: int = 4, top_k: int = 2, bottleneck: int = 32, dropout: float = 0.1,
                 freeze_per_task: int = 1, experts_per_task: int = 0, head: str = "analytic", adapt_tasks: int = 1,
                 projection: int = 2048):
        super().__init__(modality_dims)
        if head not in ("analytic", "cosine"):
            raise ValueError(f"head must be analytic or cosine, not '{head}'")
        self.freeze_per_task, self.experts_per_task, self.adapt_tasks = freeze_per_task, experts_per_task, adapt_tasks
        self.encoder = MMEncoder(modality_dims, dim, blocks, heads, num_experts, top_k, bottleneck, dropout)
        self.head = CosineClassifier(dim, num_classes)
        self.ridge = RidgeStatistics(sum(modality_dims.values()) + dim, projection, num_classes) \
            if head == "analytic" else None
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
        for moe in self.encoder.moe_layers:
            if later_task:
                moe.add_experts(self.experts_per_task)
            moe.routing_mass.zero_()

    def end_task(self, reduce) -> None:
        """Routing mass over every worker's data decides which experts this task made influential."""
        self.freeze_most_used_experts([reduce(m.routing_mass.clone()) for m in self.encoder.moe_layers],
                                      self.freeze_per_task)
        if self.ridge is not None:
            self.ridge.end_task(reduce)
        self.tasks_done += 1

    def accumulate(self, features, present, targets) -> None:
        if self.ridge is not None:
            self.ridge.accumulate(self.ridge_input(features, present), targets)

    def ridge_input(self, features, present, z=None):
        """[pooled frozen features, z], z scaled to the modalities' unit mean squared norm (it leaves
        a LayerNorm, so its squared norm is about `dim`, which would swamp the random features)."""
        if z is None:
            z = self.forward_features(features, present)[1]
        return torch.cat([self.pooled(features, present), z / z.shape[1] ** 0.5], 1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Marks frozen experts `requires_grad=False` and returns what the optimizer may change:
        nothing once an analytic head's adapter has had its `adapt_tasks`."""
        if self.ridge is not None and int(self.tasks_done) >= self.adapt_tasks:
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

    def forward(self, features, present):
        """`logits` classify (the analytic head once fitted); `cosine_logits` train the adapter."""
        z_m, z = self.forward_features(features, present)
        cosine = self.head(z)
        logits = cosine if self.ridge is None or not int(self.tasks_done) else self.ridge(
            self.ridge_input(features, present, z))
        return {"logits": logits, "cosine_logits": cosine, "z": z, "z_m": z_m}

    def objective(self, features, present, targets, w: LossWeights, old_model=None, seen_before: int = 0):
        """Loss terms for one batch. `targets` index the head; classes < seen_before are old."""
        out = self(features, present)
        terms = {"ce": F.cross_entropy(out["cosine_logits"], targets)}
        if w.align:
            terms["align"] = losses.alignment(out["z_m"], present, w.align_temperature)
        if w.bal:
            terms["bal"] = self.encoder.balance_loss()
        if old_model is not None:
            with torch.no_grad():
                old = old_model(features, present)
            if w.kd and seen_before:
                terms["kd"] = losses.distillation(out["cosine_logits"], old["cosine_logits"][:, :seen_before],
                                                  w.kd_temperature)
            if w.rel:
                new_r = torch.cat([out["z_m"].transpose(0, 1), out["z"][None]])
                old_r = torch.cat([old["z_m"].transpose(0, 1), old["z"][None]])
                terms["rel"] = losses.relation(new_r, old_r)
        total = sum(getattr(w, k) * v for k, v in terms.items())
        return total, {k: v.item() for k, v in terms.items()}
