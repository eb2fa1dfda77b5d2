"""`megatron-stag pretrain RECIPE [key=value ...] [-- --megatron-flag ...]`: Megatron's training loop
(`megatron.training.pretrain`, 0.19 API) with our model, on any TP/PP/DP layout.

What is ours: the model provider (a StagFormerModel for baseline GPT, StagFormer, AltUp and
StagFormer+AltUp, all from the same config fields), the dataset provider (megatron's GPTDataset over
the indexed datasets written by `prepare-data`, tokenised with the run's sentencepiece model), the
forward step and loss. Everything else is Megatron's: argument parsing and validation, schedules,
optimizer and LR schedule, iteration logs, evaluation, TensorBoard, torch_dist checkpoints and resume
(`--load`, `--save`; the tracker file is written after a checkpoint is complete, so an interrupted
save is never picked up).

Launch: the command starts `torch.distributed.run` with `parallelism.nproc_per_node` processes
(default: TP x PP) unless it already runs under a launcher (torchrun, srun with RANK set). On
machines without CUDA it trains on CPU with gloo through `platform/cpu.py`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import torch

from megatron_stag.config.recipe import RecipeError, load_recipe, recipe_argv


def _under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(recipe_name: str, overrides: list[str], extra: list[str]) -> int:
    """Validate the recipe here (cheap, before any process starts), then run it on N processes."""
    recipe = load_recipe(recipe_name, overrides)
    recipe_argv(recipe)  # raises RecipeError naming the key
    if _under_launcher():
        return run(recipe_name, overrides, extra)
    nproc = recipe.get("nproc_per_node") or (
        (recipe.get("tensor_model_parallel_size") or 1) * (recipe.get("pipeline_model_parallel_size") or 1))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={int(nproc)}",
           "--master-port", str(_free_port()), "-m", "megatron_stag.cli", "pretrain",
           str(recipe_name), *overrides]
    if extra:
        cmd += ["--", *extra]
    return subprocess.call(cmd)  # argv list: no shell ever sees recipe values


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def megatron_argv(recipe_name: str, overrides: list[str], extra: list[str]) -> list[str]:
    from megatron.core.extensions.transformer_engine import HAVE_TE

    argv = recipe_argv(load_recipe(recipe_name, overrides))
    if not HAVE_TE:  # megatron's fused rope and grad-accumulation fusion are TE/apex kernels
        argv += ["--no-rope-fusion", "--no-gradient-accumulation-fusion", "--no-persist-layer-norm"]
    if not torch.cuda.is_available():
        argv += ["--distributed-backend", "gloo"]
    return argv + list(extra)  # raw Megatron flags last: they win


# ---------------------------------------------------------------------------- Megatron hooks
def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    from megatron.training import get_args
    from megatron.training.argument_utils import core_transformer_config_from_args

    from megatron_stag.config.stagformer_config import StagFormerConfig
    from megatron_stag.models.stagformer_model import StagFormerModel
    from megatron_stag.specs.stagformer_specs import get_stagformer_section_specs
    from megatron_stag.training.shared_weight_sync import make_finalize_model_grads

    args = get_args()
    config = core_transformer_config_from_args(args, config_class=StagFormerConfig)
    backend = "te" if args.transformer_impl == "transformer_engine" else "local"
    model = StagFormerModel(
        config, vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
        section_specs=get_stagformer_section_specs(config, backend=backend,
                                                   core_attention=args.core_attention),
        pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base, pg_collection=pg_collection)
    config.finalize_model_grads_func = make_finalize_model_grads()  # shared weights across stages
    return model


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def get_batch(data_iterator):
    """Every rank that needs data (first/last pipeline stage) reads its own iterator."""
    from megatron.core import parallel_state as ps

    if not (ps.is_pipeline_first_stage() or ps.is_pipeline_last_stage()) or data_iterator is None:
        return None, None, None, None
    batch = next(data_iterator)
    dev = _device()
    return (batch["tokens"].to(dev), batch["labels"].to(dev), batch["loss_mask"].to(dev),
            batch["position_ids"].to(dev))


def loss_func(loss_mask, output_tensor):
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def forward_step(data_iterator, model):
    from megatron.training import get_timers

    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    tokens, labels, loss_mask, position_ids = get_batch(data_iterator)
    timers("batch-generator").stop()
    output = model(tokens, position_ids, None, labels=labels, loss_mask=loss_mask)
    return output, partial(loss_func, loss_mask)


def datasets_provider(train_val_test_num_samples, vp_stage=None):
    """megatron's GPTDataset (blends and splits from --data-path / --split) on every data rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.training import get_args, get_tokenizer, print_rank_0
    from megatron.training.utils import get_blend_and_blend_per_split

    from megatron_stag.data.token_dataset import check_indexed_dataset

    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    for prefixes in [blend] + list(blend_per_split or []):
        for prefix in (prefixes[0] if prefixes else []):
            check_indexed_dataset(prefix)
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend,
        blend_per_split=blend_per_split, split=args.split, path_to_cache=args.data_cache_path,
        tokenizer=get_tokenizer(), reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask, eod_mask_loss=args.eod_mask_loss,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus)
    print_rank_0("> building train, validation and test datasets (megatron GPTDataset) ...")

    def on_this_rank():
        return ps.is_pipeline_first_stage() or ps.is_pipeline_last_stage()

    return BlendedMegatronDatasetBuilder(GPTDataset, train_val_test_num_samples, on_this_rank,
                                         config).build()


