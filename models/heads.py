import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class CosineClassifier(nn.Module):
    """Cosine-similarity logits with a learned scale; `grow` appends rows for new classes."""

    def __init__(self, dim: int, num_classes: int = 0, scale: float = 16.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.normal_(self.weight, std=1 / math.sqrt(dim))
        self.log_scale = nn.Parameter(torch.full((1,), math.log(scale)))  # 1-d: DeepSpeed broadcasts bytes

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def grow(self, num_new: int) -> None:
        if num_new <= 0:
            return
        new = torch.randn(num_new, self.weight.shape[1], device=self.weight.device) / math.sqrt(self.weight.shape[1])
        self.weight = nn.Parameter(torch.cat([self.weight.data, new]))

    def forward(self, z):
        return self.log_scale.exp() * F.normalize(z, dim=-1) @ F.normalize(self.weight, dim=-1).T
