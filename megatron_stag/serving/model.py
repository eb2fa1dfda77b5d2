"""The serving model: a StagFormer / AltUp language model in plain PyTorch, what `generate` decodes
(converted in memory from a megatron checkpoint) and what `megatron-stag export` writes.

Loadable without megatron (torch and safetensors only), built from `nn.Linear` layers with the usual
names (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`), so DeepSpeed's
AutoTP can shard it by name. The maths is megatron's (see `models/stagformer_model.py`): pre-norm
layers, rotary or learned positions, section k >= 1 cross-attending to section k-1's final normed
outputs shifted right by one (entry 0 = the null entry, entry j = position j-1), optionally inside a
window; AltUp's K-block stream with predict/correct around every layer; megatron's MoE MLP.

One code path serves the teacher-forced forward and decoding: a section runs over new positions of
some cache rows, writing their self-attention K/V into its cache and reading cross-attention entries
from its cross cache (`SectionCache`). The forward is a prefill of every row at once. Head counts are
read from the weight shapes, so the same modules run whole or tensor-parallel (sharded by DeepSpeed).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FORMAT_VERSION = 1
HF_MODEL_TYPE = "stagformer"  # config.json of `export --format hf` (hf_model.py)
LLAMA_MODEL_TYPE = "llama"  # ... of a one-section model in Llama's shape (`llama_shaped`)
LLAMA_NAMES = (("model.embed_tokens.", "embed_tokens."), ("model.layers.", "sections.0.layers."),
               ("model.norm.", "sections.0.norm."))  # the rest (q_proj, mlp.up_proj, lm_head, ...) agree
_EPS = 1e-6  # AltUp's RMS rescaling floor (layers/altup_stream.py)


@dataclass
class PlainConfig:
    vocab_size: int
    max_sequence_length: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    section_layers: list[int]
    shared_weights: bool = False
    cross_window: Optional[int] = None
    output: str = "last"  # 'last' section, or 'combine' (learned mix of all sections)
    null_entry: str = "all"  # who reads the cross-attention's null entry: 'all' positions or 'first' only
    normalization: str = "LayerNorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"  # or 'swiglu'
    bias: bool = True
    position_embedding: str = "learned_absolute"  # or 'rope'
    rotary_dim: int = 0
    rotary_base: float = 10000.0
    rope_scaling_factor: Optional[float] = None  # Llama 3's frequency scaling (`llama3_frequencies`); None: off
    tie_embeddings: bool = True
    altup_blocks: int = 1
    altup_active: list[list[int]] = field(default_factory=list)  # active block per layer, per section
    altup_embedding: str = "recycled"
    altup_output: str = "sum"
    altup_form: str = "standard"
    altup_coef_clip: Optional[float] = None
    moe_experts: int = 0  # > 0: every layer's MLP is megatron's MoE (softmax top-k router)
    moe_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    format_version: int = FORMAT_VERSION

    @property
    def sections(self) -> int:
        return len(self.section_layers)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "PlainConfig":
        """Read and check an exported config.json: every error names the file and the field."""
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}): export the checkpoint again.") from None
        if isinstance(data, dict) and data.get("model_type") == LLAMA_MODEL_TYPE:
            data = _from_llama(data, path)
        elif isinstance(data, dict) and "model_type" in data:  # a Hugging Face config
            if data["model_type"] != HF_MODEL_TYPE:
                raise ValueError(f"{path}: model_type {data['model_type']!r} is not a megatron-stag model "
                                 f"({HF_MODEL_TYPE!r} or {LLAMA_MODEL_TYPE!r}): export one with "
                                 f"`megatron-stag export CKPT OUT --format hf`.")
            data = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            version = data.get("format_version") if isinstance(data, dict) else None
            raise ValueError(f"{path}: format_version {version} is not {FORMAT_VERSION}: re-export the "
                             f"checkpoint with this megatron-stag.")
        names = {f.name for f in fields(cls)}
        if set(data) - names:
            raise ValueError(f"{path}: unknown fields {sorted(set(data) - names)}: re-export the checkpoint.")
        try:
            cfg = cls(**data)
        except TypeError as err:
            raise ValueError(f"{path}: {err}: re-export the checkpoint.") from None
        cfg.check(path)
        return cfg

    def check(self, path) -> None:
        def bad(field_name: str, why: str):
            return ValueError(f"{path}: {field_name}={getattr(self, field_name)!r} {why}: fix it or re-export "
                              f"the checkpoint.")

        for name in ("vocab_size", "max_sequence_length", "hidden_size", "ffn_hidden_size",
                     "num_attention_heads", "num_query_groups", "head_dim", "altup_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "must be a whole number >= 1")
        if not self.section_layers or not all(isinstance(n, int) and n >= 1 for n in self.section_layers):
            raise bad("section_layers", "must list at least one section of >= 1 layers")
        if self.num_attention_heads % self.num_query_groups:
            raise bad("num_query_groups", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.null_entry not in ("all", "first"):
            raise bad("null_entry", "must be 'all' or 'first'")
        if self.cross_window is not None and (not isinstance(self.cross_window, int) or self.cross_window < 1):
            raise bad("cross_window", "must be null or a whole number >= 1")
        factor = self.rope_scaling_factor
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0):
            raise bad("rope_scaling_factor", "must be null or a number > 0")


def check_recurrent(cfg, one_rank: bool = True) -> None:
    """ValueError unless recurrent decoding applies: it feeds pass 2's outputs back into its own
    cross-attention, so it needs shared weights, 2 sections, output 'last' and both passes on one rank.
    `cfg` is a PlainConfig or the ModelArgs of a megatron checkpoint (`convert.describe`)."""
    if not (cfg.shared_weights and cfg.sections == 2 and cfg.output == "last" and one_rank):
        raise ValueError("recurrent=True needs shared weights, 2 sections, output 'last' and one rank (it feeds "
                         "pass 2's outputs back into its own cross-attention).")


def llama_shaped(cfg: PlainConfig) -> bool:
    """One section, no AltUp or MoE, RMSNorm, SwiGLU, no biases, rope over whole heads: the model that
    transformers' own LlamaForCausalLM computes, so `export --format hf` writes it as one."""
    return (cfg.sections == 1 and cfg.output == "last" and cfg.altup_blocks == 1 and not cfg.moe_experts
            and cfg.normalization == "RMSNorm" and cfg.activation == "swiglu" and not cfg.bias
            and cfg.position_embedding == "rope" and cfg.rotary_dim == cfg.head_dim)


