"""`megatron-stag pretrain RECIPE [key=value ...] [-- --megatron-flag ...]`: Megatron's training loop
(`megatron.training.pretrain`, 0.19 API) with our model, on any TP/PP/DP layout.

What is ours: the model, through Megatron's model-config hook (`megatron_builder.py`: a
StagFormerModel for baseline GPT, StagFormer, AltUp and StagFormer+AltUp, all from the same config
fields), the dataset provider (megatron's GPTDataset over
the indexed datasets written by `prepare-data`, tokenised with the run's sentencepiece model), the
forward step and loss. Everything else is Megatron's: argument parsing and validation, schedules,
optimizer and LR schedule, iteration logs, evaluation, TensorBoard, torch_dist checkpoints and resume
(`--load`, `--save`; the tracker file is written after a checkpoint is complete, so an interrupted
save is never picked up).

Launch: the command starts `torch.distributed.run` (`platform/torchrun.py`: a failed rank is reported
in one line; torch picks the rendezvous port) with `parallelism.nproc_per_node` processes
(default: TP x PP) unless it already runs under a launcher (torchrun, srun with RANK set). On
machines without CUDA it trains on CPU with gloo through `platform/cpu.py`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import torch

from megatron_stag.checkpointing.checkpoint_io import MEGATRON_TRACKER, write_results_in_process
from megatron_stag.config.recipe import (RecipeError, check_world, load_recipe, megatron_parser,
                                         model_parallel_sizes, recipe_argv, with_flags)
from megatron_stag.platform.distributed import launched
from megatron_stag.platform.files import write_atomic


def _under_launcher() -> bool:
    """torchrun (or srun exporting the same variables) started this process as one rank."""
    return launched() and "LOCAL_RANK" in os.environ


def check_schedule(recipe) -> None:
    """Megatron only asserts these deep inside; say which key to change before anything starts."""
    iters = recipe.get("train_iters")
    decay = recipe.get("lr_decay_iters") or iters
    warmup = recipe.get("lr_warmup_iters") or 0
    if iters is not None and decay is not None and warmup >= decay:
        raise RecipeError(f"optimizer.lr_warmup_iters={warmup} must be below the decay length "
                          f"({decay}, training.train_iters or optimizer.lr_decay_iters): shorten the "
                          f"warm-up or train longer.")
    nproc = recipe.get("nproc_per_node")
    if nproc is not None and (not isinstance(nproc, int) or nproc < 1):
        raise RecipeError(f"parallelism.nproc_per_node={nproc!r}: use a whole number of processes >= 1.")
    mbs, gbs = recipe.get("micro_batch_size") or 1, recipe.get("global_batch_size")
    if gbs is not None and gbs % mbs:
        raise RecipeError(f"training.global_batch_size={gbs} is not a multiple of "
                          f"training.micro_batch_size={mbs}.")
    lr, min_lr = recipe.get("lr"), recipe.get("min_lr") or 0
    if lr is not None and min_lr > lr:
        raise RecipeError(f"optimizer.min_lr={min_lr} is above optimizer.lr={lr}: the schedule decays from lr "
                          f"to min_lr; lower min_lr.")


def check_model(recipe) -> None:
    """Build the model's config from the recipe (no tensors): StagFormer/AltUp/TP/PP errors name
    their field before any process starts."""
    import dataclasses

    from megatron_stag.config.stagformer_config import StagFormerConfig

    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads") if not recipe.get(k)]
    if missing:
        raise RecipeError(f"model.{missing[0]} is missing: a runnable recipe sets num_layers, "
                          f"hidden_size and num_attention_heads (or inherits them with base:).")
    seq, positions = recipe.get("seq_length"), recipe.get("max_position_embeddings")
    if seq and positions and positions < seq:
        raise RecipeError(f"model.max_position_embeddings={positions} is below model.seq_length={seq}: a "
                          f"training sequence needs a position for every token; raise it to at least {seq}.")
    hidden, heads = recipe.get("hidden_size"), recipe.get("num_attention_heads")
    if hidden % heads and not recipe.get("kv_channels"):
        raise RecipeError(f"model.hidden_size={hidden} is not divisible by model.num_attention_heads={heads}: "
                          f"choose sizes with hidden_size = heads x head size.")
    groups = recipe.get("num_query_groups") if recipe.get("group_query_attention") else None
    if groups and heads % groups:  # megatron: a shape error in the first step
        raise RecipeError(f"model.num_attention_heads={heads} is not divisible by model.num_query_groups={groups}: "
                          f"every key/value head serves as many query heads; choose a divisor of {heads}.")
    names = {f.name for f in dataclasses.fields(StagFormerConfig) if f.init}
    kw = {k: v for values in recipe.sections.values() for k, v in values.items()
          if k in names and (k.startswith(("stag_", "altup_")) or k in (
              "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
              "tensor_model_parallel_size", "pipeline_model_parallel_size", "sequence_parallel",
              "add_bias_linear"))}
    if recipe.get("num_experts"):
        kw["num_moe_experts"] = recipe.get("num_experts")
    if not recipe.get("group_query_attention"):
        kw.pop("num_query_groups", None)
    kw.pop("altup_compile", None)
    try:
        StagFormerConfig(use_cpu_initialization=True, pipeline_dtype=torch.float32, **kw)
    except ValueError as err:
        raise RecipeError(f"model settings: {err}") from None


def check_load(recipe) -> None:
    """The checkpoints a run may start from (`checkpoint.load`, and a fine-tune's
    `checkpoint.pretrained_checkpoint`) are plain data (`safe_unpickle`), refused in one line before
    any process starts; each rank's loading is restricted as well."""
    import pickle

    from megatron_stag.checkpointing import safe_unpickle
    from megatron_stag.checkpointing.checkpoint_io import megatron_latest

    if recipe.get("save") and not recipe.get("save_interval"):  # megatron: a bare assert in every rank
        raise RecipeError(f"checkpoint.save_interval is not set: a run that saves (checkpoint.save="
                          f"{recipe.get('save')}) needs it; give the iterations between checkpoints.")
    for key in ("load", "pretrained_checkpoint"):
        folder = recipe.get(key)
        try:
            latest = megatron_latest(Path(folder)) if folder else None
            if latest is not None:
                safe_unpickle.check_metadata(latest)
        except (ValueError, pickle.UnpicklingError) as err:
            raise RecipeError(f"checkpoint.{key}={folder}: {err}") from None
    pretrained = recipe.get("pretrained_checkpoint")
    if pretrained and megatron_latest(Path(pretrained)) is None:
        raise RecipeError(f"checkpoint.pretrained_checkpoint={pretrained} holds no checkpoint (no "
                          f"latest_checkpointed_iteration.txt): give a run's checkpoint folder or an import's.")
    load, save = recipe.get("load"), recipe.get("save")
    if (load and save and Path(load).resolve() != Path(save).resolve() and megatron_latest(Path(save))
            and megatron_latest(Path(load))):
        raise RecipeError(f"checkpoint.save={save} holds this run's checkpoints, and checkpoint.load={load} would "
                          f"start it again from another checkpoint and overwrite them (a requeued Slurm job would "
                          f"lose its progress so). To start from {load} and resume from {save} after any stop, give "
                          f"checkpoint.pretrained_checkpoint={load} and checkpoint.load={save}.")


