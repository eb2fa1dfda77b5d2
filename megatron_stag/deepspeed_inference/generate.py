"""`megatron-stag generate --engine deepspeed PACKAGE`: an exported model under DeepSpeed.

Ranks come from the launcher (`deepspeed --num_gpus N`, torchrun or srun set RANK/WORLD_SIZE):
1 rank: every section here; world == --tp: every section on each rank, tensor-parallel over all;
world == sections x --tp: one section per tensor-parallel group, decoding concurrently.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from megatron_stag.export.megatron_export import DTYPES


def plan_ranks(world: int, sections: int, tp: int, recurrent: bool):
    """This launch's layout: None (all sections per rank) or one section per TP group."""
    if world == tp:
        return None
    if recurrent:
        raise SystemExit("--recurrent runs both passes of the shared weights on one rank: launch "
                         f"{tp} rank(s) (world size == --tp), not {world}.")
    if world != sections * tp:
        raise SystemExit(f"{world} ranks do not fit the exported model: launch {tp} (all {sections} "
                         f"sections per rank, --tp {tp}) or {sections * tp} ranks (one section per "
                         f"group of --tp {tp}).")
    return "sections"


def generate_with_deepspeed(ns, prompts: list[str]) -> int:
    from megatron_stag.deepspeed_inference.engine import (
        check_tensor_parallel, init_comm, init_deepspeed_engine, section_groups)
    from megatron_stag.deepspeed_inference.staggered_decoding import PlainStaggeredGenerator, SectionPlacement
    from megatron_stag.export.plain_model import PlainConfig, load_plain_model
    from megatron_stag.inference.generate_cli import prepare_prompts, report

    package = Path(ns.checkpoint)
    if not (package / "config.json").is_file():
        raise SystemExit(f"{package} is not an exported model (no config.json): --engine deepspeed serves "
                         f"`megatron-stag export CHECKPOINT {package}` output.")
    cfg = PlainConfig.load(package / "config.json")
    try:
        check_tensor_parallel(cfg, ns.tp)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = plan_ranks(world, cfg.sections, ns.tp, ns.recurrent)
    tok_path = Path(ns.tokenizer) if ns.tokenizer else package / "tokenizer.model"
    tok, ids, params = prepare_prompts(ns, prompts, tok_path, cfg.vocab_size, cfg.max_sequence_length)

    import deepspeed.comm as dist

    comm = None
    if world > 1:
        init_comm()
        comm = dist
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    model = load_plain_model(package, device=device)
    placement, group = None, None
    if layout == "sections":
        placement = SectionPlacement(cfg.sections, ns.tp, dist.get_rank())
        placement.check(world)
        model.keep_sections([placement.section])
        group = section_groups(cfg.sections, ns.tp) if ns.tp > 1 else None
    elif ns.tp > 1:
        group = section_groups(1, ns.tp)
    engine = init_deepspeed_engine(model, dtype=DTYPES[ns.dtype], tp=ns.tp, group=group)
    gen = PlainStaggeredGenerator(engine.module, max_len=cfg.max_sequence_length, batch=len(ids),
                                  placement=placement, comm=comm, recurrent=ns.recurrent,
                                  cuda_graph=ns.cuda_graph, compile=ns.compile)
    result = gen.generate(ids, params, progress=world == 1)
    if comm is not None and comm.get_rank() != (placement.sampler if placement else 0):
        return 0  # the sampling rank reports
    return report(ns, tok, prompts, result)
