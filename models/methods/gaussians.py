"""Class Gaussians of the standardised frozen features: what stands in for old classes' rows.

One entry per (task, class): the mean of the features the adapter reads (every modality's tokens
flattened and concatenated, absent modalities zero), the top `rank` eigenpairs of their covariance
plus an isotropic rest per modality, and how often each modality was present. The covariance is
sketched in one pass from sums alone, so data-parallel workers all-reduce it: Y = sum_x (x - mu)
(x - mu)^T Omega for a random Omega drawn alike on every worker, then its Nystrom approximation
(Tropp et al., 2017). Frozen features never move, so the entries stay valid while the adapter
learns; samples drawn from them pass through the current adapter.
"""
import torch
import torch.nn as nn

OVERSAMPLE = 2  # sketch width = OVERSAMPLE * rank


class ClassGaussians(nn.Module):
    BUFFERS = ("labels", "counts", "means", "factors", "rest", "presence", "shapes")

    def __init__(self, rank: int, num_modalities: int):
        super().__init__()
        self.rank, self.num_modalities = rank, num_modalities
        self.register_buffer("labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("counts", torch.zeros(0))
        self.register_buffer("means", torch.zeros(0, 0))
        self.register_buffer("factors", torch.zeros(0, rank, 0))  # rows: sqrt(eigenvalue) * eigenvector
        self.register_buffer("rest", torch.zeros(0, 0))  # per entry and modality: std of the remainder
        self.register_buffer("presence", torch.zeros(0, 0))  # per entry and modality: fraction present
        self.register_buffer("shapes", torch.zeros(0, 2, dtype=torch.long))  # per modality: tokens (0: none), width
        self._task = None
        self.replacing = False  # this task's entries replace the earlier ones (see `forget`)
        self._omegas = {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self.BUFFERS:  # entries grow task by task: take the saved shapes
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __len__(self) -> int:
        return len(self.labels)

    def begin_task(self) -> None:
        self._task = {}
        self.replacing = False

    def forget(self) -> None:
        """This task's rows include every earlier task's: its entries replace all earlier ones at
        `end_task` (draws until then still come from the earlier ones)."""
        self.replacing = True

    def _flatten(self, features: dict, present: torch.Tensor) -> torch.Tensor:
        if not len(self.shapes):
            self.shapes = torch.tensor([[x.shape[1] if x.dim() == 3 else 0, x.shape[-1]] for x in features.values()])
        return torch.cat([x.reshape(len(x), -1) * present[:, i, None] for i, x in enumerate(features.values())], 1)

    def _omega(self, dim: int, device) -> torch.Tensor:
        """The sketch's random matrix: the same on every worker and every call."""
        key = (dim, str(device))
        if key not in self._omegas:
            g = torch.Generator().manual_seed(0)
            self._omegas[key] = torch.randn(dim, OVERSAMPLE * self.rank, generator=g, dtype=torch.float64).to(device)
        return self._omegas[key]

    def _blocks(self) -> list[slice]:
        widths = (self.shapes[:, 0].clamp_min(1) * self.shapes[:, 1]).tolist()
        starts = [sum(widths[:i]) for i in range(len(widths))]
        return [slice(s, s + w) for s, w in zip(starts, widths)]

    def accumulate(self, features: dict, present: torch.Tensor, targets: torch.Tensor) -> None:
        """`features`: standardised, modality -> (B, D) or (B, L, D)."""
        x = self._flatten(features, present).double()
        omega = self._omega(x.shape[1], x.device)
        blocks = self._blocks()
        for c in targets.unique().tolist():
            rows, p = x[targets == c], present[targets == c].double()
            sums = self._task.setdefault(c, {
                "n": x.new_zeros(1), "sum": x.new_zeros(x.shape[1]), "sketch": x.new_zeros(x.shape[1], omega.shape[1]),
                "squares": x.new_zeros(len(blocks)), "present": x.new_zeros(len(blocks))})
            sums["n"] += len(rows)
            sums["sum"] += rows.sum(0)
            sums["sketch"] += rows.T @ (rows @ omega)
            sums["squares"] += torch.stack([rows[:, b].pow(2).sum() for b in blocks])
            sums["present"] += p.sum(0)

    def end_task(self, reduce, head_size: int) -> None:
        """Reduces this task's sums over workers (every worker reduces every class of the head, in
        order, whether or not it saw rows of it) and appends one entry per class that had rows."""
        task, self._task = self._task, None
        if self.replacing:  # the feature shapes stay
            for name in self.BUFFERS:
                if name != "shapes":
                    setattr(self, name, getattr(self, name)[:0])
        device = self.means.device
        seen = reduce(torch.tensor([float(c in task) for c in range(head_size)], device=device))
        # A worker that has had no rows yet learns the feature shapes from the others.
        known = torch.cat([torch.ones(1, 2), self.shapes.float().cpu()]) if len(self.shapes) else \
            torch.zeros(1 + self.num_modalities, 2)
        shapes = reduce(known.to(device)).cpu()
        if shapes[0, 0] == 0:
            return
        self.shapes = (shapes[1:] / shapes[0, 0]).round().long()
        blocks = self._blocks()
        dim, m = blocks[-1].stop, len(blocks)
        omega = self._omega(dim, device)
        widths = torch.tensor([b.stop - b.start for b in blocks], dtype=torch.float64, device=device)
        for c in torch.nonzero(seen > 0).flatten().tolist():
            s = task.get(c) or {"n": omega.new_zeros(1), "sum": omega.new_zeros(dim),
                                "sketch": torch.zeros_like(omega), "squares": omega.new_zeros(m),
                                "present": omega.new_zeros(m)}
            s = {k: reduce(v) for k, v in s.items()}
            n = float(s["n"])
            mean = s["sum"] / n
            sketch = s["sketch"] - n * mean[:, None] * (mean @ omega)[None]  # centred: (sum xx^T - n mu mu^T) omega
            values, vectors = self._nystrom(sketch, omega)
            values = values / n  # covariance eigenvalues
            low_rank = torch.stack([(vectors[b].pow(2) * values).sum() for b in blocks])
            total = torch.stack([s["squares"][i] / n - mean[b].pow(2).sum() for i, b in enumerate(blocks)])
            rest = ((total - low_rank).clamp_min(0) / widths).sqrt()
            self._append(c, n, mean, (vectors * values.sqrt()).T, rest, s["present"] / n)

    def _nystrom(self, sketch: torch.Tensor, omega: torch.Tensor):
        """Top `rank` eigenpairs of the PSD matrix A from its sketch A @ omega."""
        core = omega.T @ sketch
        core = (core + core.T) / 2
        b, v = torch.linalg.eigh(core)
        keep = b > b.max().clamp_min(1e-300) * 1e-10
        factor = sketch @ (v[:, keep] / b[keep].sqrt())  # A ~ factor @ factor.T
        u, s, _ = torch.linalg.svd(factor, full_matrices=False)
        values, vectors = s[:self.rank] ** 2, u[:, :self.rank]
        pad = self.rank - len(values)  # fewer directions than the rank (few rows): zeros
        return torch.cat([values, values.new_zeros(pad)]), torch.cat([vectors, vectors.new_zeros(len(vectors), pad)], 1)

    def _append(self, label, n, mean, factor, rest, presence) -> None:
        f = lambda t: t.float()[None]  # noqa: E731
        if not len(self.labels):
            self.means = self.means.new_zeros(0, len(mean))
            self.factors = self.factors.new_zeros(0, self.rank, len(mean))
            self.rest = self.rest.new_zeros(0, len(rest))
            self.presence = self.presence.new_zeros(0, len(presence))
        self.labels = torch.cat([self.labels, self.labels.new_tensor([label])])
        self.counts = torch.cat([self.counts, self.counts.new_tensor([n])])
        self.means = torch.cat([self.means, f(mean)])
        self.factors = torch.cat([self.factors, f(factor)])
        self.rest = torch.cat([self.rest, f(rest)])
        self.presence = torch.cat([self.presence, f(presence)])

    def sample(self, entries: torch.Tensor, modalities: list[str], generator=None):
        """Standardised features (modality -> tensor shaped like the real rows), presence and labels
        of one draw from each given entry."""
        device = self.means.device
        n = len(entries)
        eps = torch.randn(n, self.rank, generator=generator).to(device)
        noise = torch.randn(n, self.means.shape[1], generator=generator).to(device)
        blocks = self._blocks()
        for i, b in enumerate(blocks):
            noise[:, b] *= self.rest[entries, i, None]
        x = self.means[entries] + noise
        for e in entries.unique():
            rows = entries == e
            x[rows] += eps[rows] @ self.factors[e]
        present = torch.rand(n, len(blocks), generator=generator).to(device) < self.presence[entries]
        none = ~present.any(1)
        present[none, self.presence[entries[none]].argmax(1)] = True
        features = {}
        for i, (m, b, (tokens, width)) in enumerate(zip(modalities, blocks, self.shapes.tolist())):
            part = x[:, b] * present[:, i, None]
            features[m] = part.reshape(n, tokens, width) if tokens else part
        return features, present, self.labels[entries]

    def draw(self, n: int) -> torch.Tensor:
        """`n` entries, each as likely as its share of the rows."""
        return torch.multinomial(self.counts.cpu(), n, replacement=True).to(self.counts.device)
