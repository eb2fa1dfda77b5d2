"""A megatron distributed checkpoint (any TP/PP) -> the serving model, in memory (`generate`) or as a
plain-PyTorch package on disk (`megatron-stag export`).

The checkpoint is loaded into a TP=1, PP=1 StagFormerModel (torch_dist reshards any saved layout),
then every megatron module is mapped onto `model.StagLM`'s conventional names: megatron's fused
`linear_qkv` (per query group: the group's query heads, then its key and value) splits into
q/k/v_proj, the cross-attention's `linear_kv` (per head: key, value) into k/v_proj, a gated
`linear_fc1` ([gate; up]) into gate/up_proj. The package is a folder with `config.json`,
`model.safetensors` (shared and tied tensors stored once) and the tokenizer; it is written to a
temporary sibling and renamed, so it is complete or absent.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_stag.serving.model import PlainConfig, StagLM, load_plain_model

if TYPE_CHECKING:
    from megatron_stag.models.model_args import ModelArgs


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype names


class ExportError(ValueError):
    pass


def check_exportable(args) -> None:
    """Refuse what the plain model does not implement, before any checkpoint is read."""
    if args.altup_sequence_stride > 1:
        raise ExportError(f"altup_sequence_stride={args.altup_sequence_stride}: Sequence-AltUp is not "
                          f"exported (no decoder implements its anchor states); evaluate it with the forward.")
    if args.num_moe_experts and args.moe_router_topk > args.num_moe_experts:
        raise ExportError(f"moe_router_topk={args.moe_router_topk} exceeds num_moe_experts={args.num_moe_experts}.")
    if args.normalization not in ("LayerNorm", "RMSNorm"):
        raise ExportError(f"normalization={args.normalization!r}: export supports LayerNorm and RMSNorm.")


def plain_config(model, args) -> PlainConfig:
    cfg = model.config
    active = []
    if cfg.altup_enabled:
        active = [[layer.altup.active_block for layer in block.layers] for block in model.blocks]
    rope = model.position_embedding_type == "rope"
    return PlainConfig(
        vocab_size=model.vocab_size, max_sequence_length=model.max_sequence_length,
        hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups or cfg.num_attention_heads, head_dim=cfg.kv_channels,
        section_layers=list(cfg.section_layers), shared_weights=cfg.stag_shared_weights,
        cross_window=cfg.stag_cross_window, output=cfg.stag_output, null_entry=cfg.stag_null_entry,
        normalization=cfg.normalization, norm_eps=cfg.layernorm_epsilon,
        activation="swiglu" if cfg.gated_linear_unit else "gelu", bias=cfg.add_bias_linear,
        position_embedding=model.position_embedding_type,
        rotary_dim=2 * model.rotary_pos_emb.inv_freq.numel() if rope else 0,
        rotary_base=float(model.rotary_base), rope_scaling_factor=model.rope_scaling_factor if rope else None,
        tie_embeddings=model.share_embeddings_and_output_weights,
        altup_blocks=cfg.altup_blocks, altup_active=active, altup_embedding=cfg.altup_embedding,
        altup_output=cfg.altup_output, altup_form=cfg.altup_form, altup_coef_clip=cfg.altup_coef_clip,
        moe_experts=cfg.num_moe_experts or 0, moe_topk=cfg.moe_router_topk,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size)


def _linear(sd: dict, name: str, weight, bias) -> None:
    sd[f"{name}.weight"] = weight
    if bias is not None:
        sd[f"{name}.bias"] = bias


def _norm(sd: dict, name: str, norm) -> None:
    for key, value in norm.state_dict().items():
        sd[f"{name}.{key}"] = value


def _layer(sd: dict, p: str, layer, cfg: PlainConfig) -> None:
    hd, heads, groups = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    per_group = heads // groups
    _norm(sd, f"{p}.input_layernorm", layer.input_layernorm)
    qkv = layer.self_attention.linear_qkv
    w = qkv.weight.view(groups, per_group + 2, hd, -1)
    b = qkv.bias.view(groups, per_group + 2, hd) if qkv.bias is not None else None
    for name, sl in (("q_proj", slice(0, per_group)), ("k_proj", slice(per_group, per_group + 1)),
                     ("v_proj", slice(per_group + 1, per_group + 2))):
        _linear(sd, f"{p}.self_attn.{name}", w[:, sl].reshape(-1, w.shape[-1]),
                b[:, sl].reshape(-1) if b is not None else None)
    proj = layer.self_attention.linear_proj
    _linear(sd, f"{p}.self_attn.o_proj", proj.weight, proj.bias)
    if getattr(layer, "cross_attention", None) is not None and hasattr(layer.cross_attention, "linear_kv"):
        cross = layer.cross_attention
        _norm(sd, f"{p}.cross_attn_layernorm", layer.pre_cross_attn_layernorm)
        _linear(sd, f"{p}.cross_attn.q_proj", cross.linear_q.weight, cross.linear_q.bias)
        kv = cross.linear_kv.weight.view(heads, 2, hd, -1)
        kvb = cross.linear_kv.bias.view(heads, 2, hd) if cross.linear_kv.bias is not None else None
        for i, name in enumerate(("k_proj", "v_proj")):
            _linear(sd, f"{p}.cross_attn.{name}", kv[:, i].reshape(-1, kv.shape[-1]),
                    kvb[:, i].reshape(-1) if kvb is not None else None)
        _linear(sd, f"{p}.cross_attn.o_proj", cross.linear_proj.weight, cross.linear_proj.bias)
    _norm(sd, f"{p}.post_attention_layernorm", layer.pre_mlp_layernorm)
    if cfg.moe_experts:
        sd[f"{p}.mlp.router"] = layer.mlp.router.weight
        for e, expert in enumerate(layer.mlp.experts.local_experts):
            _mlp(sd, f"{p}.mlp.experts.{e}", expert, cfg)
    else:
        _mlp(sd, f"{p}.mlp", layer.mlp, cfg)
    if hasattr(layer, "altup"):
        for key, value in layer.altup.state_dict().items():
            sd[f"{p}.altup.{key}"] = value


def _mlp(sd: dict, p: str, mlp, cfg: PlainConfig) -> None:
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    if cfg.activation == "swiglu":
        f = fc1.weight.shape[0] // 2  # [gate; up]
        _linear(sd, f"{p}.gate_proj", fc1.weight[:f], fc1.bias[:f] if fc1.bias is not None else None)
        _linear(sd, f"{p}.up_proj", fc1.weight[f:], fc1.bias[f:] if fc1.bias is not None else None)
    else:
        _linear(sd, f"{p}.up_proj", fc1.weight, fc1.bias)
    _linear(sd, f"{p}.down_proj", fc2.weight, fc2.bias)


def plain_state_dict(model, cfg: PlainConfig) -> dict:
    """The megatron model's weights under StagLM's names (shared modules listed once per section)."""
    sd = {"embed_tokens.weight": model.embedding.word_embeddings.weight}
    if cfg.position_embedding == "learned_absolute":
        sd["embed_positions.weight"] = model.embedding.position_embeddings.weight
    if cfg.altup_blocks > 1 and cfg.altup_embedding == "widened":
        sd["altup_embed_tokens.weight"] = model.altup_widening.extra_embeddings.weight
    if cfg.altup_blocks > 1 and cfg.altup_embedding == "projected":
        for i, w in enumerate(model.altup_widening.projections):
            sd[f"altup_projections.{i}"] = w
    for k, block in enumerate(model.blocks):
        for i, layer in enumerate(block.layers):
            _layer(sd, f"sections.{k}.layers.{i}", layer, cfg)
        final = block.final_layernorm
        if cfg.altup_blocks > 1:
            _norm(sd, f"sections.{k}.norm", final.norm)
            if cfg.altup_output == "learned":
                sd[f"sections.{k}.collapse"] = final.weight
            if cfg.altup_output == "projected":
                for i, w in enumerate(final.projections):
                    sd[f"sections.{k}.collapse_projections.{i}"] = w
        else:
            _norm(sd, f"sections.{k}.norm", final)
    if cfg.output == "combine":
        sd["section_mix"] = model.section_mix
    sd["lm_head.weight"] = (model.shared_embedding_or_output_weight() if cfg.tie_embeddings
                            else model.output_layer.weight)
    return {key: value.detach() for key, value in sd.items()}


def to_plain_model(model, args, device="cpu") -> StagLM:
    """A (TP=1, PP=1) StagFormerModel -> the equivalent StagLM with the same weights (fp32 on `device`)."""
    cfg = plain_config(model, args)
    with torch.device(device):
        plain = StagLM(cfg)
    plain.load_state_dict(plain_state_dict(model, cfg), strict=True)
    return plain.eval()


def export_checkpoint(checkpoint: Path, out: Path, dtype: torch.dtype = torch.float32,
                      tokenizer: Path | None = None, format: str = "plain", max_shard_bytes: int = 5 << 30) -> Path:
    """Write the package for `checkpoint` (anything `resolve_checkpoint` accepts) to `out`: our plain
    format, or (`format="hf"`) a Hugging Face transformers folder (`write_hf_folder`). It carries the
    model's tokenizer (or `tokenizer`: a sentencepiece .model or a Hugging Face tokenizer folder)."""
    from safetensors.torch import save_model

    from megatron_stag.data.tokenizer import save_hf_tokenizer
    from megatron_stag.platform.files import staged_folder

    if format not in ("plain", "hf"):
        raise ExportError(f"format={format!r}: choose 'plain' or 'hf'.")
    out = Path(out)
    if out.exists():
        raise ExportError(f"{out} exists: export into a new folder (nothing was written).")
    cfg, run_dir = describe(checkpoint)
    tokenizer = model_tokenizer(run_dir, tokenizer)
    if format == "hf" and tokenizer is None:
        raise ExportError(f"{run_dir / 'tokenizer.model'} does not exist: a Hugging Face folder ships its tokenizer; "
                          f"pass --tokenizer with the sentencepiece .model (or Hugging Face tokenizer folder) the "
                          f"model was trained with.")
    if tokenizer is not None and (vocab := _tokenizer_vocab(tokenizer)) > cfg.vocab_size:
        raise ExportError(f"{_named(tokenizer)} has {vocab} pieces, more than the model's vocab_size "
                          f"{cfg.vocab_size}: pass the tokenizer the model was trained with.")
    _stage(f"reading {checkpoint}")
    plain = load_serving_model(checkpoint, dtype=dtype)
    _stage(f"writing {sum(p.numel() for p in plain.parameters()) / 1e6:,.1f}M parameters ({format}) to {out}")
    with staged_folder(out) as tmp:
        if format == "hf":
            write_hf_folder(plain, tokenizer, tmp, dtype, max_shard_bytes)
        else:
            plain.cfg.save(tmp / "config.json")
            save_model(plain, str(tmp / "model.safetensors"))
            if isinstance(tokenizer, Path):
                shutil.copyfile(tokenizer, tmp / "tokenizer.model")
            elif tokenizer is not None:
                save_hf_tokenizer(tokenizer, tmp / "tokenizer")
        if (run_dir / "generation_config.json").is_file():  # the end tokens it came with (imports)
            shutil.copyfile(run_dir / "generation_config.json", tmp / "generation_config.json")
    return out


