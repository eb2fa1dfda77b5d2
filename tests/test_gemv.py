"""The decode kernels' arithmetic (the GEMV, the attention) on CPU, through Triton's interpreter
(the GPU tests in test_gpu.py run them compiled, with programmatic dependent launch)."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import torch
    from torch import nn
    from megatron_stag.serving.gemv import gemv, linear as kernel_linear
    from megatron_stag.serving.model import linear
    torch.manual_seed(0)
    for rows, n, k, tile in ((1, 48, 32, 256), (3, 17, 128, 256), (1, 5, 64, 64)):
        x = torch.randn(rows, 2 * k).to(torch.bfloat16)[:, :k]  # strided rows
        w = torch.randn(n, k).to(torch.bfloat16)
        ref = linear(x.float(), w.float())
        out = gemv(x, w, tile=tile, num_warps=4, pdl=False)
        assert out.shape == (rows, n), out.shape
        err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-2, (rows, n, k, err)
    # what the engine fuses around a matmul: the norm before it (RMS, layer), bias, activation, residual
    k, n = 256, 40
    for norm in (None, nn.RMSNorm(k, eps=1e-5), nn.LayerNorm(k, eps=1e-5), nn.LayerNorm(k, eps=1e-5, bias=False)):
        if norm is not None:
            nn.init.normal_(norm.weight)
            if getattr(norm, "bias", None) is not None:
                nn.init.normal_(norm.bias)
        for activation in (None, "gelu", "swiglu"):
            for bias, residual in ((False, False), (True, True)):
                rows = 2 * n if activation == "swiglu" else n
                x = (3 * torch.randn(1, 1, k)).to(torch.bfloat16)
                w = (torch.randn(rows, k) / k ** 0.5).to(torch.bfloat16)
                b = torch.randn(rows).to(torch.bfloat16) if bias else None
                res = torch.randn(1, 1, n).to(torch.bfloat16) if residual else None
                fp32 = None if norm is None else norm.float()
                ref = linear(x.float(), w.float(), b.float() if bias else None, fp32, activation,
                             res.float() if residual else None)
                out = kernel_linear(x, w, b, norm.to(torch.bfloat16) if norm is not None else None, activation, res)
                assert out.shape == ref.shape and out.dtype == torch.bfloat16
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                assert err < 1e-2, (type(norm).__name__, activation, bias, residual, err)
    # the streaming form (a fixed grid, each program several row blocks): one-row tiles, 40 blocks over
    # 8 programs per SM (2 SMs in the interpreter)
    import megatron_stag.serving.gemv as G
    grids = []
    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel
        def __getitem__(self, grid):
            grids.append(grid)
            return self.kernel[grid]
    G._gemv_stream_kernel = Spy(G._gemv_stream_kernel)
    for norm in (None, nn.RMSNorm(k, eps=1e-5), nn.LayerNorm(k, eps=1e-5)):
        for activation in (None, "gelu", "swiglu"):
            rows = 2 * n if activation == "swiglu" else n
            x = (3 * torch.randn(1, k)).to(torch.bfloat16)
            w = (torch.randn(rows, k) / k ** 0.5).to(torch.bfloat16)
            b, res = torch.randn(rows).to(torch.bfloat16), torch.randn(1, n).to(torch.bfloat16)
            half = norm.to(torch.bfloat16) if norm is not None else None
            out = gemv(x, w, b, res, getattr(half, "weight", None), getattr(half, "bias", None), 1e-5,
                       type(norm).__name__ if norm is not None else None, activation, tile=k, pdl=False)
            ref = linear(x.float(), w.float(), b.float(), norm.float() if norm is not None else None, activation,
                         res.float())
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-2, ("streaming", type(norm).__name__, activation, err)
    assert grids == [(16,)] * 9, grids
    # the default row block: TILE weight elements
    block_rows = []
    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                block_rows.append(kwargs["BLOCK_N"])
                return self.kernel[grid](*args, **kwargs)
            return launch
    G._gemv_kernel = Recorder(G._gemv_kernel)
    gemv(torch.randn(1, k).to(torch.bfloat16), torch.randn(n, k).to(torch.bfloat16), pdl=False)
    assert block_rows == [G.TILE // k] == [16], block_rows
    print("ok")
""")