datasets_provider.is_distributed = True  # called on every rank; each data rank builds its own


def _write_run_files(args) -> None:
    """model_args.json and tokenizer.model beside Megatron's checkpoints, for `generate`."""
    from megatron_stag.models.model_args import ModelArgs

    if not args.save or torch.distributed.get_rank() != 0:
        return
    save = Path(args.save)
    save.mkdir(parents=True, exist_ok=True)
    fields = {f: getattr(args, f) for f in ModelArgs.__dataclass_fields__ if hasattr(args, f)}
    fields.update(
        vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        num_moe_experts=args.num_experts)
    ModelArgs(**fields).save(save / "model_args.json")
    if args.tokenizer_model and Path(args.tokenizer_model).is_file():
        shutil.copyfile(args.tokenizer_model, save / "tokenizer.model")


def run(recipe_name: str, overrides: list[str], extra: list[str]) -> int:
    """One process of the job (under torchrun/srun): parse, adapt the platform, train."""
    from megatron_stag.platform import cpu

    argv = megatron_argv(recipe_name, overrides, extra)
    if cpu.activate():
        cpu.adapt_megatron_training()
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.arguments import parse_and_validate_args
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from megatron_stag.config.cli_args import add_stagformer_args
    from megatron_stag.config.recipe import add_plugin_args

    sys.argv = [sys.argv[0], *argv]
    args = parse_and_validate_args(extra_args_provider=lambda p: add_plugin_args(add_stagformer_args(p)))
    cfg = pretrain_cfg_container_from_args(args)
    pretrain(cfg, datasets_provider, ModelType.encoder_or_decoder, forward_step,
             model_provider=_with_run_files(model_provider))
    return 0


def _with_run_files(provider):
    """Write the run files once the process groups exist (the first model build)."""
    def build(*a, **kw):
        from megatron.training import get_args

        _write_run_files(get_args())
        return provider(*a, **kw)

    return build


def main(argv: list[str]) -> int:
    """argv: RECIPE [key=value ...] [-- megatron flags]."""
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    else:
        extra = []
    if not argv:
        raise SystemExit("usage: megatron-stag pretrain RECIPE [key=value ...] [-- --megatron-flag ...]")
    try:
        return launch(argv[0], argv[1:], extra)
    except RecipeError as err:
        raise SystemExit(f"recipe error: {err}") from None
