"""Typed, validated specs: the model, the hardware, the cluster and the training run.

Every spec rejects unknown keys (a typo must not silently become a default) and is loaded from a preset name,
a JSON/YAML file of mpplan's own, or (models only) a Hugging Face ``config.json`` read offline.
Units are in the field names: bytes and seconds inside, GB/GiB and ms only when rendering.
"""
from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class SpecError(ValueError):
    """Bad user input: the CLI prints the message as one line and exits 2."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Recompute(StrEnum):
    """Activation recomputation of one transformer block (Korthikanti et al. 2022, arXiv 2205.05198)."""

    NONE = "none"
    SELECTIVE = "selective"  # recompute only the attention core: softmax(QK^T)V, section 5 of the paper
    FULL = "full"  # keep only the block's input, recompute the whole forward in backward


class Precision(StrEnum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class ModelSpec(Strict):
    """A decoder-only transformer. GPT-2 flavour: learned positions, LayerNorm, GELU MLP, biases.
    Llama flavour: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no biases."""

    name: str
    flavour: Literal["gpt2", "llama"]
    num_layers: int = Field(gt=0)
    """Transformer blocks."""
    hidden_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(0, ge=0)
    """Key/value heads (grouped-query attention); 0 means equal to num_heads."""
    ffn_hidden_size: int = Field(0, ge=0)
    """MLP inner width; 0 means 4 x hidden (GPT) or must be given (Llama)."""
    vocab_size: int = Field(gt=0)
    seq_len: int = Field(gt=0)
    tie_embeddings: bool = False

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.kv_heads > self.num_heads or self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.kv_heads}")
        if self.flavour == "llama" and self.ffn_hidden_size == 0:
            raise ValueError("ffn_hidden_size is required for a llama-flavour model")
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def block_params(self) -> int:
        h, f, kv = self.hidden_size, self.ffn, self.kv_dim
        if self.flavour == "gpt2":
            # qkv + out projection (with biases), fc1 + fc2 (with biases), two LayerNorms (weight + bias)
            return (h * (h + 2 * kv) + h + 2 * kv) + (h * h + h) + (h * f + f) + (f * h + h) + 4 * h
        # q, k, v, o without biases; gate, up, down; two RMSNorm weights
        return h * (h + 2 * kv) + h * h + 3 * h * f + 2 * h

    @property
    def embedding_params(self) -> int:
        positions = self.seq_len * self.hidden_size if self.flavour == "gpt2" else 0
        return self.vocab_size * self.hidden_size + positions

    @property
    def head_params(self) -> int:
        """Final norm + output projection. A tied head still holds its own copy when it sits on another
        pipeline stage than the embedding (as Megatron does), so it is counted here; total_params
        subtracts it once for tied models."""
        norm = 2 * self.hidden_size if self.flavour == "gpt2" else self.hidden_size
        return norm + self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        tied = self.vocab_size * self.hidden_size if self.tie_embeddings else 0
        return self.embedding_params + self.num_layers * self.block_params + self.head_params - tied


class GPUSpec(Strict):
    """One accelerator (or one CPU rank for the `local` cluster)."""

    name: str
    peak_tflops: float = Field(gt=0)
    """Dense peak at the training precision (bf16/fp16 tensor cores), TFLOP/s."""
    memory_gb: float = Field(gt=0)
    """Device memory in GB (10^9 bytes)."""
    hbm_GBps: float = Field(gt=0)
    """Memory bandwidth, GB/s."""

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)


class IntraNodeLink(Strict):
    bandwidth_GBps: float = Field(gt=0)
    """Per GPU per direction (NVLink through NVSwitch)."""
    latency_us: float = Field(ge=0)


class InterNodeLink(Strict):
    nics_per_node: int = Field(gt=0)
    nic_Gbps: float = Field(gt=0)
    """Line rate of one NIC in Gbit/s per direction."""
    latency_us: float = Field(ge=0)
    oversubscription: float = Field(1.0, ge=1.0)
    """Fabric oversubscription: 2.0 means a node's uplinks carry half its NICs' rate across the spine."""


class ClusterSpec(Strict):
    name: str
    gpu: GPUSpec
    gpus_per_node: int = Field(gt=0)
    intra_node: IntraNodeLink
    inter_node: InterNodeLink
    num_gpus: int = Field(0, ge=0)
    """Total GPUs; 0 until set by `--gpus`."""

    @model_validator(mode="after")
    def _check(self) -> "ClusterSpec":
        n, g = self.num_gpus, self.gpus_per_node
        if n and n >= g and n % g:
            raise ValueError(f"--gpus {n} is not a multiple of gpus_per_node {g}")
        return self

    @property
    def num_nodes(self) -> int:
        return max(1, -(-self.num_gpus // self.gpus_per_node))

    def with_gpus(self, num_gpus: int) -> "ClusterSpec":
        return ClusterSpec.model_validate({**self.model_dump(), "num_gpus": num_gpus})


class TrainSpec(Strict):
    global_batch: int = Field(gt=0)
    """Sequences per optimizer step."""
    precision: Precision = Precision.BF16
    """Mixed-precision Adam by default: half-precision weights and grads, fp32 master weights and moments."""

    @property
    def weight_bytes(self) -> int:
        return 4 if self.precision == Precision.FP32 else 2

    @property
    def grad_bytes(self) -> int:
        return self.weight_bytes

    @property
    def optimizer_bytes(self) -> int:
        """Adam state per parameter: fp32 master copy + two fp32 moments (the 12 bytes of K in
        ZeRO, Rajbhandari et al. 2020, section 3.1); pure fp32 training needs no master copy."""
        return 8 if self.precision == Precision.FP32 else 12


# ----------------------------------------------------------------------------------------------- loading

def read_mapping(path: Path) -> dict[str, Any]:
    """A JSON or YAML file as a dict, or a SpecError naming the file."""
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping at the top level")
    return data


def validation_message(source: str, err: ValidationError) -> str:
    """One line: the source, the first failing field and why."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{source}: {where}: {msg}" + (f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else "")