def _interpret(script: str, timeout: int = 300) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1")  # read when triton is imported: a fresh process
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_gemv_matches_f_linear_in_the_interpreter():
    assert _interpret(SCRIPT) == "ok"


SKINNY = textwrap.dedent("""
    import torch
    from torch import nn
    from megatron_stag.serving import gemv, skinny_gemm
    from megatron_stag.serving.model import linear
    torch.manual_seed(0)
    # (interpreter: 2 SMs, so a 64-row block matrix splits K up to the SMs; fp16, its bf16 dot is wrong)
    for rows, n, k, splits in ((2, 128, 256, 1), (5, 64, 1024, 2), (32, 192, 512, 1), (64, 64, 2048, 2)):
        x = torch.randn(rows, 2 * k).to(torch.float16)[:, :k]  # strided rows, as q/k/v slices are
        w = (torch.randn(n, k) / k ** 0.5).to(torch.float16)
        assert skinny_gemm.takes(x, w) and skinny_gemm.splits(n, k, 2) == splits
        part = skinny_gemm.skinny_mm(x, w, pdl=False)
        assert part.shape == (splits, rows, n) and part.dtype == torch.float32
        ref = linear(x.float(), w.float())
        assert (part.sum(0) - ref).abs().max() / ref.abs().max() < 1e-3, (rows, n, k)
        b = torch.randn(n).to(torch.float16)
        for activation in ("gelu", "swiglu")[:1 + (n % 128 == 0)]:  # in the kernel: bias, activation, rounding
            out = skinny_gemm.skinny_mm(x, w, b, activation, pdl=False)
            ref = linear(x.float(), w.float(), b.float(), None, activation)
            assert out.dtype == torch.float16 and out.shape == ref.shape
            assert (out.float() - ref).abs().max() / ref.abs().max() < 2e-3, (rows, n, k, activation)
    # the engine's matmul: norm before, bias, activation, residual around the kernel, under torch.compile
    calls = []
    op = skinny_gemm.skinny_mm
    skinny_gemm.skinny_mm = lambda x, w, b, a, pdl: calls.append((tuple(x.shape), a)) or op(x, w, b, a, pdl=False)
    compiled = torch.compile(skinny_gemm.linear, dynamic=False)
    torch.set_grad_enabled(False)  # as the engine decodes
    # (2 SMs: an activation goes into the kernel where its output features take one K split, k=256)
    for activation, n, k in ((None, 128, 256), ("gelu", 192, 256), ("gelu", 64, 1024), ("swiglu", 128, 256),
                             ("swiglu", 128, 1024)):
        for norm in (None, nn.RMSNorm(k, eps=1e-5), nn.LayerNorm(k, eps=1e-5)):
            x = (3 * torch.randn(2, 4, k)).to(torch.float16)
            w = (torch.randn(n, k) / k ** 0.5).to(torch.float16)
            b = torch.randn(n).to(torch.float16)
            out_n = n // 2 if activation == "swiglu" else n
            res = torch.randn(2, 4, out_n).to(torch.float16)
            half = norm.to(torch.float16) if norm is not None else None
            ref = linear(x.float(), w.float(), b.float(), norm.float() if norm is not None else None, activation,
                         res.float())
            for f in (skinny_gemm.linear, compiled):
                out = f(x, w, b, half, activation, res)
                assert out.shape == ref.shape and out.dtype == torch.float16
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                assert err < 1e-2, (type(norm).__name__, activation, err)
    assert set(calls) == {((8, 256), ""), ((8, 256), "gelu"), ((8, 1024), ""), ((8, 256), "swiglu")}, calls
    # one row, more than ROWS rows, shapes off the blocks and a bias of another dtype go to gemv.linear
    # (the GEMV, or F.linear)
    routed = []
    gemv.linear = lambda x, w, *rest: routed.append(tuple(x.shape)) or "gemv"
    calls.clear()
    for rows, n, k in ((1, 128, 256), (65, 128, 256), (4, 100, 256), (4, 128, 320)):
        assert skinny_gemm.linear(torch.randn(rows, k).to(torch.float16), torch.randn(n, k).to(torch.float16)) == "gemv"
    x, w = torch.randn(4, 256).to(torch.float16), torch.randn(128, 256).to(torch.float16)
    assert skinny_gemm.linear(x, w, torch.randn(128)) == "gemv"  # an fp32 bias
    assert calls == [] and routed == [(1, 256), (65, 256), (4, 256), (4, 320), (4, 256)], (calls, routed)
    print("ok")
""")