def blend_prefixes(recipe) -> list[Path]:
    """The dataset prefixes of `data.data_path`, read as megatron reads --data-path (prefixes only, or
    weight, prefix pairs), with a weight where a prefix goes, pairs out of order and weights not above
    0 refused: megatron would look for a dataset "0.5", or assert in every rank."""
    from megatron.core.datasets.utils import get_blend_from_list

    data = recipe.get("data_path") or []
    items = [str(item) for item in (data if isinstance(data, list) else [data])]
    if not items:
        return []
    pairs = ("give dataset prefixes only, or weight, prefix pairs (e.g. [0.7, data/a_text_document, 0.3, "
             "data/b_text_document])")
    try:
        prefixes, weights = get_blend_from_list(items)
    except AssertionError:
        raise RecipeError(f"data.data_path={items} mixes weights and prefixes out of order: {pairs}.") from None
    for prefix in prefixes:
        try:
            float(prefix)
        except ValueError:
            continue
        raise RecipeError(f"data.data_path={items}: {prefix!r} stands where a dataset prefix goes: {pairs}.")
    if weights and min(weights) <= 0:
        raise RecipeError(f"data.data_path={items}: weight {min(weights):g} is not above 0: leave that dataset "
                          f"out instead.")
    return [Path(p) for p in prefixes]


