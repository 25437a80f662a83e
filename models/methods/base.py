"""What every continual method shares: frozen-feature standardisation and the per-task hooks."""
import torch
import torch.nn as nn


class FeatureStandardizer(nn.Module):
    """Centres each modality's frozen features (per-feature means) and scales the modality by one
    number, so that its mean squared norm is 1. Fitted once per modality, on the first task that
    has it (a modality missing from the first task is fitted when it first appears). One scale per
    modality rather than per feature: per-feature spreads measured on the first task's few classes
    are unreliable for the classes that come later, and every modality weighs the same whatever its
    width (measured: BENCHMARKS.md)."""

    def __init__(self, modality_dims: dict[str, int]):
        super().__init__()
        for m, d in modality_dims.items():
            self.register_buffer(f"{m}_mean", torch.zeros(d))
            self.register_buffer(f"{m}_std", torch.ones(d))
        self.register_buffer("fitted", torch.zeros(len(modality_dims), dtype=torch.bool))
        self.modalities = list(modality_dims)

    def set(self, modality: str, mean: torch.Tensor, variance: torch.Tensor) -> None:
        getattr(self, f"{modality}_mean").copy_(mean.float())
        getattr(self, f"{modality}_std").fill_(float(variance.sum().sqrt().clamp_min(1e-6)))
        self.fitted[self.modalities.index(modality)] = True

    def forward(self, features):
        return {m: (x - getattr(self, f"{m}_mean")) / getattr(self, f"{m}_std") for m, x in features.items()}

    def invert(self, standardized):
        return {m: x * getattr(self, f"{m}_std") + getattr(self, f"{m}_mean") for m, x in standardized.items()}


class ContinualModel(nn.Module):
    """A model and how it learns one task; the worker loop calls, for each task:

        begin_task(head_size)            grow the head to every class seen so far
        objective(...) per batch, epochs  only if trainable_parameters() is not empty
        accumulate(...) per batch, once   statistics (analytic heads, prototypes, Fisher, exemplars);
                                          `holdout`: the rows that choose a head's hyperparameters
        end_task(reduce)                  `reduce` sums a tensor over data-parallel workers
    """
    accumulate_needs_grad = False
    loss_terms: tuple[str, ...] = ()  # the LossWeights fields `objective` reads

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

    def accumulate(self, features, present, targets, holdout=None) -> None:
        pass

    def forget_statistics(self) -> None:
        """Drops what `accumulate` gathered in earlier tasks (a joint method sees those rows again)."""

    def end_task(self, reduce) -> None:
        pass

    def pooled(self, features, present) -> torch.Tensor:
        """Standardised features, tokens averaged, absent modalities zero, modalities concatenated."""
        parts = []
        for i, (m, x) in enumerate(self.standardizer(features).items()):
            x = x.mean(1) if x.dim() == 3 else x
            parts.append(x * present[:, i, None])
        return torch.cat(parts, 1)