def llama_name(name: str, to_llama: bool = True) -> str:
    """A StagLM weight's name in LlamaForCausalLM (or back, `to_llama=False`)."""
    for theirs, ours in LLAMA_NAMES:
        old, new = (ours, theirs) if to_llama else (theirs, ours)
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _from_llama(data: dict, path) -> dict:
    """PlainConfig fields for a transformers Llama config.json, refusing what StagLM does not compute."""
    key = "rope_parameters" if data.get("rope_parameters") else "rope_scaling"
    rope = data.get(key) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    llama3 = kind == "llama3" and all(rope.get(k) == v for k, v in LLAMA3_ROPE.items())
    unsupported = dict(hidden_act=data.get("hidden_act", "silu") != "silu", attention_bias=bool(data.get("attention_bias")),
                       mlp_bias=bool(data.get("mlp_bias")), **{key: kind != "default" and not llama3})
    for name, bad in unsupported.items():
        if bad:
            raise ValueError(f"{path}: {name}={data.get(name)!r} is not implemented by megatron-stag's serving model"
                             + (f" (rope_type 'default', or 'llama3' with {LLAMA3_ROPE})" if name == key else "")
                             + ".")
    try:
        heads = data["num_attention_heads"]
        head_dim = data.get("head_dim") or data["hidden_size"] // heads
        return dict(vocab_size=data["vocab_size"], max_sequence_length=data["max_position_embeddings"],
                    hidden_size=data["hidden_size"], ffn_hidden_size=data["intermediate_size"],
                    num_attention_heads=heads, num_query_groups=data.get("num_key_value_heads") or heads,
                    head_dim=head_dim, section_layers=[data["num_hidden_layers"]], normalization="RMSNorm",
                    norm_eps=data.get("rms_norm_eps", 1e-6), activation="swiglu", bias=False,
                    position_embedding="rope", rotary_dim=head_dim,
                    rotary_base=float(rope.get("rope_theta", data.get("rope_theta", 10000.0))),
                    rope_scaling_factor=float(rope["factor"]) if llama3 else None,
                    tie_embeddings=data.get("tie_word_embeddings", False), format_version=FORMAT_VERSION)
    except KeyError as err:
        raise ValueError(f"{path}: {err.args[0]} is missing from this Llama config.") from None


# Llama 3's rope scaling beyond the factor: megatron's RotaryEmbedding fixes these, as every Llama 3.x
# release sets them (3.1: factor 8, 3.2: factor 32)
LLAMA3_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def llama3_frequencies(inv: Tensor, factor: float) -> Tensor:
    """Llama 3's rotary frequencies: wavelengths beyond the original context divided by `factor`, those
    within a quarter of it kept, a smooth blend between; the operations of megatron's
    `RotaryEmbedding._apply_scaling`, in its order, so both give the same fp32 frequencies."""
    low, high, old = LLAMA3_ROPE["low_freq_factor"], LLAMA3_ROPE["high_freq_factor"], \
        LLAMA3_ROPE["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def make_norm(cfg: PlainConfig) -> nn.Module:
    if cfg.normalization == "RMSNorm":
        return nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


# ---------------------------------------------------------------------------------------- layers
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, norm: Optional[nn.Module] = None,
           activation: Optional[str] = None, residual: Optional[Tensor] = None) -> Tensor:
    """activation(norm(x) @ weight.T + bias) + residual, activation None, 'gelu' or 'swiglu' (weight
    [gate; up]): a decode step's matmul with what surrounds it, in one call that a serving engine may
    run as one kernel (`StagLM.use_kernels`)."""
    return _around(F.linear(x if norm is None else norm(x), weight, bias), activation, residual)


def _around(y: Tensor, activation: Optional[str], residual: Optional[Tensor]) -> Tensor:
    if activation == "gelu":
        y = F.gelu(y)
    elif activation == "swiglu":
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y if residual is None else residual + y


def apply(proj: nn.Module, x: Tensor, norm: Optional[nn.Module] = None, activation: Optional[str] = None,
          residual: Optional[Tensor] = None) -> Tensor:
    """`linear` through the projection module `proj`: in one call where it is ours, around it where
    DeepSpeed replaced it (its layers take x alone; a row-parallel one reduces before the residual)."""
    if isinstance(proj, Linear):
        return proj(x, norm, activation, residual)
    return _around(proj(x if norm is None else norm(x)), activation, residual)


class Linear(nn.Linear):
    """nn.Linear whose matmul a serving engine may replace (`StagLM.use_kernels`: faster kernels for
    decode steps' few rows); DeepSpeed's AutoTP still sees, and shards, an nn.Linear."""

    matmul = staticmethod(linear)

    def forward(self, x: Tensor, norm: Optional[nn.Module] = None, activation: Optional[str] = None,
                residual: Optional[Tensor] = None) -> Tensor:
        return self.matmul(x, self.weight, self.bias, norm, activation, residual)


def attention(q: Tensor, keys: Tensor, values: Tensor, keep: Tensor) -> Tensor:
    """[b, heads, n, hd] queries over [b, kv heads, slots, hd] keys and values, the slots where keep
    [b, 1, n, slots] -> [b, n, heads * hd] (before the output projection)."""
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=keep, enable_gqa=keys.shape[1] != q.shape[1])
    return out.transpose(1, 2).flatten(2)


def cached_attention(q: Tensor, k: Tensor, v: Tensor, rope: Optional[tuple[Tensor, Tensor]], kv: Tensor,
                     rows: Optional[Tensor], positions: Tensor, keep: Tensor, attention=attention) -> Tensor:
    """Self-attention of new positions [b', n] of cache rows `rows` (None: every row): the rotary
    embedding on q and k [b', heads, n, hd], k and v written into the cache kv [2, b, kv heads, slots,
    hd] at their positions, then `attention` of q over the rows' cache -> [b', n, heads * hd], over
    as many of its first slots as `keep` [b', 1, n, slots read] covers."""
    if rope is not None:
        q, k = _rotate(q, *rope), _rotate(k, *rope)
    r = (rows if rows is not None else torch.arange(positions.shape[0], device=q.device))[:, None]
    kv[:, r.expand_as(positions), :, positions] = torch.stack((k, v), dim=2).transpose(1, 3)  # [b', n, 2, heads, hd]
    kv = kv[:, :, :, :keep.shape[-1]]
    if rows is not None:
        kv = kv[:, rows]
    return attention(q, kv[0], kv[1], keep)