def check_data(recipe) -> None:
    """The datasets and tokenizer exist and are whole, and a blend is well formed, checked here rather
    than in a rank minutes later."""
    from megatron_stag.data.token_dataset import check_indexed_dataset

    tokenizer = recipe.get("tokenizer_model")
    if tokenizer and not Path(tokenizer).exists():
        raise RecipeError(f"data.tokenizer_model={tokenizer} does not exist: give the .model that "
                          f"`megatron-stag prepare-data` wrote, or the Hugging Face tokenizer folder it used.")
    for prefix in blend_prefixes(recipe):
        try:
            check_indexed_dataset(prefix)
        except (FileNotFoundError, ValueError) as err:
            raise RecipeError(f"data.data_path: {err}") from None


def use_tokenizer_kind(recipe) -> None:
    """megatron's tokenizer type follows `data.tokenizer_model`: a folder is a Hugging Face tokenizer
    (`HuggingFaceTokenizer`, read from local files only: it is checked to load here, before any rank
    starts), a file a sentencepiece model. The recipes name SentencePieceTokenizer, so a user who gives
    a tokenizer folder need not also change the type."""
    from megatron_stag.data.tokenizer import check_sentencepiece, load_hf_tokenizer

    tokenizer = recipe.get("tokenizer_model")
    if not tokenizer or not Path(tokenizer).exists():
        return  # check_data names it
    if Path(tokenizer).is_dir():
        try:
            load_hf_tokenizer(Path(tokenizer))
        except ValueError as err:
            raise RecipeError(f"data.tokenizer_model: {err}") from None
        recipe.set("data.tokenizer_type", "HuggingFaceTokenizer")
    elif recipe.get("tokenizer_type") == "HuggingFaceTokenizer":
        raise RecipeError(f"data.tokenizer_type=HuggingFaceTokenizer reads a tokenizer folder, and "
                          f"data.tokenizer_model={tokenizer} is a file: give the folder (tokenizer.json, "
                          f"tokenizer_config.json), or data.tokenizer_type=SentencePieceTokenizer for a .model.")
    else:
        try:
            check_sentencepiece(Path(tokenizer))
        except ValueError as err:
            raise RecipeError(f"data.tokenizer_model: {err}") from None


def check_recipe(recipe, extra: list[str]):
    """(megatron's argv for the recipe, the values the run uses: the recipe with the raw Megatron flags
    `extra`, which win), after the checks `pretrain` and `submit` share; RecipeError names the key."""
    use_tokenizer_kind(recipe)
    parser = megatron_parser()
    argv = recipe_argv(recipe, parser)
    run_values = with_flags(recipe, extra, parser)
    check_schedule(run_values)
    check_model(run_values)
    return argv, run_values