def model_tokenizer(folder: Path, override: Path | None = None):
    """The tokenizer a package of the model in `folder` carries: the path of its sentencepiece .model,
    its transformers tokenizer (`prompt_tokenizer.transformers_tokenizer`: BOS and all), or None where
    it has neither. `override` (a .model file or a tokenizer folder) replaces the model's own."""
    from megatron_stag.data.tokenizer import check_sentencepiece, load_hf_tokenizer
    from megatron_stag.serving.prompt_tokenizer import transformers_tokenizer

    if override is not None:
        override = Path(override)
        if not override.exists():
            raise ExportError(f"--tokenizer {override} does not exist.")
        if override.is_dir():
            return load_hf_tokenizer(override)
        try:
            check_sentencepiece(override)
        except ValueError as err:
            raise ExportError(f"--tokenizer: {err}") from None
        return override
    folder = Path(folder)
    try:
        own = transformers_tokenizer(folder)
    except FileNotFoundError:
        if any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise
        return None  # weights alone: the package has no tokenizer either
    return own if own is not None else (folder / "tokenizer.model" if (folder / "tokenizer.model").is_file() else None)


def _named(tokenizer) -> str:
    return str(tokenizer) if isinstance(tokenizer, Path) else f"tokenizer {tokenizer.name_or_path}"