class Attention(nn.Module):
    """Multi-head (grouped-query for self-attention) attention over a cache given by the caller."""

    matmul = staticmethod(linear)  # of the fused q/k/v (see Linear)
    # a serving engine may replace them (`StagLM.use_kernels`)
    attention = staticmethod(attention)
    cached_attention = staticmethod(cached_attention)

    def __init__(self, cfg: PlainConfig, kv_heads: int):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.head_dim = hd
        self.q_proj = Linear(d, cfg.num_attention_heads * hd, bias=cfg.bias)
        self.k_proj = Linear(d, kv_heads * hd, bias=cfg.bias)
        self.v_proj = Linear(d, kv_heads * hd, bias=cfg.bias)
        self.o_proj = Linear(cfg.num_attention_heads * hd, d, bias=cfg.bias)
        self.qkv = None  # (weight, bias) once fuse_qkv() ran

    def heads(self, x: Tensor, proj: nn.Module) -> Tensor:
        """[b, n, d] -> [b, local heads, n, head_dim] (local: this rank's shard under TP)."""
        return self._split_heads(proj(x))

    def _split_heads(self, y: Tensor) -> Tensor:
        return y.view(*y.shape[:2], -1, self.head_dim).transpose(1, 2)

    def fuse_qkv(self) -> None:
        """One matmul for q, k and v (a decode step reads the three weights in one kernel)."""
        if self.qkv is None:
            self.qkv = fuse_linears([self.q_proj, self.k_proj, self.v_proj])

    def project_qkv(self, x: Tensor, norm: Optional[nn.Module] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of norm(x), each [b, heads, n, hd]."""
        if self.qkv is None:
            x = x if norm is None else norm(x)
            return self.heads(x, self.q_proj), self.heads(x, self.k_proj), self.heads(x, self.v_proj)
        sizes = [self.q_proj.weight.shape[0], self.k_proj.weight.shape[0], self.v_proj.weight.shape[0]]
        return tuple(self._split_heads(y) for y in self.matmul(x, *self.qkv, norm).split(sizes, dim=-1))

    def project_q(self, x: Tensor, norm: nn.Module) -> Tensor:
        return self._split_heads(apply(self.q_proj, x, norm))

    def attend_cached(self, q: Tensor, k: Tensor, v: Tensor, rope: Optional[tuple[Tensor, Tensor]], kv: Tensor,
                      rows: Optional[Tensor], positions: Tensor, keep: Tensor, residual: Optional[Tensor] = None
                      ) -> Tensor:
        """residual + the output projection of `cached_attention` (self-attention over its cache)."""
        core = self.cached_attention(q, k, v, rope, kv, rows, positions, keep, self.attention)
        return apply(self.o_proj, core, residual=residual)

    def attend(self, q: Tensor, keys: Tensor, values: Tensor, keep: Tensor, residual: Optional[Tensor] = None
               ) -> Tensor:
        """residual + the output projection of the attention of q over keys and values."""
        return apply(self.o_proj, self.attention(q, keys, values, keep), residual=residual)


def fuse_linears(linears: list[nn.Linear]) -> tuple[Tensor, Optional[Tensor]]:
    """Concatenate the weights (and biases) of `linears` along the output and make each layer's
    parameters views into the result: one matmul computes them all, with no second copy in memory
    and the parameters (names, sharding, state dict) unchanged."""
    weight = torch.cat([m.weight.data for m in linears])
    bias = torch.cat([m.bias.data for m in linears]) if linears[0].bias is not None else None
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = weight[start:start + rows]
        if bias is not None:
            m.bias.data = bias[start:start + rows]
        start += rows
    return weight, bias


class MLP(nn.Module):
    matmul = staticmethod(linear)  # of the fused gate/up projection (see Linear)

    def __init__(self, cfg: PlainConfig, ffn: Optional[int] = None):
        super().__init__()
        d, f = cfg.hidden_size, ffn or cfg.ffn_hidden_size
        self.gated = cfg.activation == "swiglu"
        if self.gated:
            self.gate_proj = Linear(d, f, bias=cfg.bias)
        self.up_proj = Linear(d, f, bias=cfg.bias)
        self.down_proj = Linear(f, d, bias=cfg.bias)
        self.gate_up = None  # (weight, bias) once fuse() ran

    def fuse(self) -> None:
        """One matmul for the gate and up projections (with the activation, one kernel at decode)."""
        if self.gated and self.gate_up is None:
            self.gate_up = fuse_linears([self.gate_proj, self.up_proj])

    def forward(self, x: Tensor, norm: Optional[nn.Module] = None, residual: Optional[Tensor] = None) -> Tensor:
        """residual + MLP(norm(x))."""
        if self.gate_up is not None:
            h = self.matmul(x, *self.gate_up, norm, "swiglu")
        elif self.gated:
            x = x if norm is None else norm(x)
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = apply(self.up_proj, x, norm, "gelu")
        return apply(self.down_proj, h, residual=residual)


class MoE(nn.Module):
    """megatron's MoE layer at inference: softmax over each token's top-k router logits (fp32), the
    chosen experts' outputs weighted by those probabilities. Computed densely, every expert on every
    row with the unchosen ones weighted 0: exact, and free of data-dependent shapes (a CUDA graph
    replays it), at the cost of reading every expert's weights."""

    def __init__(self, cfg: PlainConfig):
        super().__init__()
        self.topk = cfg.moe_topk
        self.router = nn.Parameter(torch.zeros(cfg.moe_experts, cfg.hidden_size))  # never sharded by name
        self.experts = nn.ModuleList([MLP(cfg, cfg.moe_ffn_hidden_size) for _ in range(cfg.moe_experts)])

    def forward(self, x: Tensor, norm: Optional[nn.Module] = None, residual: Optional[Tensor] = None) -> Tensor:
        """residual + MoE(norm(x))."""
        x = x if norm is None else norm(x)
        logits = F.linear(x, self.router)
        scores, chosen = logits.topk(self.topk, dim=-1)
        weights = torch.zeros_like(logits).scatter(-1, chosen, scores.softmax(-1, dtype=torch.float32).to(x.dtype))
        y = sum(weights[..., e, None] * expert(x) for e, expert in enumerate(self.experts))
        return y if residual is None else residual + y


def _mix(coefs: Tensor, x: Tensor) -> Tensor:
    """out_i = sum_j coefs[..., i, j] x_j for blocks x [..., K, d], as K broadcast multiply-adds:
    pointwise, so a compiled decode step fuses it into its neighbours (an einsum is a batched GEMM
    launch of its own per layer)."""
    return sum(coefs[..., :, j, None] * x[..., j, None, :] for j in range(x.shape[-2]))


class AltUp(nn.Module):
    """AltUp's predict/correct around one layer: standard scalars, or Gemma 3n's router."""

    def __init__(self, cfg: PlainConfig, active: int):
        super().__init__()
        k, d = cfg.altup_blocks, cfg.hidden_size
        self.active, self.blocks, self.gemma = active, k, cfg.altup_form == "gemma3n"
        if self.gemma:
            self.clip = cfg.altup_coef_clip
            self.router_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
            self.router = nn.Parameter(torch.zeros(k, d))  # a Parameter, not a Linear: never sharded
            self.prediction = nn.Parameter(torch.zeros(k * k, k))
            self.correction = nn.Parameter(torch.zeros(k, k))
        else:
            self.prediction = nn.Parameter(torch.eye(k))
            self.correction = nn.Parameter(torch.ones(k))

    def _weight(self, w: Tensor) -> Tensor:
        return w if self.clip is None else w.clamp(-self.clip, self.clip)

    def _modalities(self, x: Tensor) -> Tensor:
        routed = F.linear(self.router_norm(x) / x.shape[-1], self.router)
        return torch.tanh(routed.float()).to(x.dtype)

    def predict(self, stream: Tensor) -> tuple[Tensor, Tensor]:
        """stream [b, n, K*d] -> (the layer's input [b, n, d], prediction [b, n, K, d])."""
        x = stream.unflatten(-1, (self.blocks, -1))
        if self.gemma:
            m = self._modalities(x[..., self.active, :])
            coefs = F.linear(m, self._weight(self.prediction)).unflatten(-1, (self.blocks, self.blocks))
            prediction = x + _mix(coefs, x)
            return prediction[..., self.active, :], prediction
        return x[..., self.active, :], _mix(self.prediction, x)

    def correct(self, prediction: Tensor, output: Tensor) -> Tensor:
        gains = self.correction
        if self.gemma:
            gains = 1.0 + F.linear(self._modalities(output), self._weight(self.correction))
        innovation = output - prediction[..., self.active, :]
        return (prediction + gains.unsqueeze(-1) * innovation.unsqueeze(-2)).flatten(-2)


def project_entries(cross_kv, fused, entries: Tensor, matmul=linear) -> Tensor:
    """Cross-attention entries [b', m, d] -> every layer's keys and values [b', m, L * 2 * heads * hd]:
    one matmul once fused, else each layer's (k_proj, v_proj) from the iterable `cross_kv`."""
    if fused is not None:
        return matmul(entries, *fused)
    return torch.cat([proj(entries) for pair in cross_kv for proj in pair], dim=-1)


class DecoderLayer(nn.Module):
    """Pre-norm layer: self-attention, cross-attention (sections >= 1), MLP; AltUp around it."""

    def __init__(self, cfg: PlainConfig, cross: bool, active: Optional[int]):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg, cfg.num_query_groups)
        if cross:
            self.cross_attn_layernorm = make_norm(cfg)
            self.cross_attn = Attention(cfg, cfg.num_attention_heads)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MoE(cfg) if cfg.moe_experts else MLP(cfg)
        if active is not None:
            self.altup = AltUp(cfg, active)