def launch(recipe_name: str, overrides: list[str], extra: list[str]) -> int:
    """Validate the recipe here (cheap, before any process starts), then run it on N processes."""
    recipe = load_recipe(recipe_name, overrides)
    argv, run_values = check_recipe(recipe, extra)
    under_launcher = _under_launcher()
    if under_launcher:
        check_world(run_values, int(os.environ.get("WORLD_SIZE", "1")), "WORLD_SIZE", "the job's task count")
    else:  # default: one model replica
        nproc = int(run_values.get("nproc_per_node") or math.prod(model_parallel_sizes(run_values)))
        check_world(run_values, nproc, "parallelism.nproc_per_node", "parallelism.nproc_per_node")
    check_load(run_values)
    check_data(run_values)
    if under_launcher:
        return run(argv + platform_flags() + list(extra))  # raw Megatron flags last: they win
    cmd = [sys.executable, "-m", "megatron_stag.platform.torchrun", f"--nproc-per-node={nproc}",
           "-m", "megatron_stag.cli", "pretrain", str(recipe_name), *overrides]
    if extra:
        cmd += ["--", *extra]
    log_file = recipe.get("log_file") or (Path(recipe.get("save")) / "train.log" if recipe.get("save") else None)
    return _run_logged(cmd, Path(log_file) if log_file else None)


def _run_logged(cmd: list[str], log_file: Path | None) -> int:
    """Run the job (an argv list: no shell ever sees recipe values), echoing its output and
    appending it to `log_file` (a resumed run continues the same log; `megatron-stag plot` reads it).
    Ctrl-C reaches the job's processes from the terminal; this one ignores it and keeps echoing and
    logging until they have stopped, then returns their status."""
    env = dict(os.environ)
    env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # megatron's TP/SP overlap needs it (Hopper)
    output = subprocess.PIPE if log_file is not None else None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    with subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT if output else None, text=True,
                          bufsize=1, env=env) as proc:
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # after the fork: the job keeps SIGINT
        try:
            if log_file is not None:
                with open(log_file, "a", encoding="utf-8") as log:
                    for line in proc.stdout:
                        sys.stdout.write(line)
                        log.write(line)
            return proc.wait()
        finally:
            signal.signal(signal.SIGINT, interrupt)


def platform_flags() -> list[str]:
    """Flags this machine needs: megatron's fused rope, grad-accumulation and persistent layer norm
    are TE/apex kernels; no one_logger metrics where its (NVIDIA-internal) package is absent (megatron
    would print that it is missing at every start). Without CUDA: gloo, and the bias + activation and
    bias + dropout + add functions unfused: fused, they are torch.compile'd, and inductor compiling C++
    for them cost every process seconds for no faster steps (tiny-cpu-stag, with megatron's warm-up of
    them skipped too: start-up 5.1-5.5 -> 1.5 s, first iteration 1.55 -> 0.96 s, the next nine 268 ->
    218 ms each, then 112 -> 107-113 ms)."""
    from megatron.core.extensions.transformer_engine import HAVE_TE

    flags = [] if HAVE_TE else ["--no-rope-fusion", "--no-gradient-accumulation-fusion",
                                "--no-persist-layer-norm"]
    if importlib.util.find_spec("one_logger") is None:
        flags.append("--no-one-logger")
    if torch.cuda.is_available():
        return flags
    return flags + ["--distributed-backend", "gloo", "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion",
                    "--no-bias-dropout-fusion"]


# ---------------------------------------------------------------------------- Megatron hooks
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
    from megatron.training import get_args, get_tokenizer, print_rank_0
    from megatron.training.utils import get_blend_and_blend_per_split

    from megatron_stag.data.megatron_datasets import build_gpt_datasets
    from megatron_stag.data.token_dataset import DataError

    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    print_rank_0("> building train, validation and test datasets (megatron GPTDataset) ...")
    try:
        return build_gpt_datasets(
            blend, blend_per_split, args.split, args.seq_length, get_tokenizer(),
            train_val_test_num_samples, args.seed, args.data_cache_path,
            on_this_rank=lambda: ps.is_pipeline_first_stage() or ps.is_pipeline_last_stage(),
            reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
            eod_mask_loss=args.eod_mask_loss, mid_level_dataset_surplus=args.mid_level_dataset_surplus)
    except DataError as err:  # the message is the whole story: once, without a traceback per rank
        raise SystemExit(str(err) if int(os.environ.get("RANK", "0")) == 0 else 1) from None


