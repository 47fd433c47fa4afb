"""Built-in models, GPUs and clusters. Shapes and datasheet numbers are cited beside each entry."""
from __future__ import annotations

from planner.specs import ClusterSpec, GPUSpec, InterNodeLink, IntraNodeLink, ModelSpec


def _gpt3(name: str, layers: int, hidden: int, heads: int) -> ModelSpec:
    # GPT-3 shapes: Brown et al. 2020 (arXiv 2005.14165) Table 2.1; vocab padded to 51200 and seq 2048 as in
    # Megatron-LM (Narayanan et al. 2021, arXiv 2104.04473); GELU MLP of 4h, untied head as Megatron trains it.
    return ModelSpec(name=name, flavour="gpt2", num_layers=layers, hidden_size=hidden, num_heads=heads,
                     vocab_size=51200, seq_len=2048)


def _llama3(name: str, layers: int, hidden: int, ffn: int, heads: int) -> ModelSpec:
    # Llama 3 shapes: Grattafiori et al. 2024 (arXiv 2407.21783) Table 3: 8 KV heads, vocab 128256, seq 8192.
    return ModelSpec(name=name, flavour="llama", num_layers=layers, hidden_size=hidden, num_heads=heads,
                     num_kv_heads=8, ffn_hidden_size=ffn, vocab_size=128256, seq_len=8192)


MODELS: dict[str, ModelSpec] = {m.name: m for m in [
    _gpt3("gpt3-1.3b", 24, 2048, 16),
    _gpt3("gpt3-2.7b", 32, 2560, 32),
    _gpt3("gpt3-6.7b", 32, 4096, 32),
    _gpt3("gpt3-13b", 40, 5120, 40),  # the paper's table prints d_model 5140; 40 heads x 128 = 5120 as trained
    _gpt3("gpt3-175b", 96, 12288, 96),
    _llama3("llama3-8b", 32, 4096, 14336, 32),
    _llama3("llama3-70b", 80, 8192, 28672, 64),
    _llama3("llama3-405b", 126, 16384, 53248, 128),
    # Small enough to train on a few CPU ranks in seconds: byte-level vocab (so any text file is data),
    # 8 blocks so pipelines of 2, 4 and 8 stages have work on every stage.
    ModelSpec(name="tiny-gpt", flavour="gpt2", num_layers=8, hidden_size=64, num_heads=4,
              vocab_size=256, seq_len=64),
    ModelSpec(name="tiny-llama", flavour="llama", num_layers=8, hidden_size=64, num_heads=4, num_kv_heads=2,
              ffn_hidden_size=176, vocab_size=256, seq_len=64),
]}

GPUS: dict[str, GPUSpec] = {g.name: g for g in [
    # Dense bf16 tensor-core peak and HBM bandwidth from NVIDIA's A100 / H100 / H200 datasheets.
    GPUSpec(name="a100-40g", peak_tflops=312, memory_gb=40, hbm_GBps=1555),
    GPUSpec(name="a100-80g", peak_tflops=312, memory_gb=80, hbm_GBps=2039),
    GPUSpec(name="h100-sxm", peak_tflops=989, memory_gb=80, hbm_GBps=3350),
    GPUSpec(name="h200", peak_tflops=989, memory_gb=141, hbm_GBps=4800),
    # One CPU rank of the `local` cluster. Placeholder rates: plans for `local` take their costs from a
    # measured profile (`mpplan profile`), which replaces these.
    GPUSpec(name="cpu", peak_tflops=0.05, memory_gb=4, hbm_GBps=10),
]}

CLUSTERS: dict[str, ClusterSpec] = {c.name: c for c in [
    # DGX A100: NVLink3 via NVSwitch, 600 GB/s bidirectional = 300 GB/s per direction per GPU;
    # 8 x HDR 200 Gb/s ConnectX-6 compute NICs, one per GPU.
    ClusterSpec(name="dgx-a100", gpu=GPUS["a100-80g"], gpus_per_node=8,
                intra_node=IntraNodeLink(bandwidth_GBps=300, latency_us=3),
                inter_node=InterNodeLink(nics_per_node=8, nic_Gbps=200, latency_us=5)),
    # DGX H100: NVLink4, 900 GB/s bidirectional = 450 per direction; 8 x NDR 400 Gb/s ConnectX-7.
    ClusterSpec(name="dgx-h100", gpu=GPUS["h100-sxm"], gpus_per_node=8,
                intra_node=IntraNodeLink(bandwidth_GBps=450, latency_us=3),
                inter_node=InterNodeLink(nics_per_node=8, nic_Gbps=400, latency_us=5)),
    # This host's CPU ranks talking gloo over loopback; all ranks form one "node". Rates are placeholders
    # that a profile's fitted collective costs replace.
    ClusterSpec(name="local", gpu=GPUS["cpu"], gpus_per_node=256,
                intra_node=IntraNodeLink(bandwidth_GBps=1.0, latency_us=50),
                inter_node=InterNodeLink(nics_per_node=1, nic_Gbps=10, latency_us=100)),
]}
