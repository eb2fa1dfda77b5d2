"""Per-rank bodies of the parallel tests (spawned by tests/dist_helpers.run_ranks).

`train_step` builds a StagFormer at a given TP/PP, loads weights from a torch_dist checkpoint (or
initialises and saves one), runs one forward/backward through megatron's pipeline schedule with DDP
and our finalize hook, and writes loss and per-shard gradients keyed by checkpoint key, plus a
checkpoint of its own weights. Comparing shards against the TP=1/PP=1 run checks TP, PP, shared
weights and checkpoint resharding at once.
"""

from __future__ import annotations

import os

import torch

from tests.model_factory import perturb_altup

MICRO_BATCHES = 2
MB, SEQ, VOCAB = 2, 8, 64


def _data():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (MICRO_BATCHES, MB, SEQ + 1), generator=g)
    return [(x[:, :-1].contiguous(), x[:, 1:].contiguous()) for x in ids]


def build(tp: int, pp: int, **stag):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_stag.config.stagformer_config import StagFormerConfig
    from megatron_stag.models.stagformer_model import StagFormerModel
    from megatron_stag.training.shared_weight_sync import make_finalize_model_grads
    from megatron.core import parallel_state as ps

    kw = dict(num_layers=4, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
              hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp,
              pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
              batch_p2p_comm=False)  # gloo: batched p2p gave wrong gradients (environment.md)
    kw.update(stag)
    position = kw.pop("position_embedding_type", "learned_absolute")
    if tp == 1:
        kw.pop("sequence_parallel", None)  # the TP=1 reference of an SP run
    cfg = StagFormerConfig(**kw)
    model = StagFormerModel(cfg, vocab_size=VOCAB, max_sequence_length=SEQ,
                            pre_process=ps.is_pipeline_first_stage(),
                            post_process=ps.is_pipeline_last_stage(),
                            position_embedding_type=position)
    cfg.finalize_model_grads_func = make_finalize_model_grads()
    if torch.cuda.is_available():  # the same workers run with NCCL on GPU machines
        model.cuda()
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    return cfg, model, ddp


def _shards(model):
    """{checkpoint key: [(global offsets, local tensor)]} for this rank's parameters."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = {}
    for name, sh in model.sharded_state_dict().items():
        if isinstance(sh, ShardedTensor) and isinstance(sh.data, torch.nn.Parameter):
            # prepended axes (e.g. megatron's per-expert axis of MoE weights) count as offsets too
            out.setdefault(sh.key, []).append((tuple(sh.global_offset), sh.prepend_axis_num, sh.data))
    return out


def train_step(rank, world, tp, pp, stag, ckpt_in, out_dir):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_stag.platform.distributed import initialize

    initialize(tp=tp, pp=pp, seed=1234, ep=stag.get("expert_model_parallel_size", 1))
    cfg, model, ddp = build(tp, pp, **stag)
    if ckpt_in:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_in))
    else:
        perturb_altup(model)  # the reference run: AltUp coefficients off their identity init
    ckpt_out = os.path.join(out_dir, "ckpt")
    os.makedirs(ckpt_out, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_out)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    pos = torch.arange(SEQ, device=dev)[None].expand(MB, -1)

    def forward_step(data_iterator, m):
        tokens, labels = (t.to(dev) for t in next(data_iterator))
        out = m(tokens, pos, None, labels=labels)

        def loss_func(losses):
            loss = losses.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    ddp.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(_data()), model=[ddp],
        num_microbatches=MICRO_BATCHES, seq_length=SEQ, micro_batch_size=MB, forward_only=False)
    grads = {key: [(off, p.main_grad.detach().float().cpu().reshape((1,) * axes + p.shape))
                   for off, axes, p in parts]
             for key, parts in _shards(model).items()}
    result = {"grads": grads}
    if ps.is_pipeline_last_stage():
        result["loss"] = sum(float(m["loss"]) for m in losses) / MICRO_BATCHES
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def evaluate(rank, world, tp, pp, stag, ckpt_in, out_dir):
    """Loss of a checkpoint at a layout (forward only); used for resharding round trips."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_stag.platform.distributed import initialize

    initialize(tp=tp, pp=pp, seed=99)
    cfg, model, ddp = build(tp, pp, **stag)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_in))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tokens, labels = (t.to(dev) for t in _data()[0])
    with torch.no_grad():
        loss = model(tokens, torch.arange(SEQ, device=dev)[None].expand(MB, -1), None,
                     labels=labels).mean()
    if ps.is_pipeline_last_stage():
        torch.save({"loss": float(loss)}, os.path.join(out_dir, f"eval{rank}.pt"))


def optimizer_step(rank, world, distributed_optimizer, stag, ckpt_in, out_dir):
    """DP = world ranks, each taking its share of the microbatches; one megatron optimizer step."""
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_stag.config.stagformer_config import StagFormerConfig
    from megatron_stag.models.stagformer_model import StagFormerModel
    from megatron_stag.training.shared_weight_sync import make_finalize_model_grads
    from megatron_stag.platform.distributed import initialize

    initialize(tp=1, pp=1, seed=1234)
    cfg = StagFormerConfig(num_layers=4, hidden_size=32, num_attention_heads=4,
                           use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
                           **stag)
    model = StagFormerModel(cfg, vocab_size=VOCAB, max_sequence_length=SEQ)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_in))
    cfg.finalize_model_grads_func = make_finalize_model_grads()
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer), model)
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-2, weight_decay=0.1, use_distributed_optimizer=distributed_optimizer,
        clip_grad=1.0), [ddp])
    micro = _data()[rank::world]
    pos = torch.arange(SEQ)[None].expand(MB, -1)

    def forward_step(data_iterator, m):
        tokens, labels = next(data_iterator)
        return m(tokens, pos, None, labels=labels), lambda out: (out.float().mean(), {})

    ddp.zero_grad_buffer()
    opt.zero_grad()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro), model=[ddp],
        num_microbatches=len(micro), seq_length=SEQ, micro_batch_size=MB, forward_only=False)
    ok, grad_norm, _ = opt.step()
    if rank == 0:
        torch.save({"params": {k: v.detach().clone() for k, v in model.state_dict().items()
                               if not k.endswith("_extra_state")}, "grad_norm": float(grad_norm)},
                   os.path.join(out_dir, "step.pt"))
