"""Heads fitted from statistics accumulated task by task: nothing to forget, no gradients.

`RidgeHead` (RanPAC, McDonnell et al. 2023): a fixed random ReLU projection of the standardised,
pooled frozen features, then ridge regression onto one-hot labels from the running sums
G = sum(phi phi^T) and C = sum(phi y^T), which is exactly the head joint training would give.
The ridge strength is chosen each task on about a fifth of the rows held out from the fit, the
validation error computed from statistics alone; then the head is refitted on all of them. The
pipeline holds out whole groups (`models.holdout`: rows that share a picture or a recording fall
on one side, else memorising it would pass for generalising); rows with no key, such as those
drawn from stored statistics, are held out by their content.
`PrototypeHead` (SimpleCIL, Zhou et al. 2023): class means of the same features, cosine logits.
"""
import functools

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.linalg.blas import dsyrk
from threadpoolctl import ThreadpoolController

from models.holdout import HOLDOUT_EVERY
from models.methods.base import ContinualModel

RIDGE_GRID = tuple(10.0**k for k in range(-2, 7))
SUMS = ("gram", "gram_val", "cross", "cross_val")  # RidgeStatistics' running sums (the _val ones: held-out rows)
GRAMS = ("gram", "gram_val")  # symmetric: a checkpoint holds their upper triangles


def grow_buffers(module: nn.Module, names, extra: int, dim: int) -> None:
    """Appends `extra` zero entries (new classes) along `dim` to each named buffer."""
    if extra <= 0:
        return
    for name in names:
        old = getattr(module, name)
        shape = list(old.shape)
        shape[dim] = extra
        setattr(module, name, torch.cat([old, old.new_zeros(shape)], dim))


def held_out(x: torch.Tensor) -> torch.Tensor:
    """The rows whose fit chooses the ridge strength: about one in HOLDOUT_EVERY, by content."""
    return (x.double().sum(1) * 1e3).floor().remainder(HOLDOUT_EVERY) == 0


@functools.cache
def blas() -> ThreadpoolController:
    """This process's BLAS libraries, found once (a search costs about 10 ms)."""
    return ThreadpoolController().select(user_api="blas")


def add_gram(gram: torch.Tensor, rows: torch.Tensor) -> None:
    """gram += rows^T rows. On the CPU only the lower triangle, by BLAS's syrk (half the flops of
    a full product, about 2.5x faster than torch's on one core), on as many threads as torch's."""
    if gram.device.type != "cpu":
        gram += rows.T @ rows
        return
    # numpy views: gram.T is column-major, so syrk's upper triangle of it is gram's lower one.
    with blas().limit(limits=torch.get_num_threads()):
        out = dsyrk(1.0, rows.detach().numpy().T, beta=1.0, c=gram.numpy().T, trans=0, lower=0, overwrite_c=1)
    assert np.shares_memory(out, gram.numpy()), "syrk did not write in place"


def symmetric_from_lower(g: torch.Tensor) -> torch.Tensor:
    return g.tril() + g.tril(-1).T


