"""Multinomial logistic regression on the frozen features, fitted to convergence on each task's
rows: a joint reference when each task's rows hold every earlier task's (`joint`), since nothing
of an earlier fit is kept.

Tokens mean-pooled, absent modalities zero, each feature standardised on the fitted rows; the
loss is scikit-learn's default (summed cross-entropy + ||W||^2 / 2, bias not penalised),
minimised by L-BFGS in float64. Data-parallel workers keep their own rows; the loss and its
gradient are summed over them at every step, so every worker takes the same steps.
"""
import torch
import torch.nn.functional as F

from models.methods.analytic import grow_buffers
from models.methods.base import ContinualModel

MAX_ITER = 500


class LogisticHead(ContinualModel):
    def __init__(self, modality_dims: dict[str, int], num_classes: int = 0):
        super().__init__(modality_dims)
        dim = sum(modality_dims.values())
        self.register_buffer("weight", torch.zeros(dim, num_classes, dtype=torch.float64))
        self.register_buffer("bias", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("scale", torch.ones(dim, dtype=torch.float64))
        self._rows = None

    @property
    def head_size(self) -> int:
        return self.bias.shape[0]

    def begin_task(self, head_size: int) -> None:
        grow_buffers(self, ("weight",), head_size - self.head_size, dim=1)
        grow_buffers(self, ("bias",), head_size - self.head_size, dim=0)
        self._rows = ([], [])

    def accumulate(self, features, present, targets, holdout=None) -> None:
        self._rows[0].append(self.pooled(features, present).double())
        self._rows[1].append(targets)

    def end_task(self, reduce) -> None:
        rows, labels = self._rows
        self._rows = None
        x = torch.cat(rows) if rows else self.mean.new_zeros(0, len(self.mean))  # a worker may have none
        y = torch.cat(labels) if labels else self.bias.new_zeros(0, dtype=torch.long)
        n = reduce(x.new_tensor([len(x)]))
        self.mean = reduce(x.sum(0)) / n
        std = (reduce(x.pow(2).sum(0)) / n - self.mean.pow(2)).clamp_min(0).sqrt()
        self.scale = torch.where(std > 1e-8, std, torch.ones_like(std))  # constant features: as scikit-learn
        x = (x - self.mean) / self.scale
        weight, bias = torch.zeros_like(self.weight, requires_grad=True), torch.zeros_like(self.bias, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=MAX_ITER, history_size=20,
                                      tolerance_grad=1e-6, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(x @ weight + bias, y, reduction="sum")
            loss.backward()
            weight.grad = reduce(weight.grad) + weight.detach()
            bias.grad = reduce(bias.grad)
            return reduce(loss.detach()) + weight.detach().pow(2).sum() / 2

        with torch.enable_grad():
            optimizer.step(closure)
        self.weight, self.bias = weight.detach(), bias.detach()

    def forward(self, features, present):
        x = (self.pooled(features, present).double() - self.mean) / self.scale
        return {"logits": (x @ self.weight + self.bias).float()}