T = TypeVar("T", bound=BaseModel)


def validate(cls: type[T], data: dict[str, Any], source: str) -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise SpecError(validation_message(source, e)) from None


def load_versioned(cls: type[T], path: str | Path, version: int, older: tuple[int, ...] = ()) -> T:
    """Read a versioned mpplan file (plan.json, profile.json) strictly: a version other than ``version`` or the
    ``older`` ones this mpplan still reads, bad JSON or any invalid field is a SpecError with one line naming the
    file and field."""
    path = Path(path)
    data = read_mapping(path)
    found = data.get("schema_version")
    if found not in (*older, version):
        readable = ", ".join(str(v) for v in (*older, version))
        raise SpecError(f"{path}: schema_version {found!r} is not supported (this mpplan reads {readable})")
    return validate(cls, data, str(path))


_HF_GPT2 = {"n_layer", "n_embd", "n_head", "vocab_size"}
_HF_LLAMA = {"num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"}


def model_from_hf_config(cfg: dict[str, Any], name: str, source: str) -> ModelSpec:
    """A Hugging Face config.json (GPT-2 or Llama keys) as a ModelSpec; extra HF keys are ignored, as HF does."""
    if _HF_GPT2 <= cfg.keys():
        data = dict(name=name, flavour="gpt2", num_layers=cfg["n_layer"], hidden_size=cfg["n_embd"],
                    num_heads=cfg["n_head"], ffn_hidden_size=cfg.get("n_inner") or 0,
                    vocab_size=cfg["vocab_size"], seq_len=cfg.get("n_positions", cfg.get("n_ctx", 1024)),
                    tie_embeddings=cfg.get("tie_word_embeddings", True))
    elif _HF_LLAMA <= cfg.keys():
        data = dict(name=name, flavour="llama", num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
                    num_heads=cfg["num_attention_heads"], num_kv_heads=cfg.get("num_key_value_heads") or 0,
                    ffn_hidden_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                    seq_len=cfg.get("max_position_embeddings", 4096),
                    tie_embeddings=cfg.get("tie_word_embeddings", False))
    else:
        raise SpecError(f"{source}: not a GPT-2 or Llama config.json (need {sorted(_HF_GPT2)} or {sorted(_HF_LLAMA)})")
    return validate(ModelSpec, data, source)


def load_model(name_or_path: str, seq_len: int | None = None) -> ModelSpec:
    """A model preset by name, a Hugging Face config.json, or mpplan's own model YAML/JSON."""
    from planner.presets import MODELS

    if name_or_path in MODELS:
        spec = MODELS[name_or_path]
    else:
        path = Path(name_or_path)
        if not path.suffix:
            raise SpecError(f"--model {name_or_path}: no such preset (presets: {', '.join(MODELS)}) and not a file")
        data = read_mapping(path)
        if "flavour" in data:
            spec = validate(ModelSpec, data, str(path))
        else:
            spec = model_from_hf_config(data, data.get("_name_or_path") or path.parent.name or path.stem, str(path))
    return with_seq_len(spec, seq_len)


def with_seq_len(spec: ModelSpec, seq_len: int | None) -> ModelSpec:
    """The spec with `--seq-len` applied (None keeps it), validated like any other spec."""
    if seq_len is None:
        return spec
    if seq_len <= 0:
        raise SpecError(f"--seq-len {seq_len}: must be positive")
    return validate(ModelSpec, {**spec.model_dump(), "seq_len": seq_len}, "--seq-len")


def load_cluster(name_or_path: str, num_gpus: int) -> ClusterSpec:
    """A cluster preset or a YAML/JSON file; `gpu` in a file may name a GPU preset."""
    from planner.presets import CLUSTERS, GPUS

    if num_gpus <= 0:
        raise SpecError(f"--gpus {num_gpus}: must be positive")
    if name_or_path in CLUSTERS:
        data, source = CLUSTERS[name_or_path].model_dump(), f"cluster {name_or_path}"
    else:
        path = Path(name_or_path)
        if not path.suffix:
            raise SpecError(f"--cluster {name_or_path}: no such preset (presets: {', '.join(CLUSTERS)}) and not a file")
        data, source = read_mapping(path), str(path)
        data.setdefault("name", path.stem)
        if isinstance(data.get("gpu"), str):
            if data["gpu"] not in GPUS:
                raise SpecError(f"{path}: gpu: no GPU preset {data['gpu']!r} (presets: {', '.join(GPUS)})")
            data["gpu"] = GPUS[data["gpu"]].model_dump()
    data["num_gpus"] = num_gpus
    return validate(ClusterSpec, data, source)