def _stage(what: str) -> None:
    """A line per stage on stderr: a 1B model takes tens of seconds to read and as long to write."""
    print(f"{what} ...", file=sys.stderr, flush=True)


def _tokenizer_vocab(path) -> int:
    import sentencepiece as spm

    if not isinstance(path, Path):
        return len(path)
    try:
        return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except (RuntimeError, OSError) as err:
        raise ExportError(f"{path} is not a sentencepiece model ({err}).") from None


def write_hf_folder(plain: StagLM, tokenizer, out: Path, dtype: torch.dtype,
                    max_shard_bytes: int = 5 << 30) -> None:
    """A transformers folder. A model in Llama's shape (`model.llama_shaped`: a baseline GPT of the
    production recipes) is written as transformers' own LlamaForCausalLM; any other as
    StagForCausalLM, config.json naming `hf_model.py` (the wrapper) and `model.py` (the serving model)
    in `auto_map`, both copied here so megatron_stag is not needed to load it. Safetensors weights
    (every name of a shared or tied tensor written, so transformers finds each), sharded above
    `max_shard_bytes` with an index; generation_config.json; the tokenizer (`model_tokenizer`'s: a
    sentencepiece model, written with its transformers tokenizer by `write_hf_tokenizer`, or a
    transformers tokenizer, written as it is, its BOS named in config.json; None: none, e.g. for a
    model under test)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig

    from megatron_stag.serving import hf_model, model as model_module

    bos, eos = _special_ids(tokenizer)
    cfg, llama = plain.cfg, model_module.llama_shaped(plain.cfg)
    common = dict(dtype=str(dtype).removeprefix("torch."), bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    if llama:
        config = LlamaConfig(
            architectures=["LlamaForCausalLM"], vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
            intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.section_layers[0],
            num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
            head_dim=cfg.head_dim, max_position_embeddings=cfg.max_sequence_length, rms_norm_eps=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings,
            rope_parameters=dict(rope_type="default", rope_theta=cfg.rotary_base) if cfg.rope_scaling_factor is None
            else dict(rope_type="llama3", rope_theta=cfg.rotary_base, factor=cfg.rope_scaling_factor,
                      **model_module.LLAMA3_ROPE), **common)
    else:
        config = hf_model.StagConfig.from_plain(
            cfg, architectures=["StagForCausalLM"], **common,
            auto_map={"AutoConfig": "hf_model.StagConfig", "AutoModelForCausalLM": "hf_model.StagForCausalLM"})
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos).save_pretrained(out)
    name = model_module.llama_name if llama else (lambda k: f"model.{k}")
    state = {name(k): v.detach().to(dtype).contiguous().clone() for k, v in plain.state_dict().items()}
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_bytes)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = dict(metadata={"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     weight_map=split.tensor_to_filename)
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if not llama:
        for module in (hf_model, model_module):
            shutil.copyfile(module.__file__, out / Path(module.__file__).name)
    if isinstance(tokenizer, Path):
        write_hf_tokenizer(tokenizer, out, cfg.max_sequence_length)
    elif tokenizer is not None:
        tokenizer.save_pretrained(out)


def _special_ids(tokenizer) -> tuple[int | None, int | None]:
    """(BOS, end of text) for `model_tokenizer`'s tokenizer: a transformers tokenizer's own (its
    bos_token_id in config.json is what has `generate` and `eval` prompt the folder through it), none
    for a sentencepiece model of `prepare-data` (its models were trained without a BOS)."""
    if tokenizer is None:
        return None, None
    if not isinstance(tokenizer, Path):
        return tokenizer.bos_token_id, tokenizer.eos_token_id
    import sentencepiece as spm

    eos = spm.SentencePieceProcessor(model_file=str(tokenizer)).eos_id()
    return None, eos if eos >= 0 else None


def write_hf_tokenizer(tokenizer: Path, out: Path, max_length: int) -> None:
    """The sentencepiece model (what `generate` and `import` read) and its transformers tokenizer:
    `tokenizer.json` where exact, else `hf_tokenizer.py` named in `auto_map` (`hf_tokenizer`)."""
    from megatron_stag.serving import hf_tokenizer

    shutil.copyfile(tokenizer, out / "tokenizer.model")
    tok = hf_tokenizer.hf_tokenizer(tokenizer, model_max_length=max_length)
    tok.save_pretrained(out)
    if isinstance(tok, hf_tokenizer.StagTokenizer):
        shutil.copyfile(hf_tokenizer.__file__, out / Path(hf_tokenizer.__file__).name)
        settings = json.loads((out / "tokenizer_config.json").read_text())
        settings.update(tokenizer_class="StagTokenizer",
                        auto_map={"AutoTokenizer": ["hf_tokenizer.StagTokenizer", None]})
        (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def describe(path: Path) -> tuple[PlainConfig | ModelArgs, Path]:
    """(the model's description, the folder holding its tokenizer) for an exported package or any
    checkpoint `resolve_checkpoint` accepts, read from JSON alone: prompts and layouts are checked
    against it before any weights load. Both descriptions name vocab_size, max_sequence_length and
    the number of sections the same way."""
    from megatron_stag.checkpointing import safe_unpickle
    from megatron_stag.checkpointing.checkpoint_io import resolve_checkpoint
    from megatron_stag.models.model_args import ModelArgs

    path = Path(path)
    if (path / "config.json").is_file():
        return PlainConfig.load(path / "config.json"), path
    weights, run_dir = resolve_checkpoint(path)
    args = ModelArgs.load(run_dir / "model_args.json")
    check_exportable(args)
    safe_unpickle.check_metadata(weights)
    return args, run_dir


def load_serving_model(path: Path, device="cpu", dtype: torch.dtype = torch.float32) -> StagLM:
    """The serving model for an exported package, or for a megatron checkpoint converted in memory
    (loaded at TP=1/PP=1 whatever layout it was saved with: torch_dist reshards)."""
    from megatron_stag.checkpointing.checkpoint_io import load_model_weights
    from megatron_stag.platform.distributed import initialize

    path = Path(path)
    if (path / "config.json").is_file():
        return load_plain_model(path, device=device, dtype=dtype)
    args, _ = describe(path)
    initialize(tp=1, pp=1)
    model = args.build(args.config()).eval()
    load_model_weights(model, path)
    return to_plain_model(model, args, device=device).to(dtype)


# ------------------------------------------------------------------ serving model -> megatron
def model_args_for(cfg: PlainConfig) -> "ModelArgs":
    """The ModelArgs (megatron model) whose conversion is `cfg`, or an ExportError naming the field
    that has no megatron equivalent here."""
    from megatron_stag.models.model_args import ModelArgs

    if cfg.rotary_base != int(cfg.rotary_base):
        raise ExportError(f"rotary_base={cfg.rotary_base}: megatron's --rotary-base is a whole number; this "
                          f"model cannot be imported.")
    percent = cfg.rotary_dim / cfg.head_dim if cfg.position_embedding == "rope" else 1.0
    if int(cfg.head_dim * percent) != (cfg.rotary_dim if cfg.position_embedding == "rope" else cfg.head_dim):
        raise ExportError(f"rotary_dim={cfg.rotary_dim} is no fraction of head_dim={cfg.head_dim} that megatron's "
                          f"--rotary-percent gives; this model cannot be imported.")
    schedule, fixed_block = "alternating", 0
    blocks = {b for section in cfg.altup_active for b in section}
    if cfg.altup_blocks > 1 and len(blocks) == 1 and any(len(s) > 1 for s in cfg.altup_active):
        schedule, fixed_block = "fixed", blocks.pop()
    return ModelArgs(
        vocab_size=cfg.vocab_size, max_sequence_length=cfg.max_sequence_length,
        num_layers=sum(cfg.section_layers), hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        kv_channels=None if cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size else cfg.head_dim,
        num_query_groups=None if cfg.num_query_groups == cfg.num_attention_heads else cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size, normalization=cfg.normalization, swiglu=cfg.activation == "swiglu",
        position_embedding_type=cfg.position_embedding, share_embeddings_and_output_weights=cfg.tie_embeddings,
        stag_sections=cfg.sections, stag_section_layers=list(cfg.section_layers),
        stag_shared_weights=cfg.shared_weights, stag_cross_window=cfg.cross_window, stag_output=cfg.output,
        stag_null_entry=cfg.null_entry,
        altup_blocks=cfg.altup_blocks, altup_schedule=schedule, altup_fixed_block=fixed_block,
        altup_embedding=cfg.altup_embedding, altup_output=cfg.altup_output, altup_form=cfg.altup_form,
        altup_coef_clip=cfg.altup_coef_clip, num_moe_experts=cfg.moe_experts or None, moe_router_topk=cfg.moe_topk,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size, add_bias_linear=cfg.bias, rotary_base=int(cfg.rotary_base),
        rotary_percent=percent, layernorm_epsilon=cfg.norm_eps, use_rope_scaling=cfg.rope_scaling_factor is not None,
        rope_scaling_factor=cfg.rope_scaling_factor or ModelArgs.rope_scaling_factor)


def load_into_megatron(model, cfg: PlainConfig, state: dict) -> None:
    """Write the serving model's weights `state` (StagLM names) into the megatron `model` (TP=1, PP=1):
    the exact inverse of `plain_state_dict`, found by running that mapping once over element ids
    (each megatron parameter filled with (its index << 32) + element index, in float64), so the two
    directions cannot drift apart. Every megatron element must receive a value."""
    params = [p for _, p in model.named_parameters()]
    saved = [p.data for p in params]
    for i, p in enumerate(params):
        p.data = (torch.arange(p.numel(), dtype=torch.float64) + float(i << 32)).view(p.shape)
    try:
        ids = plain_state_dict(model, cfg)
    finally:
        for p, data in zip(params, saved):
            p.data = data
    missing = sorted(set(ids) - set(state))
    if missing:
        raise ExportError(f"weights missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}.")
    covered = [torch.zeros(p.numel(), dtype=torch.bool) for p in params]
    with torch.no_grad():
        for name, traced in ids.items():
            flat = traced.reshape(-1).long()
            values = state[name].reshape(-1).to(torch.float32)
            if values.numel() != flat.numel():
                raise ExportError(f"{name}: {tuple(state[name].shape)} does not match the model's "
                                  f"{tuple(traced.shape)}.")
            owners = flat >> 32
            for owner in owners.unique().tolist():
                chosen = owners == owner
                where = flat[chosen] & 0xFFFFFFFF
                params[owner].data.view(-1)[where] = values[chosen].to(params[owner].dtype)
                covered[owner][where] = True
    gaps = [name for (name, _), done in zip(model.named_parameters(), covered) if not done.all()]
    if gaps:
        raise ExportError(f"no serving-model weight maps onto {gaps[:5]}: this model cannot be imported.")


def import_checkpoint(source: Path, out: Path) -> Path:
    """An exported folder (`export --format hf`, or a plain package) -> a megatron checkpoint directory
    that `pretrain` continues from (`checkpoint.load=OUT`; megatron's 'release' tracker: weights only,
    iteration 0, fresh optimizer) and `generate`/`export` read. Saved at TP=1/PP=1: torch_dist reshards
    it to the layout of whatever run loads it. Written to a temporary sibling and renamed."""
    from megatron.core import dist_checkpointing

    from megatron_stag.checkpointing.checkpoint_io import (MEGATRON_TRACKER, resolve_checkpoint,
                                                           write_results_in_process)
    from megatron_stag.data.tokenizer import save_hf_tokenizer
    from megatron_stag.platform.distributed import initialize
    from megatron_stag.platform.files import staged_folder

    source, out = Path(source), Path(out)
    if out.exists():
        raise ExportError(f"{out} exists: import into a new folder (nothing was written).")
    if source.is_dir() and not (source / "config.json").is_file():
        try:
            _, run_dir = resolve_checkpoint(source)
        except (FileNotFoundError, ValueError):
            pass  # load_plain_model names what is missing
        else:
            raise ExportError(f"{source} is a megatron checkpoint already: train from it with "
                              f"checkpoint.load={run_dir} (import reads what `export` writes, and Hugging Face "
                              f"Llama folders).")
    _stage(f"reading {source}")
    plain = load_plain_model(source)
    args = model_args_for(plain.cfg)
    tokenizer = model_tokenizer(source)
    initialize(tp=1, pp=1)
    model = args.build(args.config()).eval()
    if plain_config(model, args) != plain.cfg:
        raise ExportError(f"{source / 'config.json'} describes a model megatron-stag does not build the same "
                          f"way (altup_active or a default differs): it cannot be imported.")
    load_into_megatron(model, plain.cfg, plain.state_dict())
    _stage(f"writing {sum(p.numel() for p in plain.parameters()) / 1e6:,.1f}M parameters (megatron torch_dist) to {out}")
    write_results_in_process()
    with staged_folder(out) as tmp:
        (tmp / "release").mkdir()
        dist_checkpointing.save({"model": model.sharded_state_dict(), "checkpoint_version": 3.0, "iteration": 0},
                                str(tmp / "release"))
        (tmp / MEGATRON_TRACKER).write_text("release")
        args.save(tmp / "model_args.json")
        if isinstance(tokenizer, Path):
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        elif tokenizer is not None:  # prompts keep their BOS; `pretrain` trains on with data.tokenizer_model=OUT/tokenizer
            save_hf_tokenizer(tokenizer, tmp / "tokenizer")
        if (source / "generation_config.json").is_file():  # its end tokens (`prompt_tokenizer.end_ids`)
            shutil.copyfile(source / "generation_config.json", tmp / "generation_config.json")
    return out
