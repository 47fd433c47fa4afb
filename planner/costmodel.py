"""Per-layer time and memory of one transformer layer unit for a (tp, sp, micro-batch) choice.

Two sources give the same LayerCost records:
- AnalyticCosts: FLOPs at a shape-dependent GEMM efficiency plus element-wise memory traffic at HBM bandwidth
  (a roofline), for hardware known from datasheets;
- ProfiledCosts (planner/profiled.py): measured by `mpplan profile` on the machine at hand.
Communication is priced separately over the topology (planner/topology.py) by planner/estimate.py.

Every constant below is physical and the same for every model and cluster; where it comes from is said beside it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping

from planner.specs import GPUSpec, ModelSpec, Recompute, TrainSpec


@dataclass(frozen=True)
class RuntimeTraits:
    """What the training framework does that changes time and memory. The default is mpplan's own runtime
    (torch 2.13: fused SDPA attention, no dropout, DDP/FSDP overlapping gradient reduction with backward)."""

    flash_attention: bool = True
    """Fused attention never materialises the s x s scores (Dao et al. 2022) and skips the masked half."""
    dropout: bool = False
    """Dropout masks are saved for backward (Korthikanti et al. 2022 count them; mpplan's model has none)."""
    overlap_grad_reduce: bool = True
    """Data-parallel gradient reduction runs during the last micro-batch's backward."""
    grad_reduce_bytes: int = 0
    """Bytes per gradient element on the wire; 0 = the training precision's grad bytes."""
    torch_distributed: bool = True
    """Pipelines and ZeRO 2/3 run on torch.distributed.pipelining and FSDP2, with what they hold (receive buffers
    per micro-batch, gathered weights, unsharded gradients; planner/memory.py) and gradients set to None between
    steps outside DDP. False: a framework that receives into fresh tensors and keeps its gradient buffers."""


# Megatron-LM as it ran Table 1 of Narayanan et al. 2021 (arXiv 2104.04473): unfused softmax attention with
# dropout 0.1, no overlap of the data-parallel all-reduce with backward (--overlap-grad-reduce came in 2023), and
# its own p2p and contiguous gradient buffers.
MEGATRON_2021 = RuntimeTraits(flash_attention=False, dropout=True, overlap_grad_reduce=False,
                              torch_distributed=False)

# --- GEMM efficiency ------------------------------------------------------------------------------------------
# Achieved fraction of the tensor-core peak for a GEMM of shape (M x K) @ (K x N): large GEMMs reach about 85 % at
# boost clock (cuBLAS bf16 on A100 peaks at 260-280 of 312 TFLOP/s, NVIDIA's "Matrix multiplication background"
# guide), and sustained training holds the A100 near 1.28 of its 1.41 GHz under the 400 W cap (x 0.91):
# 0.85 x 0.91 = 0.77. Each dimension d loses efficiency as d / (d + GEMM_HALF_DIM) once tiles stop filling the 108-132 SMs and
# K-loops get short. GEMM_HALF_DIM = 64 is half of the 128-wide tensor-core tile that cuBLAS uses for large GEMMs.
GEMM_MAX_EFFICIENCY = 0.77
GEMM_HALF_DIM = 64
# Memory-bound kernels (norms, activations, softmax, dropout, residual adds) reach ~80 % of HBM bandwidth
# (STREAM-like copy on A100: 1.6-1.7 of 2.0 TB/s).
HBM_EFFICIENCY = 0.8
# Fused (flash) attention runs its two GEMMs at ~60 % of peak on the causal half (FlashAttention-2, Dao 2023,
# fig. 5: 190-230 TFLOP/s fwd+bwd of 312 on A100 for head dim 128).
FLASH_EFFICIENCY = 0.6


def gemm_efficiency(m: float, n: float, k: float) -> float:
    eff = GEMM_MAX_EFFICIENCY
    for d in (m, n, k):
        eff *= d / (d + GEMM_HALF_DIM)
    return eff


@dataclass(frozen=True)
class LayerCost:
    """One layer unit (embedding, block or head) on one TP rank for one micro-batch."""

    fwd_s: float
    bwd_s: float
    recompute_extra_s: Mapping[Recompute, float] = field(default_factory=dict)
    """Extra backward-time work of each recompute mode (the forward it redoes)."""
    params: int = 0
    """Parameters held by one TP rank."""
    act_bytes: Mapping[Recompute, float] = field(default_factory=dict)
    """Activation bytes saved for backward per micro-batch, for each recompute mode."""
    tp_comm_bytes: float = 0.0
    """Bytes of one TP collective (all-reduce, or all-gather + reduce-scatter with SP); count in tp_collectives."""
    tp_collectives: int = 0
    """TP collectives in forward (backward has as many; full recompute repeats the forward's)."""

    def time_s(self, mode: Recompute = Recompute.NONE) -> float:
        return self.fwd_s + self.bwd_s + self.recompute_extra_s.get(mode, 0.0)


def block_activation_bytes(model: ModelSpec, mbs: int, tp: int, sp: bool, elem_bytes: int,
                           dropout: bool, flash: bool) -> dict[Recompute, float]:
    """Saved activations of one block per micro-batch on one TP rank, generalising Korthikanti et al. 2022
    (arXiv 2205.05198) Table 2 to grouped-query attention, SwiGLU and fused attention. With GPT shapes, 16-bit
    activations and dropout it reproduces the table: sbh(10 + 24/t + 5as/(ht)) without SP, sbh/t(34 + 5as/h)
    with SP, the 5as/h term dropped by selective recompute, and 2sbh (2sbh/t with SP) under full recompute."""
    s, b, h, f, kv, a, t = model.seq_len, mbs, model.hidden_size, model.ffn, model.kv_dim, model.num_heads, tp
    e, mask = elem_bytes, (1 if dropout else 0)
    sbh = s * b * h
    replicated = sbh / t if sp else sbh  # tensors outside the TP region: sharded by SP, else whole on every rank
    # attention: norm input, QKV input (norm output), Q and K, V, output-projection input, residual dropout mask
    attn = e * replicated * 2 + e * s * b * (h + kv) / t + e * s * b * kv / t + e * sbh / t + mask * replicated
    # scores (a*s*s*b each): the softmax output, and with dropout its mask and the dropped-out copy that feeds
    # the PV product; fused attention keeps only its output and the log-sum-exp
    scores = 0.0 if flash else (e + (e + mask) * mask) * a * s * s * b / t
    lse = 4 * a * s * b / t if flash else 0.0
    # MLP: norm input, fc1 input, then GELU input + fc2 input (GPT) or gate, up, product (SwiGLU), dropout mask
    mlp_inner = (2 if model.flavour == "gpt2" else 3) * e * s * b * f / t
    mlp = e * replicated * 2 + mlp_inner + mask * replicated
    none = attn + scores + lse + mlp
    return {Recompute.NONE: none, Recompute.SELECTIVE: none - scores, Recompute.FULL: e * replicated}


class AnalyticCosts:
    """Roofline costs of layer units on a datasheet GPU."""

    source = "analytic"
    # What the training framework adds around the layers. A profile measures these on the machine at hand
    # (planner/profiled.py); for datasheet hardware they are folded into the efficiencies above.
    step_overhead_s = 0.0
    optimizer_s_per_param = 0.0
    runtime_fixed_bytes = 0
    collective_after_compute_s = 0.0
    ddp_bucket_after_compute_s: float | None = None

    def layer_overhead_fraction(self, mbs: int) -> float:
        """What a whole-model micro-batch adds to its layers, as a share of them (measured by a profile)."""
        return 0.0

    def available(self, tp: int, sp: bool, mbs: int) -> str | None:
        return None

    def fsdp_block_extra_s(self, zero: int, dp: int, mbs: int) -> float | None:
        """Measured per-block, per-micro-batch cost of ZeRO 2 / 3's wrapper (a profile's); None: price the
        gathers from the collective model."""
        return None

    def pipeline_transfer_s(self, nbytes: float, schedule: str) -> float | None:
        """Measured cost of one pipeline hand-off of ``nbytes`` (a profile's); None: price it as a send_recv."""
        return None

    def __init__(self, model: ModelSpec, gpu: GPUSpec, train: TrainSpec, traits: RuntimeTraits = RuntimeTraits()):
        self.model, self.gpu, self.train, self.traits = model, gpu, train, traits
        self.elem_bytes = train.weight_bytes  # activations in the training precision
        self.block = lru_cache(maxsize=None)(self._block)
        self.head = lru_cache(maxsize=None)(self._head)
        self.embedding = lru_cache(maxsize=None)(self._embedding)

    # -- helpers
    def _gemm_s(self, m: float, n: float, k: float, batch: float = 1.0) -> float:
        return 2.0 * m * n * k * batch / (self.gpu.peak_tflops * 1e12 * gemm_efficiency(m, n, k))

    def memory_time_s(self, nbytes: float) -> float:
        return nbytes / (self.gpu.hbm_GBps * 1e9 * HBM_EFFICIENCY)

    def _attention_core_fwd_s(self, mbs: int, tp: int) -> float:
        m, s = self.model, self.model.seq_len
        heads = m.num_heads / tp
        if self.traits.flash_attention:
            # QK^T and PV over the causal half only
            return 2.0 * 2 * mbs * heads * s * s * m.head_dim / 2 / (self.gpu.peak_tflops * 1e12 * FLASH_EFFICIENCY)
        gemms = 2 * self._gemm_s(s, s, m.head_dim, batch=mbs * heads)
        # scale+mask+softmax reads and writes the scores; dropout reads, writes and stores a 1-byte mask
        e, mask = self.elem_bytes, (1 if self.traits.dropout else 0)
        traffic = mbs * heads * s * s * (2 * e + (2 * e + mask if self.traits.dropout else 0))
        return gemms + self.memory_time_s(traffic)

    # -- layer units
    def _block(self, tp: int, sp: bool, mbs: int) -> LayerCost:
        m, e = self.model, self.elem_bytes
        tokens, h, f, kv = mbs * m.seq_len, m.hidden_size, m.ffn, m.kv_dim
        up_projections = 1 if m.flavour == "gpt2" else 2  # fc1, or SwiGLU's gate and up
        gemms = (self._gemm_s(tokens, (h + 2 * kv) / tp, h)                 # QKV (column-parallel)
                 + self._gemm_s(tokens, h, h / tp)                            # output projection (row-parallel)
                 + up_projections * self._gemm_s(tokens, f / tp, h)          # fc1 / gate + up
                 + self._gemm_s(tokens, h, f / tp))                           # fc2 / down
        # element-wise traffic (read + write) per forward: two norms and two residual adds on the (SP-sharded or
        # replicated) hidden state, the MLP activation on the ffn width, RoPE on Q and K (Llama)
        rep = tokens * h / tp if sp else tokens * h
        elementwise = e * (2 * 2 * rep + 2 * 3 * rep + 2 * tokens * f / tp * (1 if m.flavour == "gpt2" else 1.5))
        if m.flavour == "llama":
            elementwise += e * 2 * tokens * (h + kv) / tp
        if self.traits.dropout:  # two bias-dropout-adds: read, write, 1-byte mask
            elementwise += 2 * (2 * e + 1) * rep
        core = self._attention_core_fwd_s(mbs, tp)
        fwd = gemms + self.memory_time_s(elementwise) + core
        # backward: two GEMMs (input and weight grads) per forward GEMM; element-wise work about doubles
        bwd = 2 * fwd
        acts = block_activation_bytes(m, mbs, tp, sp, e, self.traits.dropout, self.traits.flash_attention)
        params = m.block_params // tp if tp > 1 else m.block_params
        # Megatron TP (Shoeybi et al. 2019, fig. 3): two all-reduces of the hidden state per block in forward
        # (sequence parallel: two all-gathers + two reduce-scatters of the same volume, Korthikanti et al. sec. 4.2)
        return LayerCost(fwd_s=fwd, bwd_s=bwd,
                         recompute_extra_s={Recompute.NONE: 0.0, Recompute.SELECTIVE: core, Recompute.FULL: fwd},
                         params=params, act_bytes=acts, tp_comm_bytes=e * tokens * h, tp_collectives=2 if tp > 1 else 0)

    def _head(self, tp: int, sp: bool, mbs: int) -> LayerCost:
        m, e = self.model, self.elem_bytes
        tokens, h, v = mbs * m.seq_len, m.hidden_size, m.vocab_size
        rep = tokens * h / tp if sp else tokens * h
        proj = self._gemm_s(tokens, v / tp, h)
        # norm, then cross-entropy: logits cast to fp32, log-softmax read/written (vocab-parallel with TP)
        traffic = e * 2 * rep + (e + 4 * 3) * tokens * v / tp
        fwd = proj + self.memory_time_s(traffic)
        acts = e * rep * 2 + (e + 4) * tokens * v / tp  # norm input, proj input, logits + fp32 log-probs
        params = (m.head_params - (m.hidden_size if m.flavour == "llama" else 2 * m.hidden_size)) // tp + (
            m.hidden_size if m.flavour == "llama" else 2 * m.hidden_size)
        return LayerCost(fwd_s=fwd, bwd_s=2 * fwd, params=params, act_bytes={Recompute.NONE: acts},
                         tp_comm_bytes=e * tokens * h, tp_collectives=1 if tp > 1 else 0)

    def _embedding(self, tp: int, sp: bool, mbs: int) -> LayerCost:
        m, e = self.model, self.elem_bytes
        tokens, h = mbs * m.seq_len, m.hidden_size
        traffic = e * tokens * h * (3 if m.flavour == "gpt2" else 1)  # gather rows (+ add positions)
        fwd = self.memory_time_s(traffic)
        acts = (tokens * h / (tp if sp else 1)) if self.traits.dropout else 0.0  # only the dropout mask
        params = m.vocab_size * h // tp + (m.seq_len * h if m.flavour == "gpt2" else 0)
        # vocab-parallel embedding ends in one all-reduce (reduce-scatter with SP) of the hidden state
        return LayerCost(fwd_s=fwd, bwd_s=2 * fwd, params=params, act_bytes={Recompute.NONE: acts},
                         tp_comm_bytes=e * tokens * h, tp_collectives=1 if tp > 1 else 0)


def model_flops_per_step(model: ModelSpec, global_batch: int) -> float:
    """Model FLOPs of one training step, recompute not counted: 6 N per token for the weights (Kaplan et al.
    2020) plus causal-unaware attention 12 * L * h * s per token (Chowdhery et al. 2022, PaLM, appendix B)."""
    tokens = global_batch * model.seq_len
    n = model.total_params - model.embedding_params + (model.vocab_size * model.hidden_size if model.tie_embeddings else 0)
    return tokens * (6.0 * n + 12.0 * model.num_layers * model.hidden_size * model.seq_len)


def megatron_flops_per_step(model: ModelSpec, global_batch: int) -> float:
    """Narayanan et al. 2021 eq. (3), which counts full recomputation's extra forward:
    96 B s l h^2 (1 + s/(6h) + V/(16 l h))."""
    b, s, l, h, v = global_batch, model.seq_len, model.num_layers, model.hidden_size, model.vocab_size
    return 96.0 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))
