"""DeepSpeed inference on the serving model: `deepspeed.init_inference` with AutoTP by name.

DeepSpeed's kernel injection knows Hugging Face architectures and legacy Megatron layers only, so
the exported `StagLM` (plain `nn.Linear`s) is sharded by AutoTP under an injection policy naming the
row-parallel outputs of a `DecoderLayer`: self-attention out, cross-attention out and MLP down
(split along their input, all-reduced); every other linear in the layer is split along its output
(column-parallel), and everything outside the layers (embeddings, AltUp's scalars and projections,
the head) stays whole, except the next section's entry projections a rank may hold (column-parallel).
Heads are read from the sharded weights' shapes, so the model needs no knowledge of TP.

Sections on separate ranks: each section's tensor-parallel ranks form their own group, handed to
DeepSpeed as its `mpu` (DeepSpeed would otherwise group ranks 0..tp-1).
"""

from __future__ import annotations

import os

import torch

from megatron_stag.serving.model import CrossKV, DecoderLayer, StagLM

ROW_PARALLEL_LINEARS = ("self_attn.o_proj", "cross_attn.o_proj", "mlp.down_proj")


def injection_policy(model: StagLM) -> dict:
    """The row-parallel linears present in this (possibly single-section) model; the next section's
    entry projections kept on this rank (`EntryProjections`) are all column-parallel, split by heads
    as in their own section."""
    present = {name.split(".", 4)[-1] for name, _ in model.named_modules() if name.startswith("sections.")}
    policy = {DecoderLayer: tuple(n for n in ROW_PARALLEL_LINEARS if n in present)}
    if model.next_entries is not None:
        policy[CrossKV] = ()
    return policy


def check_tensor_parallel(cfg, tp: int) -> None:
    """Every split AutoTP makes must fall on whole heads / whole rows, checked before loading
    (`cfg`: a PlainConfig, or a checkpoint's ModelArgs, whose unset sizes take megatron's defaults)."""
    if tp < 1:
        raise ValueError(f"tp={tp}: use 1 or more ranks per section.")
    if tp > 1 and (getattr(cfg, "moe_experts", 0) or getattr(cfg, "num_moe_experts", 0)):
        raise ValueError(f"--tp {tp}: AutoTP does not shard MoE experts; serve MoE models with --tp 1.")
    for name, value in (("num_attention_heads", cfg.num_attention_heads),
                        ("num_query_groups", cfg.num_query_groups or cfg.num_attention_heads),
                        ("ffn_hidden_size", cfg.ffn_hidden_size or 4 * cfg.hidden_size)):
        if value % tp:
            raise ValueError(f"--tp {tp} does not divide the model's {name}={value}: choose a "
                             f"tensor-parallel size that divides it.")


class _SectionGroup:
    """DeepSpeed's `mpu` interface for one section's tensor-parallel group."""

    def __init__(self, group):
        self.group = group

    def get_model_parallel_group(self):
        return self.group

    def get_model_parallel_rank(self):
        import deepspeed.comm as dist

        return dist.get_rank(group=self.group)

    def get_model_parallel_world_size(self):
        import deepspeed.comm as dist

        return dist.get_world_size(group=self.group)


def _skip_runtime_op_builds() -> None:
    """On DeepSpeed's CPU accelerator, comm setup JIT-compiles a shared-memory all-reduce op (~90 s,
    needs a compiler): mark it unavailable so collectives run on gloo, as torch.distributed's do."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__ = {}


def init_comm() -> None:
    """deepspeed.comm from the launcher's environment (deepspeed/torchrun/srun set RANK etc.)."""
    import deepspeed
    import deepspeed.comm as dist

    _skip_runtime_op_builds()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def section_groups(sections: int, tp: int):
    """Create every section's TP group (collective: all ranks call it); returns this rank's."""
    import deepspeed.comm as dist

    mine = None
    for k in range(sections):
        group = dist.new_group(list(range(k * tp, (k + 1) * tp)))
        if dist.get_rank() // tp == k:
            mine = group
    return mine


def init_deepspeed_engine(model: StagLM, dtype: torch.dtype = torch.float32, tp: int = 1, group=None):
    """Wrap `model` in DeepSpeed's InferenceEngine (its `.module` is the sharded, converted model).

    DeepSpeed's own `enable_cuda_graph` captures the engine's forward call (fixed shapes, one rank;
    refused with tensor parallelism), which a decode loop never makes: decode steps are graphed by
    `engine.StaggeredGenerator` instead.
    """
    import deepspeed

    check_tensor_parallel(model.cfg, tp)
    _skip_runtime_op_builds()
    tensor_parallel = {"tp_size": tp}
    if tp > 1:
        if group is None:
            raise ValueError("tp > 1 needs the section's tensor-parallel group (section_groups).")
        tensor_parallel.update(mpu=_SectionGroup(group), tp_group=group)
    engine = deepspeed.init_inference(model, dtype=dtype, tensor_parallel=tensor_parallel,
                                      injection_policy=injection_policy(model) if tp > 1 else None,
                                      replace_with_kernel_inject=False)
    return engine
