"""What every continual method shares: frozen-feature standardisation and the per-task hooks."""
import torch
import torch.nn as nn


class FeatureStandardizer(nn.Module):
    """Per-feature standardisation of each modality's frozen features, fitted once (first task)."""

    def __init__(self, modality_dims: dict[str, int]):
        super().__init__()
        for m, d in modality_dims.items():
            self.register_buffer(f"{m}_mean", torch.zeros(d))
            self.register_buffer(f"{m}_std", torch.ones(d))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def fit(self, features: dict[str, torch.Tensor], present: torch.Tensor, modalities: list[str]) -> None:
        for i, m in enumerate(modalities):
            x = features[m][present[:, i]]
            x = x.reshape(-1, x.shape[-1])
            if len(x) > 1:
                getattr(self, f"{m}_mean").copy_(x.mean(0))
                getattr(self, f"{m}_std").copy_(x.std(0).clamp_min(1e-6))
        self.fitted.fill_(True)

    def forward(self, features):
        return {m: (x - getattr(self, f"{m}_mean")) / getattr(self, f"{m}_std") for m, x in features.items()}


class ContinualModel(nn.Module):
    """A model and how it learns one task; the worker loop calls, for each task:

        begin_task(head_size)            grow the head to every class seen so far
        objective(...) per batch, epochs  only if trainable_parameters() is not empty
        accumulate(...) per batch, once   statistics (analytic heads, prototypes, Fisher, exemplars)
        end_task(reduce)                  `reduce` sums a tensor over data-parallel workers
    """
    accumulate_needs_grad = False

    def __init__(self, modality_dims: dict[str, int]):
        super().__init__()
        self.modalities = list(modality_dims)
        self.standardizer = FeatureStandardizer(modality_dims)

    @property
    def head_size(self) -> int:
        raise NotImplementedError

    def begin_task(self, head_size: int) -> None:
        pass

    def shape_args(self) -> dict:
        """Constructor arguments that rebuild this model's current shapes (saved with checkpoints)."""
        return {"num_classes": self.head_size}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def objective(self, features, present, targets, weights, old_model=None, seen_before: int = 0):
        raise NotImplementedError(f"{type(self).__name__} does not learn by gradient")

    def accumulate(self, features, present, targets) -> None:
        pass

    def end_task(self, reduce) -> None:
        pass

    def pooled(self, features, present) -> torch.Tensor:
        """Standardised features, tokens averaged, absent modalities zero, modalities concatenated."""
        parts = []
        for i, (m, x) in enumerate(self.standardizer(features).items()):
            x = x.mean(1) if x.dim() == 3 else x
            parts.append(x * present[:, i, None])
        return torch.cat(parts, 1)
