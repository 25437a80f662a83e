"""The method's loss terms on plain tensors, and their weights."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossWeights:
    """The weight of each term (0 switches it off) and the temperatures; `loss.*` in the config."""
    ce: float = 1.0
    kd: float = 1.0
    rel: float = 1.0
    align: float = 0.1
    bal: float = 0.01
    ewc: float = 100.0  # the ewc family's penalty weight (no other family reads it)
    kd_temperature: float = 2.0
    align_temperature: float = 0.1


def distillation(new_logits, old_logits, temperature: float = 2.0):
    """KL(old || new) on the old model's classes, softened by `temperature`."""
    n_old = old_logits.shape[1]
    log_p_new = F.log_softmax(new_logits[:, :n_old] / temperature, -1)
    p_old = F.softmax(old_logits / temperature, -1)
    return F.kl_div(log_p_new, p_old, reduction="batchmean") * temperature**2


def relation(new_repr, old_repr):
    """Mean squared difference of the batch's cosine-similarity matrices (..., B, d)."""
    def sim(x):
        x = F.normalize(x, dim=-1)
        return x @ x.transpose(-1, -2)
    return (sim(new_repr) - sim(old_repr)).pow(2).mean()


def alignment(z_m, present, temperature: float = 0.1):
    """Symmetric InfoNCE between every pair of modalities, over samples that have both.

    z_m: (B, M, d); present: (B, M) bool. Returns 0 when no pair has two samples to contrast.
    """
    total, pairs = z_m.new_zeros(()), 0
    m = z_m.shape[1]
    for a in range(m):
        for b in range(a + 1, m):
            both = present[:, a] & present[:, b]
            if both.sum() < 2:
                continue
            za, zb = F.normalize(z_m[both, a], dim=-1), F.normalize(z_m[both, b], dim=-1)
            logits = za @ zb.T / temperature
            target = torch.arange(len(za), device=za.device)
            total = total + (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            pairs += 1
    return total / max(pairs, 1)
