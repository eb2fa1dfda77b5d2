"""The TransformerBlocks one pipeline stage runs, and their canonical checkpoint keys.

Each piece is one section's slice on this stage, built as a megatron `TransformerBlock` numbered from
1 inside the piece. Checkpoint keys are made global and layout-free here
(`sections.{k}.layers.{layer-in-section}.…`, `sections.{k}.final_layernorm.…`), so a checkpoint saved
at one TP/PP layout loads at another. With shared weights, every copy of a shared submodule maps onto
section 0's key; copies other than section 0's are marked as replicas, so exactly one is written.
"""

from __future__ import annotations

import torch

from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

SHARED_SUBMODULES = ("input_layernorm.", "self_attention.", "pre_mlp_layernorm.", "mlp.")


def _rekey(sharded: dict, old: str, new: str, replica: int | None = None) -> None:
    for value in sharded.values():
        if isinstance(value, (ShardedTensor, ShardedObject)) and value.key.startswith(old):
            value.key = new + value.key[len(old):]
            if replica is not None:
                rid = value.replica_id
                value.replica_id = (replica,) + tuple(rid[1:]) if isinstance(rid, tuple) else replica


class SectionPieces(torch.nn.ModuleList):
    """ModuleList of per-piece TransformerBlocks that knows its pieces' places in the model."""

    def __init__(self, blocks, pieces, shared_weights: bool):
        super().__init__(blocks)
        self.pieces = list(pieces)
        self.shared_weights = shared_weights

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        root = prefix[: -len("blocks.")] if prefix.endswith("blocks.") else prefix
        metadata = dict(metadata or {}, non_homogeneous_layers=True)
        out = {}
        for i, (piece, block) in enumerate(zip(self.pieces, self)):
            local = f"{prefix}{i}."
            sd = block.sharded_state_dict(local, (), metadata)
            k = piece.section
            for j in range(piece.num_layers):
                layer_old = f"{local}layers.{j}."
                g = piece.first_layer + j
                if self.shared_weights and k > 0:
                    for sub in SHARED_SUBMODULES:
                        _rekey(sd, layer_old + sub, f"{root}sections.0.layers.{g}.{sub}", replica=k)
                _rekey(sd, layer_old, f"{root}sections.{k}.layers.{g}.")
            _rekey(sd, f"{local}final_layernorm.", f"{root}sections.{k}.final_layernorm.")
            out.update(sd)
        return out