datasets_provider.is_distributed = True  # called on every rank; each data rank builds its own


class ProgressLog:
    """Adds tokens/s and ETA after Megatron's iteration line (which has neither in 0.19), and tokens/s
    to TensorBoard as `tokens-per-second` beside Megatron's scalars: wraps
    `megatron.training.training.training_log`, measuring wall time between log intervals."""

    def __init__(self, training_log):
        self.training_log = training_log
        self.last = None  # (iteration, time) at the previous log line

    def __call__(self, *args, **kwargs):
        import time

        from megatron.training import get_args, get_tensorboard_writer, print_rank_last

        out = self.training_log(*args, **kwargs)
        iteration = kwargs["iteration"] if "iteration" in kwargs else args[3]
        a = get_args()
        now = time.time()
        if self.last is None:
            self.last = (iteration, now)
        elif iteration % a.log_interval == 0 and iteration > self.last[0]:
            steps, seconds = iteration - self.last[0], now - self.last[1]
            tokens = steps * a.global_batch_size * a.seq_length / seconds
            eta = (a.train_iters - iteration) * seconds / steps
            print_rank_last(f" progress: iteration {iteration}/{a.train_iters} | tokens/s: {tokens:,.0f} "
                            f"| ETA: {_duration(eta)}")
            writer = get_tensorboard_writer()  # the last rank's, when logging.tensorboard_dir is set
            if writer:
                writer.add_scalar("tokens-per-second", tokens, iteration)
            self.last = (iteration, now)
        return out


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# megatron model options that change the maths but not model_args.json: the serving model (generate,
# export, eval) would decode another model than the one trained, so a run with them stops at start
UNRECORDED = ("rotary_interleaved", "qk_layernorm", "qk_l2_norm", "add_qkv_bias", "attention_output_gate",
              "apply_residual_connection_post_layernorm", "openai_gelu", "squared_relu", "multi_latent_attention",
              "apply_layernorm_1p")


def check_decodable(args) -> None:
    """Refuse, naming the flag, a model option the serving model does not implement (q/k/v biases
    are fine where every linear layer has one: megatron turns add_qkv_bias on for add_bias_linear)."""
    used = [f"--{name.replace('_', '-')}" for name in UNRECORDED if getattr(args, name, False)
            and not (name == "add_qkv_bias" and getattr(args, "add_bias_linear", False))]
    if getattr(args, "rotary_scaling_factor", 1.0) != 1.0:
        used.append(f"--rotary-scaling-factor {args.rotary_scaling_factor}")
    if used:
        raise SystemExit(f"{', '.join(used)}: megatron-stag's decoder (generate, export, eval) does not implement "
                         f"this, so it would decode another model than the one trained; train without it.")


def model_args_of(args):
    """The ModelArgs (model_args.json) of the model megatron's parsed `args` build."""
    from megatron_stag.models.model_args import ModelArgs

    fields = {f: getattr(args, f) for f in ModelArgs.__dataclass_fields__ if hasattr(args, f)}
    fields.update(
        vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        num_moe_experts=args.num_experts,
        kv_channels=None if args.kv_channels * args.num_attention_heads == args.hidden_size else args.kv_channels)
    return ModelArgs(**fields)


