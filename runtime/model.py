"""A decoder-only transformer built from the planner's ModelSpec: GPT-2 or Llama flavour.

Blocks live in ``layers``, a ModuleDict keyed by the block's global index, so a pipeline stage that keeps blocks
12..23 still names them ``layers.12`` ... and checkpoints stay portable between plans. Weights are initialised
per module from (seed, module name), so a stage built alone holds exactly the weights of the same blocks in the
full model: the one-process reference and every plan start from the same point.

Attention and MLP projections are separate Linear layers (q/k/v/o, fc1/fc2 or gate/up/down) so tensor parallel
can shard them column-/row-wise by name; the attention reads its local head count from the projection's output
width, so the same code runs on a TP shard.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from planner.specs import ModelSpec, Recompute


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope_tables(seq_len: int, head_dim: int, base: float = 500000.0) -> tuple[torch.Tensor, torch.Tensor]:
    # Rotary embeddings (Su et al. 2021, arXiv 2104.09864); base 500000 as Llama 3.
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (batch, heads, seq, head_dim); rotate pairs (even, odd)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[: x.shape[-2]].to(x.dtype), sin[: x.shape[-2]].to(x.dtype)
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) V with a causal mask; K/V heads repeated for grouped-query attention."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, bias = spec.hidden_size, spec.flavour == "gpt2"
        self.head_dim = spec.head_dim
        self.rope = spec.flavour == "llama"
        self.q_proj = nn.Linear(h, h, bias=bias)
        self.k_proj = nn.Linear(h, spec.kv_dim, bias=bias)
        self.v_proj = nn.Linear(h, spec.kv_dim, bias=bias)
        self.o_proj = nn.Linear(h, h, bias=bias)
        self.selective_recompute = False
        if self.rope:
            cos, sin = rope_tables(spec.seq_len, spec.head_dim)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s = x.shape[0], x.shape[1]
        # local head counts come from the (possibly TP-sharded) projection widths
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        if self.rope:
            q, k = apply_rope(q, self.rope_cos, self.rope_sin), apply_rope(k, self.rope_cos, self.rope_sin)
        if self.selective_recompute and torch.is_grad_enabled():
            out = checkpoint(attention_core, q, k, v, use_reentrant=False)
        else:
            out = attention_core(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, f = spec.hidden_size, spec.ffn
        self.gated = spec.flavour == "llama"
        if self.gated:  # SwiGLU (Shazeer 2020, arXiv 2002.05202)
            self.gate_proj = nn.Linear(h, f, bias=False)
            self.up_proj = nn.Linear(h, f, bias=False)
            self.down_proj = nn.Linear(f, h, bias=False)
        else:
            self.fc1 = nn.Linear(h, f)
            self.fc2 = nn.Linear(f, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def make_norm(spec: ModelSpec) -> nn.Module:
    return nn.LayerNorm(spec.hidden_size) if spec.flavour == "gpt2" else RMSNorm(spec.hidden_size)


class Block(nn.Module):
    """Pre-norm transformer block. ``recompute`` picks what backward recomputes (set_recompute)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.attn_norm = make_norm(spec)
        self.attn = Attention(spec)
        self.mlp_norm = make_norm(spec)
        self.mlp = MLP(spec)
        self.recompute = Recompute.NONE

    def set_recompute(self, mode: Recompute) -> None:
        self.recompute = Recompute(mode)
        self.attn.selective_recompute = self.recompute == Recompute.SELECTIVE

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute == Recompute.FULL and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class Embedding(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.tok = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.pos = nn.Embedding(spec.seq_len, spec.hidden_size) if spec.flavour == "gpt2" else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens)
        if self.pos is not None:
            x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        return x


class Head(nn.Module):
    """Final norm + output projection to vocabulary logits."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.norm = make_norm(spec)
        self.proj = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (targets are the inputs shifted by one, prepared by the data loader)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


class Transformer(nn.Module):
    """The whole model, or one pipeline stage of it: blocks ``layers`` (global indices), with the embedding
    and/or the head when the stage is the first and/or the last."""

    def __init__(self, spec: ModelSpec, layers: range | None = None, embed: bool = True, head: bool = True,
                 seed: int = 0):
        super().__init__()
        self.spec = spec
        layers = range(spec.num_layers) if layers is None else layers
        self.embed = Embedding(spec) if embed else None
        self.layers = nn.ModuleDict({str(i): Block(spec) for i in layers})
        self.head = Head(spec) if head else None
        if spec.tie_embeddings and self.embed is not None and self.head is not None:
            self.head.proj.weight = self.embed.tok.weight
        init_weights(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        for block in self.layers.values():
            x = block(x)
        if self.head is not None:
            x = self.head(x)
        return x

    def set_recompute(self, modes: dict[int, Recompute]) -> None:
        """Recompute mode per global block index (blocks not named keep theirs)."""
        for index, mode in modes.items():
            self.layers[str(index)].set_recompute(mode)


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """GPT-2 style init (normal, std 0.02; residual output projections scaled by 1/sqrt(2L), Radford et al.
    2019), drawn per parameter from a generator seeded by (seed, parameter name) so that any subset of the
    model gets the same values as the full model."""
    num_layers = getattr(model, "spec").num_layers
    for name, param in model.named_parameters():
        gen = torch.Generator().manual_seed(_seed_for(seed, name))
        if name.endswith("bias"):
            param.zero_()
        elif param.dim() == 1:  # norm weights
            param.fill_(1.0)
        else:
            std = 0.02 / math.sqrt(2 * num_layers) if name.endswith(("o_proj.weight", "fc2.weight", "down_proj.weight")) else 0.02
            param.copy_(torch.randn(param.shape, generator=gen) * std)
