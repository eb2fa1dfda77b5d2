"""The TransformerBlocks one pipeline stage runs, and their canonical checkpoint keys.

Each piece is one section's slice on this stage, built as a megatron `TransformerBlock` numbered from
1 inside the piece. Checkpoint keys are made global and layout-free here
(`sections.{k}.layers.{layer-in-section}.…`, `sections.{k}.final_layernorm.…`), so a checkpoint saved
at one TP/PP layout loads at another. With shared weights, every copy of a shared submodule maps onto
section 0's key; copies other than section 0's are marked as replicas, so exactly one is written.
Aliases on the same stage (the same module reached through two sections) are left out: megatron's
loader accepts a key once per rank. `alias_prefixes` lets the model restore them on load.
"""

from __future__ import annotations

import torch

from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

SHARED_LAYER_MODULES = ("input_layernorm", "self_attention", "pre_mlp_layernorm", "mlp", "altup")
SHARED_SUBMODULES = tuple(name + "." for name in SHARED_LAYER_MODULES)


def _rekey(sharded: dict, old: str, new: str, replica: int | None = None) -> None:
    for value in sharded.values():
        # factories too: megatron's gated MLP (swiglu) checkpoints linear_fc1 through one
        if isinstance(value, (ShardedTensor, ShardedObject, ShardedTensorFactory)) and value.key.startswith(old):
            value.key = new + value.key[len(old):]
            if replica is not None:
                rid = value.replica_id
                value.replica_id = (replica,) + tuple(rid[1:]) if isinstance(rid, tuple) else replica


def _is_alias(key: str, block_prefix: str) -> bool:
    """Whether state-dict `key` of a block belongs to a shared submodule of one of its layers."""
    head = f"{block_prefix}layers."
    if not key.startswith(head):
        return False
    return key[len(head):].split(".", 1)[1].startswith(SHARED_SUBMODULES)


class SectionPieces(torch.nn.ModuleList):
    """ModuleList of per-piece TransformerBlocks that knows its pieces' places in the model."""

    def __init__(self, blocks, pieces, shared_weights: bool):
        super().__init__(blocks)
        self.pieces = list(pieces)
        self.shared_weights = shared_weights

    def alias_prefixes(self, prefix: str = "") -> dict[str, str]:
        """{alias state-dict prefix: owner prefix} for shared submodules aliased on this stage."""
        if not self.shared_weights:
            return {}
        return {f"{prefix}{i}.layers.{j}.{sub}": f"{prefix}0.layers.{j}.{sub}"
                for i in range(1, len(self)) for j in range(self.pieces[i].num_layers)
                for sub in SHARED_SUBMODULES}

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        root = prefix[: -len("blocks.")] if prefix.endswith("blocks.") else prefix
        metadata = dict(metadata or {}, non_homogeneous_layers=True)
        out = {}
        for i, (piece, block) in enumerate(zip(self.pieces, self)):
            local = f"{prefix}{i}."
            sd = block.sharded_state_dict(local, (), metadata)
            if self.shared_weights and i > 0:  # aliases of block 0's modules
                sd = {key: v for key, v in sd.items() if not _is_alias(key, local)}
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