def check_loaded_model(args) -> None:
    """A run that starts from another run's (or an import's) checkpoint builds the model that
    checkpoint holds: megatron would stop at the first missing or misshapen weight with a KeyError
    listing every name in the checkpoint. Say which settings differ instead, before anything loads.
    The checkpoint is the one megatron picks: `load` where it holds one, else `pretrained_checkpoint`
    (a run resuming its own save folder is checked by `check_run_files`)."""
    from megatron_stag.checkpointing.checkpoint_io import megatron_latest
    from megatron_stag.models.model_args import ModelArgs

    if int(os.environ.get("RANK", "0")) != 0:
        return
    try:
        key, folder = next(((k, Path(getattr(args, k))) for k in ("load", "pretrained_checkpoint")
                            if getattr(args, k, None) and megatron_latest(Path(getattr(args, k))) is not None),
                           (None, None))
    except ValueError:
        return  # check_load names an unreadable tracker
    if folder is None or (args.save and folder.resolve() == Path(args.save).resolve()):
        return
    try:
        stored = ModelArgs.load(folder / "model_args.json")
    except (FileNotFoundError, ValueError, TypeError):
        return  # a checkpoint megatron-stag did not write: megatron reads the weights alone
    changed = model_args_of(args).differences(stored)
    if changed:
        raise SystemExit(f"checkpoint.{key}={folder} holds another model than this recipe builds (checkpoint -> "
                         f"recipe: {'; '.join(changed)}): set the recipe's model settings (and data.tokenizer_model, "
                         f"which sets vocab_size) to those in {folder / 'model_args.json'} (nothing was written).")


def _write_run_files(args) -> None:
    """model_args.json and the tokenizer (`tokenizer.model`, or a Hugging Face tokenizer's files in
    `tokenizer/`) beside Megatron's checkpoints, for `generate`, `export` and `eval`."""
    from megatron_stag.data.tokenizer import load_hf_tokenizer, save_hf_tokenizer

    if not args.save or int(os.environ.get("RANK", "0")) != 0:
        return
    save = Path(args.save)
    save.mkdir(parents=True, exist_ok=True)
    wanted = model_args_of(args)
    tokenizer = Path(args.tokenizer_model) if args.tokenizer_model and Path(args.tokenizer_model).exists() else None
    check_run_files(save, wanted, tokenizer)
    schedule = _schedule(args)
    if not (args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler):
        check_resumed_schedule(save, schedule, resuming=args.load and Path(args.load) == save)
    write_atomic(save / "schedule.json", json.dumps(schedule, indent=2) + "\n")
    wanted.save(save / "model_args.json")
    if tokenizer is not None and tokenizer.is_dir():
        if not (save / "tokenizer").is_dir():
            save_hf_tokenizer(load_hf_tokenizer(tokenizer), save / "tokenizer")
    elif tokenizer is not None:
        shutil.copyfile(tokenizer, save / "tokenizer.model")


def _schedule(args) -> dict:
    """What megatron's OptimizerParamScheduler insists be unchanged when it resumes."""
    return dict(lr=args.lr, min_lr=args.min_lr, lr_warmup_iters=args.lr_warmup_iters,
                lr_decay_iters=args.lr_decay_iters or args.train_iters, lr_decay_style=args.lr_decay_style,
                start_weight_decay=args.start_weight_decay, end_weight_decay=args.end_weight_decay)


def check_resumed_schedule(save: Path, schedule: dict, resuming: bool) -> None:
    """megatron asserts deep in its checkpoint loading when a resumed run changes the LR schedule; say
    which values changed, and how to proceed, before anything loads."""
    stored = save / "schedule.json"
    if not resuming or not stored.is_file() or not (save / MEGATRON_TRACKER).is_file():
        return
    before = json.loads(stored.read_text())
    changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in schedule.items() if before.get(k) != v]
    if changed:
        raise SystemExit(f"checkpoint.save={save} resumes a run with another LR schedule ({'; '.join(changed)}): "
                         f"keep the run's values, or add `-- --override-opt_param-scheduler` to take the new "
                         f"ones (or `-- --use-checkpoint-opt_param-scheduler` to keep the checkpoint's).")


