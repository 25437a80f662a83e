"""Baselines on the cmoe network: EWC (a Fisher-weighted pull to earlier tasks' weights) and
experience replay (a fixed-size, class-balanced buffer of earlier rows' frozen features)."""
import torch
import torch.nn.functional as F

from models.methods.cmoe import CMoE


class EWC(CMoE):
    """Elastic weight consolidation (Kirkpatrick et al. 2017), online form: the diagonal empirical
    Fisher of every task so far, summed, anchors the shared weights (not the growing head)."""
    accumulate_needs_grad = True
    loss_terms = (*CMoE.loss_terms, "ewc")

    def __init__(self, modality_dims, num_classes=0, **kwargs):
        super().__init__(modality_dims, num_classes, **kwargs)
        size = sum(p.numel() for p in self._shared())
        self.register_buffer("fisher", torch.zeros(size))
        self.register_buffer("anchor", torch.zeros(size))
        self._task = None

    def _shared(self):
        return list(self.encoder.parameters())

    def _flat(self):
        return torch.cat([p.reshape(-1) for p in self._shared()])

    def begin_task(self, head_size):
        super().begin_task(head_size)
        self._task = [torch.zeros_like(self.fisher), torch.zeros(())]

    def objective(self, features, present, targets, w, old_model=None, seen_before=0):
        total, terms = super().objective(features, present, targets, w, old_model, seen_before)
        if w.ewc and bool(self.fisher.any()):
            penalty = (self.fisher * (self._flat() - self.anchor).pow(2)).sum()
            terms["ewc"] = penalty.item()
            total = total + w.ewc * penalty
        return total, terms

    def accumulate(self, features, present, targets, holdout=None):
        params = self._shared()
        trainable = [p for p in params if p.requires_grad]  # frozen experts contribute zeros
        loss = F.cross_entropy(self(features, present)["logits"], targets, reduction="sum")
        grads = dict(zip(map(id, trainable), torch.autograd.grad(loss, trainable, allow_unused=True)))
        flat = torch.cat([(grads.get(id(p)) if grads.get(id(p)) is not None else torch.zeros_like(p)).reshape(-1)
                          for p in params])
        self._task[0] += flat.pow(2) / max(len(targets), 1)  # per-batch mean gradient, squared, times batch size
        self._task[1] += len(targets)

    def end_task(self, reduce):
        super().end_task(reduce)
        fisher, rows = reduce(self._task[0]), reduce(self._task[1])
        self.fisher += fisher / rows.clamp_min(1) * 32  # per-row Fisher, scaled to a batch of 32
        self.anchor.copy_(self._flat().detach())
        self._task = None


class Replay(CMoE):
    """Each batch is joined by as many rows drawn from a buffer of `memory` earlier rows, kept
    class-balanced: after each task every seen class holds memory // classes of them."""

    def __init__(self, modality_dims, num_classes=0, memory: int = 200, **kwargs):
        super().__init__(modality_dims, num_classes, **kwargs)
        self.memory = memory
        for m in self.modalities:
            self.register_buffer(f"mem_{m}", torch.zeros(0))
        self.register_buffer("mem_present", torch.zeros(0, len(self.modalities), dtype=torch.bool))
        self.register_buffer("mem_targets", torch.zeros(0, dtype=torch.long))
        self._task = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in [f"mem_{m}" for m in self.modalities] + ["mem_present", "mem_targets"]:  # sized by the data
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def begin_task(self, head_size):
        super().begin_task(head_size)
        self._task = []

    def objective(self, features, present, targets, w, old_model=None, seen_before=0):
        if len(self.mem_targets):
            pick = torch.randint(len(self.mem_targets), (len(targets),), device=targets.device)
            features = {m: torch.cat([x, getattr(self, f"mem_{m}")[pick].reshape(-1, *x.shape[1:])])
                        for m, x in features.items()}
            present = torch.cat([present, self.mem_present[pick]])
            targets = torch.cat([targets, self.mem_targets[pick]])
        return super().objective(features, present, targets, w, old_model, seen_before)

    def accumulate(self, features, present, targets, holdout=None):
        self._task.append(({m: x.reshape(len(x), -1) for m, x in features.items()}, present, targets))

    def end_task(self, reduce):
        super().end_task(reduce)
        new = {m: torch.cat([b[0][m] for b in self._task]) for m in self.modalities}
        new_present = torch.cat([b[1] for b in self._task])
        new_targets = torch.cat([b[2] for b in self._task])
        if len(self.mem_targets):
            new = {m: torch.cat([getattr(self, f"mem_{m}"), x]) for m, x in new.items()}
            new_present = torch.cat([self.mem_present, new_present])
            new_targets = torch.cat([self.mem_targets, new_targets])
        classes = new_targets.unique()
        quota = max(1, self.memory // len(classes))
        generator = torch.Generator().manual_seed(len(classes))
        keep = torch.cat([rows[torch.randperm(len(rows), generator=generator)[:quota]]
                          for c in classes for rows in [torch.nonzero(new_targets == c).flatten()]])
        for m, x in new.items():
            setattr(self, f"mem_{m}", x[keep].clone())
        self.mem_present, self.mem_targets = new_present[keep].clone(), new_targets[keep].clone()
        self._task = None