def test_skinny_gemm_matches_f_linear_in_the_interpreter():
    """The 2-64-row GEMM's partial sums add up to F.linear's product for every split, and its one-split
    form applies the bias and GELU or SwiGLU itself; the engine's matmul wraps it in the norm, bias,
    activation and residual (eagerly and compiled, the activation in the kernel where it has one split)
    and routes one row to the GEMV and other shapes to F.linear."""
    assert _interpret(SKINNY) == "ok"


ATTENTION = textwrap.dedent("""
    import torch
    from megatron_stag.serving import decode_attention
    from megatron_stag.serving.model import attention, cached_attention as reference_cached
    # the small steps' form, then large steps' (more than ROWS kv heads: here every step) pipelined form
    for rows in (64, 0):
        torch.manual_seed(0)
        decode_attention.ROWS = rows
        # GQA, slots not a multiple of the block, blocks with no kept slot, one split and several
        for b, heads, kv_heads, slots, hd, programs in ((2, 4, 2, 100, 32, 256), (3, 2, 2, 130, 16, 1),
                                                        (1, 4, 4, 200, 64, 8)):
            decode_attention.PROGRAMS = decode_attention.LARGE_PROGRAMS = decode_attention.GROUP_PROGRAMS = programs
            qkv = torch.randn(b, 1, (heads + 2 * kv_heads) * hd).to(torch.float16)
            q = qkv[..., :heads * hd].view(b, 1, heads, hd).transpose(1, 2)  # strided, as a step's
            kv = torch.randn(2, b, kv_heads, slots, hd).to(torch.float16)
            keep = torch.rand(b, 1, 1, slots) < 0.3
            keep[0, ..., 64:] = False
            keep[..., 3] = True
            out = decode_attention.decode_attention(q, kv[0], kv[1], keep, pdl=False)
            ref = attention(q.float(), kv[0].float(), kv[1].float(), keep)
            assert out.shape == ref.shape and out.dtype == torch.float16
            err = (out.float() - ref).abs().max().item()
            assert err < 2e-3, (b, heads, kv_heads, slots, hd, err)
        # the self-attention step with its rotary embedding and cache write in the kernel: rope on part of the
        # head or none, a row whose position is in a later block of its split, padded slots, the last slot
        for b, heads, kv_heads, slots, hd, rot, programs in ((2, 4, 2, 200, 32, 16, 8), (3, 2, 1, 130, 16, 0, 256),
                                                             (1, 4, 4, 70, 64, 64, 4)):
            decode_attention.PROGRAMS = decode_attention.LARGE_PROGRAMS = decode_attention.GROUP_PROGRAMS = programs
            qkv = torch.randn(b, 1, (heads + 2 * kv_heads) * hd).to(torch.float16)
            q, k, v = (t.view(b, 1, -1, hd).transpose(1, 2) for t in qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], -1))
            kv = torch.randn(2, b, kv_heads, slots, hd).to(torch.float16)
            positions = torch.tensor([[slots - 1], [5], [slots - 3]][:b])
            slot = torch.arange(slots)
            keep = ((slot <= positions) & (torch.rand(b, slots) < 0.7) | (slot == positions))[:, None, None]
            rope = None
            if rot:
                angles = positions.float()[..., None] * torch.rand(rot // 2) * 3
                rope = tuple(f(torch.cat((angles, angles), -1))[:, None] for f in (torch.cos, torch.sin))
            ref_kv = kv.float()
            ref = reference_cached(q.float(), k.float(), v.float(), rope, ref_kv, None, positions, keep)
            # slots the mask drops hold anything (here NaN): the large form loads every slot up to the
            # position, and none of them may reach the result
            kv.masked_fill_(~keep[:, 0, 0, None, :, None], float("nan"))
            before = kv.clone()
            out = decode_attention.cached_attention(q, k, v, rope, kv, None, positions, keep,
                                                     deterministic=True)
            assert out.shape == ref.shape and out.dtype == torch.float16
            assert (out.float() - ref).abs().max().item() < 2e-3, (b, heads, hd, rot)
            written = (slot == positions)[:, None, :, None].expand(b, kv_heads, slots, hd)
            assert (kv.float()[:, written] - ref_kv[:, written]).abs().max().item() < 2e-3  # the new slots, rotated
            assert torch.equal(kv[:, ~written].isnan(), before[:, ~written].isnan())  # nothing else
            assert torch.equal(kv[:, ~written].nan_to_num(), before[:, ~written].nan_to_num())
    print("ok")
""")