def check_run_files(save: Path, wanted, tokenizer: Path | None) -> None:
    """A save folder belongs to one model: resuming with other model settings or another tokenizer
    would overwrite what `generate` reads for the checkpoints already there. Refuse before writing."""
    from megatron_stag.models.model_args import ModelArgs

    stored_args, stored_tok = save / "model_args.json", save / "tokenizer.model"
    if stored_args.is_file():
        try:
            stored = ModelArgs.load(stored_args)
        except (ValueError, TypeError) as err:
            raise SystemExit(f"{stored_args} is not a model description ({err}): move it away or use "
                             f"another checkpoint.save.") from None
        changed = wanted.differences(stored)
        if changed:
            raise SystemExit(f"checkpoint.save={save} holds checkpoints of another model ({'; '.join(changed)}): "
                             f"use a new checkpoint.save (nothing was written).")
    if tokenizer is not None and not _same_tokenizer(tokenizer, stored_tok, save / "tokenizer"):
        own = stored_tok if stored_tok.is_file() else save / "tokenizer"
        raise SystemExit(f"checkpoint.save={save} holds checkpoints trained with another tokenizer than "
                         f"{tokenizer}: use a new checkpoint.save or the run's own {own}.")


def _same_tokenizer(tokenizer: Path, stored_model: Path, stored_folder: Path) -> bool:
    """Whether `tokenizer` (a .model file or a Hugging Face tokenizer folder) is the one a save folder
    holds, if it holds one: the same bytes, or for folders the same ids (`same_hf_tokenizer`)."""
    from megatron_stag.data.tokenizer import load_hf_tokenizer, same_hf_tokenizer

    if not (stored_model.is_file() or stored_folder.is_dir()):
        return True
    if tokenizer.is_dir() != stored_folder.is_dir():
        return False
    if tokenizer.is_dir():
        return same_hf_tokenizer(load_hf_tokenizer(tokenizer), load_hf_tokenizer(stored_folder))
    return stored_model.read_bytes() == tokenizer.read_bytes()


def use_shipped_dataset_helpers() -> None:
    """megatron.training compiles its C++ dataset helpers with `make` on rank 0; the megatron-core
    wheel ships them compiled but without the Makefile, so that step fails on every machine. Skip it
    when the compiled module imports (a source checkout still compiles)."""
    from megatron.core.datasets import utils as dataset_utils

    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return
    dataset_utils.compile_helpers = lambda: None


def _arguments_to_file(args) -> None:
    """Megatron prints its ~770 resolved arguments at start-up; they go to the run's folder
    (`<checkpoint.save>/megatron_arguments.txt`) with one line on the terminal naming the file,
    after `_write_run_files` has checked that the folder is this run's to write."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    lines = sorted((f"  {name} {'.' * (48 - len(name))} {value}" for name, value in vars(args).items()),
                   key=str.lower)
    if not args.save:
        print("\n".join(["------------------------ arguments ------------------------", *lines]), flush=True)
        return
    path = Path(args.save) / "megatron_arguments.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "\n".join(lines) + "\n")
    print(f"megatron arguments: {path}", flush=True)


def run(argv: list[str]) -> int:
    """One process of the job (under torchrun/srun): parse Megatron's argv, adapt the platform, train."""
    from megatron_stag.checkpointing import safe_unpickle
    from megatron_stag.platform import cpu

    safe_unpickle.install()  # megatron's --load reads torch_dist metadata and byte items
    if cpu.activate():
        cpu.adapt_megatron_training()
    use_shipped_dataset_helpers()
    from megatron.training import training as megatron_training

    megatron_training.training_log = ProgressLog(megatron_training.training_log)
    from megatron.training import arguments as megatron_arguments

    megatron_arguments._print_args = lambda title, args: None  # written below, once the save folder is checked
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.arguments import parse_and_validate_args
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from megatron_stag.training.megatron_builder import add_megatron_stag_args, stag_gpt_config_from_args

    sys.argv = [sys.argv[0], *argv]
    args = parse_and_validate_args(extra_args_provider=add_megatron_stag_args)
    check_decodable(args)
    check_loaded_model(args)
    if not args.async_save:
        write_results_in_process()
    _write_run_files(args)
    _arguments_to_file(args)
    cfg = pretrain_cfg_container_from_args(args, stag_gpt_config_from_args(args))
    pretrain(cfg, datasets_provider, ModelType.encoder_or_decoder, forward_step)
    return 0


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