# ---------------------------------------------------------------------------------------- caches
@dataclass
class SectionCache:
    """One section's decode state, laid out so that a step writes it with few scatters, each into a
    whole tensor (a compiled step writes a tensor in place; a scatter into a view of one can cost a copy).

    kv: per layer [2, b, kv heads, T, hd], self-attention keys (0) and values (1), slot = position.
    cross [L, 2, b, heads, C, hd] (sections >= 1): every layer's cross-attention keys and values of
    entry j (the previous section's output at position j - 1, entry 0 the null entry) in slot j mod C.
    C = T + 1 holds every entry; with a cross-attention window W a decoding cache is a ring of
    C = W + 1 slots, bounded whatever the context: a step at position i reads entries i-W+1..i while
    entry i+1 (one slot further, holding entry i-W, already outside the window) may be written at once.
    passes_kv (shared weights decoded as batched passes, `StagLM.new_caches(passes_together=True)`): per
    layer [2, P * b, kv heads, T, hd], the self-attention caches of every pass together, pass p's rows
    p*b..(p+1)*b being its `kv`; one attention call then serves all passes (`shared_passes_step`)."""

    kv: list[Tensor]
    cross: Optional[Tensor]
    passes_kv: Optional[list[Tensor]] = None


def _rotate(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """megatron's non-interleaved rotary embedding on the first rot dims of t [b, h, n, hd]."""
    rot = cos.shape[-1]
    x, rest = t[..., :rot], t[..., rot:]
    x1, x2 = x.chunk(2, dim=-1)
    x = x * cos.to(t.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(t.dtype)
    return torch.cat((x, rest), dim=-1)


class Section(nn.Module):
    matmul = staticmethod(linear)  # of the fused cross-attention entry projection (see Linear)

    def __init__(self, cfg: PlainConfig, index: int, layers: Optional[list[DecoderLayer]] = None):
        super().__init__()
        self.cfg, self.index = cfg, index
        active = cfg.altup_active[index] if cfg.altup_blocks > 1 else [None] * cfg.section_layers[index]
        self.layers = nn.ModuleList(
            [DecoderLayer(cfg, index > 0, a) for a in active] if layers is None else layers)
        self.norm = make_norm(cfg)
        self.entry_kv = None  # (weight, bias) once fuse_projections() ran
        if cfg.altup_blocks > 1 and cfg.altup_output == "learned":
            self.collapse = nn.Parameter(torch.eye(cfg.hidden_size).repeat(1, cfg.altup_blocks))
        if cfg.altup_blocks > 1 and cfg.altup_output == "projected":
            d = cfg.hidden_size
            self.collapse_projections = nn.ParameterList(
                [nn.Parameter(torch.zeros(d, d)) for _ in range(cfg.altup_blocks - 1)])

    def new_cache(self, batch: int, max_len: int, dtype, device, bounded: bool = False,
                  kv: Optional[list[Tensor]] = None) -> SectionCache:
        """Caches for `max_len` positions; `bounded`: the cross cache as a ring of window + 1 slots; `kv`:
        the self-attention caches, where the caller made them (`StagLM.new_caches`)."""
        def zeros(attn: Attention, slots: int, *layers: int) -> Tensor:
            heads = attn.k_proj.weight.shape[0] // attn.head_dim
            return torch.zeros(*layers, 2, batch, heads, slots, attn.head_dim, dtype=dtype, device=device)

        if kv is None:
            kv = [zeros(layer.self_attn, max_len) for layer in self.layers]
        slots = max_len + 1
        if bounded and self.cfg.cross_window is not None:
            slots = min(slots, self.cfg.cross_window + 1)
        cross = zeros(self.layers[0].cross_attn, slots, len(self.layers)) if self.index else None
        return SectionCache(kv, cross)

    def fuse_projections(self) -> None:
        """Decode-time fusion: each layer's q/k/v as one matmul, and every layer's cross-attention k/v
        as one matmul over a new entry (`write_entries`). Values are unchanged; parameters become views
        of the fused weights, so loading weights in place keeps them in step, but a later `.to()` would
        not move the fused copies: fuse after the model's final device, dtype and sharding."""
        for layer in self.layers:
            layer.self_attn.fuse_qkv()
            for mlp in layer.mlp.experts if isinstance(layer.mlp, MoE) else [layer.mlp]:
                mlp.fuse()
        if self.index and self.entry_kv is None:
            self.entry_kv = fuse_linears([proj for layer in self.layers
                                          for proj in (layer.cross_attn.k_proj, layer.cross_attn.v_proj)])

    def project(self, entries: Tensor) -> Tensor:
        """Cross-attention entries [b', m, d] -> every layer's keys and values [b', m, L * 2 * heads * hd]."""
        cross_kv = ((layer.cross_attn.k_proj, layer.cross_attn.v_proj) for layer in self.layers)
        return project_entries(cross_kv, self.entry_kv, entries, self.matmul)

    def write_entries(self, cache: SectionCache, entries: Tensor, first: Tensor,
                      rows: Optional[Tensor] = None) -> None:
        """Store cross-attention entries [b', m, d] as entries first[r].. of rows `rows` (None: all)."""
        self.store_entries(cache, self.project(entries), first, rows)

    def all_entries(self, kv: Tensor) -> Tensor:
        """Projected entries 0..m-1 [b', m, L * 2 * heads * hd] in the cache's layout with slot = entry
        [L, 2, b', heads, m, hd]: what a prefill reads when a ring cannot hold every entry at once."""
        heads_dim = kv.view(*kv.shape[:2], len(self.layers), 2, -1, self.layers[0].self_attn.head_dim)
        return heads_dim.permute(2, 3, 0, 4, 1, 5)

    def store_entries(self, cache: SectionCache, kv: Tensor, first: Tensor, rows: Optional[Tensor] = None,
                      counts: Optional[Tensor] = None) -> None:
        """Store entries already projected (`project_entries`) [b', m, L * 2 * heads * hd] as entries
        first[r].. of rows `rows` (None: all). `counts` [b'] (None: m each): how many of the m are the
        row's own, the rest padding (a batched prefill's). A ring keeps each row's last C of its own;
        a row with fewer fills the rest of its ring with copies of its entry 0, and padding lands past
        the row's own entries: in slots of entries it has not reached, which no step reads before the
        step that writes them."""
        ring = cache.cross.shape[4]
        if kv.shape[1] > ring:
            start = (counts if counts is not None else torch.full_like(first, kv.shape[1])) - ring
            take = (start[:, None] + torch.arange(ring, device=kv.device)[None]).clamp(min=0)
            first, kv = first + start, kv.gather(1, take[..., None].expand(-1, -1, kv.shape[2]))
        slots = (first[:, None] + torch.arange(kv.shape[1], device=kv.device)[None]) % ring
        if rows is None:
            rows = torch.arange(first.shape[0], device=first.device)
        # [b', m, L * 2 * heads * hd] -> [b', m, L, 2, heads, hd]: the layout cross[:, :, r, :, slots] takes
        cache.cross[:, :, rows[:, None].expand_as(slots), :, slots] = kv.view(
            *kv.shape[:2], len(self.layers), 2, -1, cache.cross.shape[-1])

    @staticmethod
    def _cross_read(cache: SectionCache, keep: Tensor) -> Tensor:
        """The cross cache a step reads: where it holds every entry (slot = entry; not a window's ring)
        its first W slots, W the self-attention slots `keep` covers (a position p < W reads entries
        <= p); `_cross_keep` over them, as a ring of W, equals the whole cache's first W columns."""
        if cache.cross.shape[4] <= cache.kv[0].shape[3]:
            return cache.cross
        return cache.cross[:, :, :, :, :keep.shape[-1]]

    def _cross_keep(self, positions: Tensor, ring: int, first: Optional[Tensor] = None) -> Tensor:
        """[b', 1, n, ring]: the entries position p reads (<= p, > p - window); slot s holds entry
        p - back, the newest entry congruent to s modulo the ring. `first` [b']: the column of each
        row's null entry (its first token's; 0 without padding)."""
        p = positions[:, :, None]
        back = (p - torch.arange(ring, device=positions.device)[None, None, :]) % ring
        keep = back <= p
        if self.cfg.cross_window is not None:
            keep &= back < self.cfg.cross_window
        if self.cfg.null_entry == "first":  # the null entry is for the first position only
            start = 0 if first is None else first[:, None, None]
            keep &= (back != p - start) | (p == start)
        return keep[:, None]

    def _collapse(self, stream: Tensor) -> Tensor:
        cfg = self.cfg
        if cfg.altup_blocks == 1:
            return stream
        if cfg.altup_output == "learned":
            return stream @ self.collapse.t()
        x = stream.unflatten(-1, (cfg.altup_blocks, -1))
        if cfg.altup_output == "sum":
            return x.sum(-2)
        if cfg.altup_output == "mean":
            return x.mean(-2)
        base = x[..., 0, :]
        target = _rms(base)
        blocks = [base] + [_rescaled(x[..., i + 1, :] @ w.t(), target)
                           for i, w in enumerate(self.collapse_projections)]
        return torch.stack(blocks, -2).mean(-2)

    def forward(self, h: Tensor, positions: Tensor, rows: Optional[Tensor], cache: SectionCache,
                rope: Optional[tuple[Tensor, Tensor]] = None, entries: Optional[Tensor] = None,
                valid: Optional[Tensor] = None, keep: Optional[Tensor] = None, normed: bool = True) -> Tensor:
        """Run new positions [b', n] of cache rows `rows` (None: every row) from the input h [b', n, D].

        Writes their self-attention K/V; cross-attention reads entries <= position (and > position -
        window), which the caller stored beforehand in the cache, or passes as `entries` (`all_entries`
        of these rows). `valid` [b', slots] (every row, whole caches): which slots hold tokens, not
        padding; a padded slot is read by no other position (each still reads its own slot, so no
        softmax is empty). `keep`: `causal_keep(positions, slots)`, where the caller made it already (a
        decode step makes it once, with its embedding, for every section). Returns the section's normed
        output [b', n, d]; `normed` False: the output before the final norm, which the caller then folds
        into the head's matmul (`StagLM.logits`), one kernel fewer per decode step.
        """
        if keep is None:
            keep = causal_keep(positions, cache.kv[0].shape[3])
        if valid is not None:
            keep = keep & valid[:, None, None, :] | _own_slot(positions, valid.shape[1])
        if self.index:
            cross_kv = self._cross_read(cache, keep) if entries is None else entries
            first = valid.long().argmax(-1) if valid is not None else None  # each row's first token
            cross_keep = self._cross_keep(positions, cross_kv.shape[4], first)
            if valid is not None:  # entry j is column j's: the null entry or the output of column j - 1
                ring = cross_kv.shape[4]
                entry_valid = torch.cat([valid, valid.new_ones(valid.shape[0], ring - valid.shape[1])], 1)
                cross_keep = cross_keep & entry_valid[:, None, None, :] | _own_slot(positions, ring)
        for i, layer in enumerate(self.layers):
            x, prediction = layer.altup.predict(h) if hasattr(layer, "altup") else (h, None)
            attn = layer.self_attn
            q, k, v = attn.project_qkv(x, layer.input_layernorm)
            x = attn.attend_cached(q, k, v, rope, cache.kv[i], rows, positions, keep, residual=x)
            if self.index:
                cross = layer.cross_attn
                q = cross.project_q(x, layer.cross_attn_layernorm)
                ckv = cross_kv[i] if rows is None or entries is not None else cross_kv[i][:, rows]
                x = cross.attend(q, ckv[0], ckv[1], cross_keep, residual=x)
            x = layer.mlp(x, layer.post_attention_layernorm, residual=x)
            h = layer.altup.correct(prediction, x) if prediction is not None else x
        return self.norm(self._collapse(h)) if normed else self._collapse(h)


def _own_slot(positions: Tensor, slots: int) -> Tensor:
    """[b', 1, n, slots]: each new position's own slot."""
    return (torch.arange(slots, device=positions.device)[None, None, :] == positions[:, :, None])[:, None]


def causal_keep(positions: Tensor, slots: int) -> Tensor:
    """[b', 1, n, slots]: self-attention cache slots (= positions) each new position reads."""
    slot = torch.arange(slots, device=positions.device)
    return (slot[None, None, :] <= positions[:, :, None])[:, None]


def shared_passes_step(sections: list[Section], caches: list[SectionCache], h: Tensor, positions: Tensor,
                       rope: Optional[tuple[Tensor, Tensor]] = None, keep: Optional[Tensor] = None) -> list[Tensor]:
    """Every pass of a shared-weight model on the same new positions [b, n] of every cache row, in one
    pass over the shared weights: the rows of all passes [P * b] go through each norm, projection and
    MLP together; self-attention reads each pass's own cache, cross-attention (passes >= 1, their own
    weights) its cross cache. `caches` come from `StagLM.new_caches(passes_together=True)`. Returns each
    pass's normed output [b, n, d], equal to running `sections[k](h, positions, None, caches[k], rope,
    keep=keep)` one after another."""
    b, passes = h.shape[0], len(sections)
    if keep is None:
        keep = causal_keep(positions, caches[0].kv[0].shape[3])
    cross_kv = [s._cross_read(c, keep) if s.index else None for s, c in zip(sections, caches)]
    cross_keep = [s._cross_keep(positions, c.shape[4]) if s.index else None for s, c in zip(sections, cross_kv)]
    # self-attention: every pass's rows at once, each row over its own pass's cache (`passes_kv`)
    kv = caches[0].passes_kv
    rows_rope = None if rope is None else tuple(t.repeat(passes, *[1] * (t.dim() - 1)) for t in rope)
    rows_positions, rows_keep = positions.repeat(passes, 1), keep.repeat(passes, 1, 1, 1)
    h = h.repeat(passes, 1, 1)
    for i, layer in enumerate(sections[-1].layers):  # the shared modules, and the last pass's cross ones
        x, prediction = layer.altup.predict(h) if hasattr(layer, "altup") else (h, None)
        attn = layer.self_attn
        q, k, v = attn.project_qkv(x, layer.input_layernorm)
        x = attn.attend_cached(q, k, v, rows_rope, kv[i], None, rows_positions, rows_keep, residual=x)
        passes_x = list(x.split(b))
        for p in range(1, passes):
            cross_layer = sections[p].layers[i]
            cross = cross_layer.cross_attn
            q = cross.project_q(passes_x[p], cross_layer.cross_attn_layernorm)
            ckv = cross_kv[p][i]
            passes_x[p] = cross.attend(q, ckv[0], ckv[1], cross_keep[p], residual=passes_x[p])
        x = torch.cat(passes_x)
        x = layer.mlp(x, layer.post_attention_layernorm, residual=x)
        h = layer.altup.correct(prediction, x) if prediction is not None else x
    return [s.norm(s._collapse(part)) for s, part in zip(sections, h.split(b))]


class CrossKV(nn.Module):
    """One layer's cross-attention key and value projections, held apart from their layer."""

    def __init__(self, cross_attn: Attention):
        super().__init__()
        self.k_proj, self.v_proj = cross_attn.k_proj, cross_attn.v_proj


class EntryProjections(nn.Module):
    """Section k's cross-attention keys and values of a new entry, computed on section k-1's rank.

    With one section per rank a layer of section k >= 1 reads its own weights (12 d^2) and its
    cross-attention's (4 d^2), section k-1's only 12 d^2. The entry's k and v depend on section k-1's
    output alone, so its rank projects them (2 d^2 per layer moved) and sends keys and values instead of
    the output: per step both ranks read 14 d^2 per layer. `engine.injection_policy` lets AutoTP
    split them by heads like the layer's own, so tensor-parallel rank t sends what rank t of section k
    stores."""

    matmul = staticmethod(linear)  # of the fused projection (see Linear)

    def __init__(self, section: "Section"):
        super().__init__()
        self.layers = nn.ModuleList([CrossKV(layer.cross_attn) for layer in section.layers])
        self.fused = None

    def fuse(self) -> None:
        if self.fused is None:
            self.fused = fuse_linears([proj for layer in self.layers for proj in (layer.k_proj, layer.v_proj)])

    def forward(self, entries: Tensor) -> Tensor:
        return project_entries(((layer.k_proj, layer.v_proj) for layer in self.layers), self.fused, entries,
                               self.matmul)


def _rms(x: Tensor) -> Tensor:
    return x.float().pow(2).mean(-1, keepdim=True).sqrt()


def _rescaled(x: Tensor, target_rms: Tensor) -> Tensor:
    return (x.float() * (target_rms / _rms(x).clamp(min=_EPS))).to(x.dtype)


# ---------------------------------------------------------------------------------------- model
class StagLM(nn.Module):
    """Embeddings -> sections -> output head. `forward(ids)` gives teacher-forced logits [b, s, V]."""

    def __init__(self, cfg: PlainConfig):
        super().__init__()
        self.cfg = cfg
        d, k = cfg.hidden_size, cfg.altup_blocks
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        if cfg.position_embedding == "learned_absolute":
            self.embed_positions = nn.Embedding(cfg.max_sequence_length, d)
        if k > 1 and cfg.altup_embedding == "widened":
            self.altup_embed_tokens = nn.Embedding(cfg.vocab_size, (k - 1) * d)
        if k > 1 and cfg.altup_embedding == "projected":
            self.altup_projections = nn.ParameterList([nn.Parameter(torch.zeros(d, d)) for _ in range(k - 1)])
        sections = [Section(cfg, 0)]
        for s in range(1, cfg.sections):
            layers = None
            if cfg.shared_weights:  # the same self-attention, MLP, norms and AltUp as section 0
                layers = [DecoderLayer(cfg, True, getattr(owner, "altup", None) and owner.altup.active)
                          for owner in sections[0].layers]
                for owner, layer in zip(sections[0].layers, layers):
                    for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp", "altup"):
                        if hasattr(owner, name):
                            setattr(layer, name, getattr(owner, name))
            sections.append(Section(cfg, s, layers))
        self.sections = nn.ModuleList(sections)
        if cfg.output == "combine":
            mix = torch.zeros(cfg.sections)
            mix[-1] = 1.0
            self.section_mix = nn.Parameter(mix)
        self.lm_head = Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.next_entries: Optional[EntryProjections] = None  # set by keep_sections

    # -------------------------------------------------------------- pieces used by the decoders
    def embed(self, ids: Tensor, positions: Tensor) -> Tensor:
        """[b, n] ids at positions -> the section input [b, n, d] (K*d with AltUp)."""
        e = self.embed_tokens(ids)
        if hasattr(self, "embed_positions"):
            e = e + self.embed_positions(positions)
        k = self.cfg.altup_blocks
        if k == 1:
            return e
        if self.cfg.altup_embedding == "recycled":
            return e.repeat(1, 1, k)
        if self.cfg.altup_embedding == "widened":
            return torch.cat([e, self.altup_embed_tokens(ids).to(e.dtype)], dim=-1)
        target = _rms(e)
        return torch.cat([e] + [_rescaled(e @ w.t(), target) for w in self.altup_projections], dim=-1)

    def rope(self, positions: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """cos, sin [b, 1, n, rot] in fp32 (megatron's RotaryEmbedding, computed per call)."""
        if self.cfg.position_embedding != "rope":
            return None
        dim = self.cfg.rotary_dim
        inv = 1.0 / (self.cfg.rotary_base ** (
            torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
        if self.cfg.rope_scaling_factor is not None:
            inv = llama3_frequencies(inv, self.cfg.rope_scaling_factor)
        freqs = positions.float()[..., None] * inv
        freqs = torch.cat((freqs, freqs), dim=-1)[:, None]
        return torch.cos(freqs), torch.sin(freqs)

    def new_caches(self, batch: int, max_len: int, sections: Optional[list[int]] = None,
                   bounded: bool = False, passes_together: bool = False) -> dict:
        """{section: SectionCache} for `batch` rows of `max_len` positions. `passes_together` (shared
        weights, every section): each layer's self-attention caches of all passes in one tensor
        (`SectionCache.passes_kv`), so that `shared_passes_step` attends for every pass in one call."""
        p = next(self.parameters())
        wanted = list(range(self.cfg.sections) if sections is None else sections)
        if not passes_together:
            return {s: self.sections[s].new_cache(batch, max_len, p.dtype, p.device, bounded) for s in wanted}
        if not self.cfg.shared_weights or wanted != list(range(self.cfg.sections)):
            raise ValueError("new_caches(passes_together=True) needs shared weights and every section")
        joint = self.sections[0].new_cache(len(wanted) * batch, max_len, p.dtype, p.device).kv
        caches = {s: self.sections[s].new_cache(batch, max_len, p.dtype, p.device, bounded,
                                                kv=[t[:, s * batch:(s + 1) * batch] for t in joint])
                  for s in wanted}
        for cache in caches.values():
            cache.passes_kv = joint
        return caches

    def null_entry(self, like: Tensor) -> Tensor:
        """The cross-attention's entry 0 (no previous position): a zero vector, like megatron's shift."""
        return torch.zeros_like(like[:, :1])

    def logits(self, outputs: list[Tensor], norm: Optional[nn.Module] = None) -> Tensor:
        """Section outputs (all of them, or just the last) -> logits. `norm`: the last section's final
        norm, where its output came unnormed (`Section.forward(normed=False)`; output 'last' only)."""
        if self.cfg.output == "combine":
            return self.lm_head(sum(w * t for w, t in zip(self.section_mix, outputs)))
        return self.lm_head(outputs[-1]) if norm is None else self.lm_head(outputs[-1], norm=norm)

    def forward(self, ids: Tensor) -> Tensor:
        """Teacher-forced logits [b, s, V] of ids [b, s]."""
        return self.extend(ids, self.new_caches(ids.shape[0], ids.shape[1]), 0)

    def extend(self, ids: Tensor, caches: dict, start: int, mask: Optional[Tensor] = None) -> Tensor:
        """Logits [b, n, V] of new tokens ids [b, n] at columns start..start+n-1 of every cache row
        (whole caches, `bounded=False`), after the `start` columns the caches already hold: a forward
        (start 0) or a chunk of cached decoding (what the Hugging Face model runs).

        `mask` [b, start + n] (1 token, 0 padding, e.g. left padding of a batch): a padded column is read
        by no token, positions count tokens only, and a cross-attention entry whose previous column is
        padding is the null entry; a row's logits then equal its unpadded forward's.
        """
        b, n = ids.shape
        columns = torch.arange(start, start + n, device=ids.device)[None].expand(b, -1)
        positions, valid = columns, None
        if mask is not None:
            mask = mask.bool()
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
            valid = torch.zeros(b, caches[0].kv[0].shape[3], dtype=torch.bool, device=ids.device)
            valid[:, :start + n] = mask
        h0, rope = self.embed(ids, positions), self.rope(positions)
        first = torch.full((b,), start, dtype=torch.long, device=ids.device)
        outs = []
        for k, section in enumerate(self.sections):
            if k:  # entries start+1..start+n: the previous section's outputs at these columns
                prev = outs[-1] if mask is None else outs[-1].masked_fill(~mask[:, start:, None], 0.0)
                if start == 0:
                    section.write_entries(caches[k], torch.cat([self.null_entry(prev), prev], 1), first)
                else:
                    section.write_entries(caches[k], prev, first + 1)
            outs.append(section(h0, columns, None, caches[k], rope, valid=valid))
        return self.logits(outs)

    def fuse_projections(self) -> None:
        """Fuse the present sections' projections for decoding (see `Section.fuse_projections`)."""
        for section in self.sections:
            if isinstance(section, Section):
                section.fuse_projections()
        if self.next_entries is not None:
            self.next_entries.fuse()

    def use_kernels(self, matmul=linear, attention=attention, cached=cached_attention) -> None:
        """Every projection's matmul (`linear`'s signature: norm before, activation and residual after)
        becomes `matmul`, every attention `attention`, every self-attention step with its cache write
        `cached`: how the serving engine puts its decode kernels in without this file depending on
        them. Layers DeepSpeed replaced keep theirs."""
        for m in self.modules():
            if hasattr(type(m), "matmul"):
                m.matmul = matmul
            if isinstance(m, Attention):
                m.attention, m.cached_attention = attention, cached

    def entries_made_upstream(self) -> bool:
        """With one section per rank, whether section k-1's rank sends section k its entries' keys and
        values (`EntryProjections`) rather than its output: whenever the last rank needs no other
        section's output, i.e. output 'last'."""
        return self.cfg.output == "last"

    def keep_sections(self, wanted: list[int]) -> None:
        """Drop the layers of other sections (one section per rank); shared modules stay alive. The
        section after the last wanted one leaves its entry projections here (`EntryProjections`)."""
        following = max(wanted) + 1
        if following < self.cfg.sections and following not in wanted and self.entries_made_upstream():
            self.next_entries = EntryProjections(self.sections[following])
        for k in range(self.cfg.sections):
            if k not in wanted:
                self.sections[k] = nn.Module()


def load_plain_model(directory: Path, device="cpu", dtype: torch.dtype = torch.float32) -> StagLM:
    """An exported package (config.json + model.safetensors), or a Hugging Face folder written by
    `export --format hf` (weights under `model.`, or Llama's names; possibly sharded) -> StagLM in eval
    mode."""
    from safetensors.torch import load_file, load_model

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist" + ("" if not directory.exists() else
                                " as a folder: give the folder that holds config.json") + ".")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory / 'config.json'} is missing: export a checkpoint with "
                                f"`megatron-stag export CHECKPOINT {directory}`.")
    cfg = PlainConfig.load(directory / "config.json")
    shards = sorted(directory.glob("model*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{directory / 'model.safetensors'} is missing: export a checkpoint with "
                                f"`megatron-stag export CHECKPOINT {directory}`.")
    with torch.device(device):
        model = StagLM(cfg)
    model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    if model_type is None:
        load_model(model, directory / "model.safetensors", strict=True, device=str(device))
        return model.to(dtype).eval()
    rename = (lambda k: k.removeprefix("model.")) if model_type == HF_MODEL_TYPE else (lambda k: llama_name(k, False))
    state = {}
    for shard in shards:
        state.update({rename(k): v for k, v in load_file(shard, device=str(device)).items()})
    if cfg.tie_embeddings and "embed_tokens.weight" in state:  # transformers saves a tied head once
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{directory}: the weights do not match config.json ({str(err)[:300]}): export again.") from None
    return model.to(dtype).eval()
