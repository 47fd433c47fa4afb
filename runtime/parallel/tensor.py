"""Tensor parallelism with DTensor: one declarative plan dict per block handed to ``parallelize_module``.

Megatron-style sharding (Shoeybi et al. 2019, arXiv 1909.08053, section 3): q/k/v and fc1 (gate/up) are split
column-wise (by heads / MLP width), o_proj and fc2 (down) row-wise, so each block needs one all-reduce in forward
and one in backward per sub-layer. The embedding is split row-wise (by vocabulary) and the output projection
column-wise, both returning replicated activations.

Sequence parallelism (Korthikanti et al. 2022, arXiv 2205.05198, section 4.2.2): the norms and the residual
stream run on a 1/tp slice of the sequence; the row-wise projections reduce-scatter onto the sequence dim and
the attention / MLP inputs are all-gathered back. Between pipeline stages activations stay whole (replicated
across the TP group), so each stage turns its input into a sequence shard at its first block and gathers it
back after its last.
"""
from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from runtime.model import Transformer

SEQ_DIM = 1  # activations are (batch, seq, hidden)


def block_plan(gated_mlp: bool, sp: bool) -> dict[str, object]:
    """Placement style per sub-module of one transformer block."""
    residual = Shard(SEQ_DIM) if sp else Replicate()
    mlp_in, mlp_out = (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj") if gated_mlp else (("mlp.fc1",), "mlp.fc2")
    plan: dict[str, object] = {
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(output_layouts=residual),
        **{name: ColwiseParallel() for name in mlp_in},
        mlp_out: RowwiseParallel(output_layouts=residual),
    }
    if sp:
        plan.update({
            "attn_norm": SequenceParallel(sequence_dim=SEQ_DIM),
            "mlp_norm": SequenceParallel(sequence_dim=SEQ_DIM),
            "attn": PrepareModuleInput(input_layouts=(Shard(SEQ_DIM),), desired_input_layouts=(Replicate(),)),
            "mlp": PrepareModuleInput(input_layouts=(Shard(SEQ_DIM),), desired_input_layouts=(Replicate(),)),
        })
    return plan


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, sp: bool) -> str:
    """Shard ``model`` (a whole model or one pipeline stage) over ``tp_mesh`` in place; returns a description
    for the run report. Call only with tp > 1 (a parallelised module is DTensor-valued even on a 1-rank mesh)."""
    gated = model.spec.flavour == "llama"
    blocks = list(model.layers.values())
    for block in blocks:
        parallelize_module(block, tp_mesh, block_plan(gated, sp))
    if sp and blocks:
        # whole activations at the stage boundary <-> sequence shards inside the stage
        parallelize_module(blocks[0], tp_mesh, PrepareModuleInput(
            input_layouts=(Replicate(),), desired_input_layouts=(Shard(SEQ_DIM),), use_local_output=True))
        parallelize_module(blocks[-1], tp_mesh, PrepareModuleOutput(
            output_layouts=(Shard(SEQ_DIM),), desired_output_layouts=(Replicate(),), use_local_output=True))
    if model.embed is not None:
        parallelize_module(model.embed, tp_mesh, {
            "tok": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())})
    if model.head is not None:
        parallelize_module(model.head, tp_mesh, {"proj": ColwiseParallel(output_layouts=Replicate())})
    return f"DTensor tp={tp_mesh.size()} (column/row-wise{', sequence parallel' if sp else ''})"