class RidgeStatistics(nn.Module):
    """A random ReLU projection of input vectors and a ridge head fitted from running sums."""

    def __init__(self, in_dim: int, projection: int, num_classes: int = 0):
        super().__init__()  # the projection is drawn from torch's seeded global generator
        self.register_buffer("projection", torch.randn(in_dim, projection) / in_dim**0.5)
        for name in ("gram", "gram_val"):
            self.register_buffer(name, torch.zeros(projection, projection, dtype=torch.float64))
        for name in ("cross", "cross_val", "weight"):
            self.register_buffer(name, torch.zeros(projection, num_classes, dtype=torch.float64))
        self._task = None

    @property
    def num_classes(self) -> int:
        return self.cross.shape[1]

    def begin_task(self, head_size: int) -> None:
        grow_buffers(self, ("cross", "cross_val", "weight"), head_size - self.num_classes, dim=1)
        self._task = {k: torch.zeros_like(getattr(self, k)) for k in SUMS}

    def features(self, x) -> torch.Tensor:
        return F.relu(x @ self.projection).double()

    def accumulate(self, x, targets, holdout=None) -> None:
        """This worker's rows, summed over workers at `end_task`; `holdout`: the rows (a mask) that
        choose the ridge strength, else `held_out(x)`. The Gram sums hold their lower triangles until
        `end_task`."""
        phi = self.features(x)
        y = F.one_hot(targets, self.num_classes).double()
        holdout = held_out(x) if holdout is None else holdout.bool()
        for mask, suffix in ((~holdout, ""), (holdout, "_val")):
            rows = phi[mask]
            add_gram(self._task["gram" + suffix], rows)  # in place
            self._task["cross" + suffix] += rows.T @ y[mask]

    def forget(self) -> None:
        """Drops the statistics of earlier tasks (their inputs have changed)."""
        for name in SUMS:
            getattr(self, name).zero_()

    def end_task(self, reduce) -> None:
        for name, delta in self._task.items():
            getattr(self, name).add_(reduce(delta))
        self._task = None
        for name in GRAMS:  # exactly symmetric, so that a checkpoint's triangle restores it bit for bit
            g = getattr(self, name)
            g.copy_(symmetric_from_lower(g))
        eye = torch.eye(self.gram.shape[0], dtype=torch.float64, device=self.gram.device)
        best = None
        for lam in RIDGE_GRID:
            w = torch.linalg.solve(self.gram + lam * eye, self.cross)
            error = (w * (self.gram_val @ w)).sum() - 2 * (w * self.cross_val).sum()  # squared error minus a constant
            if best is None or error < best[0]:
                best = (error, lam)
        self.weight = torch.linalg.solve(self.gram + self.gram_val + best[1] * eye, self.cross + self.cross_val)

    def forward(self, x):
        return (self.features(x) @ self.weight).float()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        i, j = torch.triu_indices(*self.gram.shape)
        for name in GRAMS:
            destination[prefix + name] = destination[prefix + name][i, j]

    def _load_from_state_dict(self, state_dict, prefix, *args):
        state_dict.pop(prefix + "ridge", None)  # the chosen strength, kept by checkpoints from before
        n = self.gram.shape[0]
        i, j = torch.triu_indices(n, n)
        for name in GRAMS:
            packed = state_dict.get(prefix + name)
            if packed is not None and packed.dim() == 1:  # (a full matrix: a checkpoint from before)
                full = packed.new_zeros(n, n)
                full[i, j] = packed
                full[j, i] = packed
                state_dict[prefix + name] = full
        super()._load_from_state_dict(state_dict, prefix, *args)


class RidgeHead(ContinualModel):
    def __init__(self, modality_dims: dict[str, int], num_classes: int = 0, projection: int = 2048):
        super().__init__(modality_dims)
        self.ridge = RidgeStatistics(sum(modality_dims.values()), projection, num_classes)

    @property
    def head_size(self) -> int:
        return self.ridge.num_classes

    def begin_task(self, head_size: int) -> None:
        self.ridge.begin_task(head_size)

    def accumulate(self, features, present, targets, holdout=None) -> None:
        self.ridge.accumulate(self.pooled(features, present), targets, holdout)

    def end_task(self, reduce) -> None:
        self.ridge.end_task(reduce)

    def forward(self, features, present):
        return {"logits": self.ridge(self.pooled(features, present))}


class PrototypeHead(ContinualModel):
    def __init__(self, modality_dims: dict[str, int], num_classes: int = 0):
        super().__init__(modality_dims)
        dim = sum(modality_dims.values())
        self.register_buffer("sums", torch.zeros(num_classes, dim, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.float64))
        self._task = None

    @property
    def head_size(self) -> int:
        return self.sums.shape[0]

    def begin_task(self, head_size: int) -> None:
        grow_buffers(self, ("sums", "counts"), head_size - self.head_size, dim=0)
        self._task = (torch.zeros_like(self.sums), torch.zeros_like(self.counts))

    def accumulate(self, features, present, targets, holdout=None) -> None:
        x = self.pooled(features, present).double()
        self._task[0].index_add_(0, targets, x)
        self._task[1].index_add_(0, targets, torch.ones_like(targets, dtype=torch.float64))

    def end_task(self, reduce) -> None:
        self.sums.add_(reduce(self._task[0]))
        self.counts.add_(reduce(self._task[1]))
        self._task = None

    def forward(self, features, present):
        prototypes = F.normalize((self.sums / self.counts.clamp_min(1)[:, None]).float(), dim=-1)
        return {"logits": F.normalize(self.pooled(features, present), dim=-1) @ prototypes.T}