def test_decode_attention_matches_sdpa_in_the_interpreter():
    assert _interpret(ATTENTION) == "ok"


ENGINE = textwrap.dedent("""
    import torch
    from megatron_stag.platform.distributed import initialize
    from megatron_stag.serving import decode_attention, gemv, skinny_gemm
    from megatron_stag.serving.convert import to_plain_model
    from megatron_stag.serving.engine import StaggeredGenerator
    from megatron_stag.serving.sampling import SamplingParams
    from tests.model_factory import tiny_model

    initialize(tp=1, pp=1)
    calls = []
    kernel = gemv.gemv
    def recording(x, w, bias=None, residual=None, nw=None, nb=None, eps=0.0, norm=None, activation=None, **kw):
        calls.append((tuple(w.shape), norm, activation, residual is not None))
        return kernel(x, w, bias, residual, nw, nb, eps, norm, activation, **kw)
    gemv.gemv = recording
    gemv.available = lambda device: True  # CPU tensors run through the interpreter
    skinny_gemm.ROWS = 0  # the prompts' 2-64-row matmuls too: bf16, which the interpreter's dot gets wrong
    attended = []
    attend = decode_attention.decode_attention
    def recording_attention(q, keys, values, keep, **kw):
        attended.append((keys.shape[2], kw.get("new") is not None))
        return attend(q, keys, values, keep, **kw)
    decode_attention.decode_attention = recording_attention
    compiled = torch.compile(gemv.linear, dynamic=False)
    x, w, b = torch.randn(1, 1, 256).bfloat16(), (torch.randn(96, 256) / 16).bfloat16(), torch.randn(96).bfloat16()
    assert (compiled(x, w, b).float() - torch.nn.functional.linear(x, w, b).float()).abs().max() < 0.05
    assert calls == [((96, 256), None, None, False)], calls  # the compiled function called the kernel
    plain = to_plain_model(tiny_model(num_layers=2, hidden_size=256, num_attention_heads=4,
                                      position_embedding_type="rope"), None, device="cpu").to(torch.bfloat16)
    params = SamplingParams(max_new_tokens=3)
    calls.clear()
    fast = StaggeredGenerator(plain, max_len=10, batch=1).generate([[5, 9, 2, 33, 7]], params, keep_logits=True)
    shapes = {shape for shape, *_ in calls}
    fused = {tuple(form) for _, *form in calls}  # the layer's norms, GELU and residual adds went into the kernel
    assert {("LayerNorm", None, False), ("LayerNorm", "gelu", False), (None, None, True)} <= fused, fused
    # on the kernel: self-attention's 10 slots with rope and the cache write inside, and without them the
    # cross cache's first 10 of 11 (entry 10 is read at position 10, past the context)
    assert set(attended) == {(10, True), (10, False)}, attended
    slow = StaggeredGenerator(plain, max_len=10, batch=1, kernels=False).generate([[5, 9, 2, 33, 7]], params,
                                                                               keep_logits=True)
    assert fast.tokens == slow.tokens, (fast.tokens, slow.tokens)
    assert (fast.step_logits.float() - slow.step_logits.float()).abs().max() < 0.1
    # deterministic: steps of more query heads than ROWS, which take SDPA by default, stay on the kernel
    decode_attention.ROWS = 2
    attended.clear()
    same = StaggeredGenerator(plain, max_len=10, batch=1, deterministic=True).generate([[5, 9, 2, 33, 7]], params,
                                                                                      keep_logits=True)
    assert set(attended) == {(10, True), (10, False)}, attended
    assert same.tokens == fast.tokens and torch.equal(same.step_logits, fast.step_logits)
    print(sorted(shapes))
""")


