"""The project's method: cross-modal MoE adapter over standardised frozen features, growing cosine head."""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import losses
from models.adapter import MMEncoder
from models.heads import CosineClassifier
from models.methods.base import ContinualModel


@dataclass
class LossWeights:
    ce: float = 1.0
    kd: float = 1.0
    rel: float = 1.0
    align: float = 0.1
    bal: float = 0.01
    ewc: float = 0.0  # the ewc baseline's penalty weight
    kd_temperature: float = 2.0
    align_temperature: float = 0.1


class CMoE(ContinualModel):
    def __init__(self, modality_dims: dict[str, int], num_classes: int = 0, dim: int = 128, blocks: int = 2,
                 heads: int = 4, num_experts: int = 4, top_k: int = 2, bottleneck: int = 32, dropout: float = 0.1,
                 freeze_per_task: int = 1, experts_per_task: int = 0):
        super().__init__(modality_dims)
        self.freeze_per_task, self.experts_per_task = freeze_per_task, experts_per_task
        self.encoder = MMEncoder(modality_dims, dim, blocks, heads, num_experts, top_k, bottleneck, dropout)
        self.head = CosineClassifier(dim, num_classes)

    @property
    def head_size(self) -> int:
        return self.head.num_classes

    def shape_args(self) -> dict:
        return {"num_classes": self.head_size, "num_experts": self.encoder.moe_layers[0].num_experts}

    def begin_task(self, head_size: int) -> None:
        later_task = self.head.num_classes > 0
        self.head.grow(head_size - self.head.num_classes)
        for moe in self.encoder.moe_layers:
            if later_task:
                moe.add_experts(self.experts_per_task)
            moe.routing_mass.zero_()

    def end_task(self, reduce) -> None:
        """Routing mass over every worker's data decides which experts this task made influential."""
        self.freeze_most_used_experts([reduce(m.routing_mass.clone()) for m in self.encoder.moe_layers],
                                      self.freeze_per_task)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Marks frozen experts `requires_grad=False` and returns what the optimizer may change."""
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
        z_m, z = self.forward_features(features, present)
        return {"logits": self.head(z), "z": z, "z_m": z_m}

    def objective(self, features, present, targets, w: LossWeights, old_model=None, seen_before: int = 0):
        """Loss terms for one batch. `targets` index the head; classes < seen_before are old."""
        out = self(features, present)
        terms = {"ce": F.cross_entropy(out["logits"], targets)}
        if w.align:
            terms["align"] = losses.alignment(out["z_m"], present, w.align_temperature)
        if w.bal:
            terms["bal"] = self.encoder.balance_loss()
        if old_model is not None:
            with torch.no_grad():
                old = old_model(features, present)
            if w.kd and seen_before:
                terms["kd"] = losses.distillation(out["logits"], old["logits"][:, :seen_before], w.kd_temperature)
            if w.rel:
                new_r = torch.cat([out["z_m"].transpose(0, 1), out["z"][None]])
                old_r = torch.cat([old["z_m"].transpose(0, 1), old["z"][None]])
                terms["rel"] = losses.relation(new_r, old_r)
        total = sum(getattr(w, k) * v for k, v in terms.items())
        return total, {k: v.item() for k, v in terms.items()}
