"""MMEncoder: per-modality projection, cross-modality attention and a mixture-of-experts adapter FFN."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Expert(nn.Module):
    """Bottleneck FFN d -> r -> d."""

    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.up(F.gelu(self.down(x)))


class MoEAdapter(nn.Module):
    """Top-k routed bottleneck experts with noisy gating while training; returns the mixture (no residual).

    Keeps a running routing mass per expert (`routing_mass`) so that the expert lifecycle can
    score each expert's influence on a task, and a `frozen` mask that the trainer turns into
    `requires_grad=False` on the frozen experts.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, bottleneck: int, noise: float = 1.0):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.top_k, self.noise = top_k, noise
        self.experts = nn.ModuleList(Expert(dim, bottleneck) for _ in range(num_experts))
        self.router = nn.Linear(dim, num_experts)
        self.register_buffer("frozen", torch.zeros(num_experts, dtype=torch.bool))
        self.register_buffer("routing_mass", torch.zeros(num_experts))
        self.balance_loss = torch.zeros(())

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def add_experts(self, n: int) -> None:
        """Appends `n` new (trainable, zero-output) experts and their router rows."""
        if n <= 0:
            return
        dim, bottleneck = self.router.in_features, self.experts[0].down.out_features
        device = self.router.weight.device
        self.experts.extend(Expert(dim, bottleneck).to(device) for _ in range(n))
        router = nn.Linear(dim, self.num_experts).to(device)
        with torch.no_grad():
            router.weight[:-n] = self.router.weight
            router.bias[:-n] = self.router.bias
            router.weight[-n:].normal_(0, 0.02)
            router.bias[-n:] = self.router.bias.mean()
        self.router = router
        self.frozen = torch.cat([self.frozen, self.frozen.new_zeros(n)])
        self.routing_mass = torch.cat([self.routing_mass, self.routing_mass.new_zeros(n)])

    def route(self, x):
        """Gates (N, E) with exactly top_k non-zeros per row, and the full softmax probabilities."""
        logits = self.router(x)
        if self.training and self.noise > 0:
            logits = logits + torch.randn_like(logits) * self.noise / self.num_experts
        probs = logits.softmax(-1)
        top_val, top_idx = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top_idx, top_val / top_val.sum(-1, keepdim=True))
        return gates, probs

    def forward(self, x, mask=None):
        """x: (N, d) tokens; mask: (N,) bool, True where the token is real."""
        gates, probs = self.route(x)
        if mask is not None:
            gates = gates * mask[:, None]
            probs = probs * mask[:, None]
        n = probs.new_tensor(max(1.0, float(mask.sum()) if mask is not None else x.shape[0]))
        # Switch-style load balancing: fraction routed x mean probability, E * sum -> 1 when uniform.
        frac = (gates > 0).float().sum(0) / (n * self.top_k)
        self.balance_loss = self.num_experts * (frac * probs.sum(0) / n).sum()
        if self.training:
            self.routing_mass += gates.detach().sum(0)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = gates[:, e].nonzero(as_tuple=True)[0]
            if rows.numel():
                out = out.index_add(0, rows, (gates[rows, e, None] * expert(x[rows])).to(out.dtype))  # bf16 autocast
            elif self.training:
                # A zero gradient for an expert no token chose, so that data-parallel workers
                # (DeepSpeed's gradient buckets) always reduce the same set of parameters.
                out = out + 0.0 * sum(p.sum() for p in expert.parameters())
        return out


class CrossModalBlock(nn.Module):
    """Each modality's tokens attend to every other modality's tokens; then the MoE adapter."""

    def __init__(self, dim, heads, num_experts, top_k, bottleneck, dropout=0.0):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim)
        self.moe = MoEAdapter(dim, num_experts, top_k, bottleneck)

    def forward(self, tokens, token_modality, present):
        """tokens (B, L, d); token_modality (L,) modality index per token; present (B, M) bool."""
        b, length, d = tokens.shape
        token_present = present[:, token_modality]  # (B, L)
        same = token_modality[:, None] == token_modality[None, :]  # (L, L): attend only across
        blocked = same[None] | ~token_present[:, None, :]  # (B, L, L)
        # A token with no other modality present has nothing to attend to: let it see itself.
        blocked = blocked & ~(blocked.all(-1, keepdim=True) & torch.eye(length, dtype=torch.bool, device=tokens.device))
        q = self.norm_q(tokens)
        attended, _ = self.attn(q, q, q, attn_mask=blocked.repeat_interleave(self.attn.num_heads, 0), need_weights=False)
        tokens = tokens + attended * token_present[..., None]
        flat = self.norm_ffn(tokens).reshape(b * length, d)
        return tokens + self.moe(flat, token_present.reshape(-1)).reshape(b, length, d)


class MMEncoder(nn.Module):
    """Projects each modality to d, adds a modality embedding, runs K cross-modal MoE blocks.

    Returns per-modality pooled vectors z_m (B, M, d) and the fused vector z (B, d): the mean of
    the present modalities.
    """

    def __init__(self, modality_dims: dict[str, int], dim=128, blocks=2, heads=4, num_experts=4,
                 top_k=2, bottleneck=32, dropout=0.1):
        super().__init__()
        self.modalities = list(modality_dims)
        self.proj = nn.ModuleDict({m: nn.Sequential(nn.Linear(k, dim), nn.LayerNorm(dim), nn.Dropout(dropout))
                                   for m, k in modality_dims.items()})
        self.modality_embed = nn.Parameter(torch.randn(len(self.modalities), dim) * 0.02)
        self.blocks = nn.ModuleList(CrossModalBlock(dim, heads, num_experts, top_k, bottleneck, dropout)
                                    for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)

    @property
    def moe_layers(self) -> list[MoEAdapter]:
        return [blk.moe for blk in self.blocks]

    def forward(self, features: dict[str, torch.Tensor], present: torch.Tensor):
        """features: modality -> (B, D_m) or (B, L_m, D_m); present (B, M) bool."""
        toks, owner = [], []
        for i, m in enumerate(self.modalities):
            x = features[m]
            x = x[:, None] if x.dim() == 2 else x
            toks.append(self.proj[m](x) + self.modality_embed[i])
            owner += [i] * x.shape[1]
        tokens = torch.cat(toks, 1)
        token_modality = torch.tensor(owner, device=tokens.device)
        for blk in self.blocks:
            tokens = blk(tokens, token_modality, present)
        tokens = self.norm(tokens)
        onehot = F.one_hot(token_modality, len(self.modalities)).float()  # (L, M)
        z_m = torch.einsum("bld,lm->bmd", tokens, onehot) / onehot.sum(0)[None, :, None]
        w = present.float()
        z = (z_m * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)
        return z_m, z

    def balance_loss(self):
        return sum(moe.balance_loss for moe in self.moe_layers) / len(self.blocks)