def test_decode_attention_splits_cover_the_cache_in_whole_blocks():
    """Splits are whole blocks that cover every slot once, as many as the programs a step aims for allow,
    and a grouped step's at most GROUP_SPLITS (its combine holds every split's partial sums at once)."""
    from megatron_stag.serving import decode_attention as da

    for rows, slots, programs, most in ((8, 32768, da.GROUP_PROGRAMS, da.GROUP_SPLITS), (64, 768, 4096, 32),
                                        (1, 5, da.PROGRAMS, None), (16, 768, da.PROGRAMS, None), (512, 769, 1024, None)):
        split, splits = da._splits(rows, slots, programs, most)
        assert split % da.BLOCK == 0 and split * (splits - 1) < slots <= split * splits, (rows, slots)
        assert splits <= (most or splits) and (rows * splits <= programs or split == da.BLOCK or splits == 1)
    assert da._splits(8, 768, da.GROUP_PROGRAMS, da.GROUP_SPLITS) == (64, 12)  # b=1, 8 kv heads: a block each
    assert da._splits(8, 32768, da.GROUP_PROGRAMS, da.GROUP_SPLITS)[1] == da.GROUP_SPLITS
    assert da._splits(16, 768, da.PROGRAMS) == (64, 12)  # the GPT's b=1 step, as before grouping


def test_engine_routes_one_row_matmuls_to_the_kernel():
    """The engine's step with `gemv` on (forced onto CPU tensors through the interpreter): every
    projection kind (fused q/k/v, out, MLP, the fused cross-attention entry projection, the head) goes
    through the kernel with the layer's norms, GELU and residual adds fused in, under torch.compile too,
    self- and cross-attention through the decode attention kernel, and decoding gives the tokens of
    F.linear's and SDPA's step; a deterministic engine keeps larger steps' attention on the kernel."""
    shapes = _interpret(ENGINE, timeout=600)
    # q/k/v fused, out, MLP up and down, section 2's cross k/v (its one layer), the head
    for shape in ("(768, 256)", "(256, 256)", "(1024, 256)", "(256, 1024)", "(512, 256)", "(64, 256)"):
        assert shape in shapes, (shape, shapes)


def test_streaming_grid_holds_only_resident_programs(monkeypatch):
    """The streaming GEMV's programs per SM follow CUDA's occupancy rules for the compiled kernel: the
    down-projection's 140 registers a thread leave room for 3 programs of 4 warps on an H200's SM
    (65536 registers), so a grid of 8 per SM would run in cold later waves; 64 registers fit 8;
    shared memory or threads can bind instead. Under concurrent streams the grid is not capped."""
    from types import SimpleNamespace

    import torch

    from megatron_stag.serving import gemv as G

    h200 = SimpleNamespace(warp_size=32, regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                           shared_memory_per_multiprocessor=233472)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h200)

    class Compiled:  # what `_fit` reads of a Triton CompiledKernel
        def __init__(self, regs, shared, warps):
            self.n_regs, self.metadata = regs, SimpleNamespace(num_warps=warps, shared=shared)

        def _init_handles(self):
            pass

    def fit(regs, shared=0, warps=4):
        return G._fit(Compiled(regs, shared, warps), torch.device("cuda", 0))

    assert [fit(64), fit(65), fit(96), fit(100), fit(140), fit(214)] == [8, 7, 5, 4, 3, 2]
    assert fit(32) == 16  # threads: 16 programs of 128
    assert fit(32, shared=100_000) == 2

    class Kernel:  # a Triton kernel whose every form compiles to `regs` registers a thread
        def __init__(self, regs):
            self.regs, self.compiles = regs, 0

        def warmup(self, *args, grid, num_warps, **meta):
            self.compiles += 1
            return Compiled(self.regs, 0, num_warps)

    monkeypatch.setattr(G, "_FITS", {})
    x = torch.zeros(1, dtype=torch.bfloat16)
    down, qkv = Kernel(140), Kernel(40)
    for _ in range(3):  # the compiled form is looked up once per form, not per launch
        assert G._resident(down, (x,), dict(K=8192, num_warps=4), torch.device("cuda", 0)) == 3
        assert G._resident(qkv, (x,), dict(K=2048, num_warps=4), torch.device("cuda", 0)) == G.STREAM_PER_SM
    assert (down.compiles, qkv.compiles) == (1, 1)
