"""The one decode engine equals megatron's teacher-forced forward (exact decoding), for every variant
the serving model supports: the megatron model is converted in memory (`serving.convert`), decoded
by `serving.engine.StaggeredGenerator`, and each step's logits are compared with the megatron
StagFormerModel's forward over the generated sequence."""

import pytest
import torch

from megatron_stag.serving.sampling import SamplingParams
from tests.model_factory import MAX_LEN, tiny_model

pytestmark = pytest.mark.usefixtures("megatron_world")

# fp32; decode computes attention over cached keys with its own SDPA calls while the forward uses
# the full-sequence kernels: agreement to ~1e-6 is expected, 1e-4 still fails on any wrong entry.
ATOL = 1e-4

VARIANTS = {
    "p2-separate": dict(),
    "p2-shared": dict(stag_shared_weights=True),
    "p2-shared-rope": dict(stag_shared_weights=True, position_embedding_type="rope"),
    "p2-window1": dict(stag_cross_window=1),
    "p2-window4": dict(stag_cross_window=4),
    "p3-combine": dict(stag_sections=3, num_layers=6, stag_output="combine"),
    "p2-rope-gqa": dict(position_embedding_type="rope", num_query_groups=2),
    "p1-gpt": dict(stag_sections=1, num_layers=2),
    "p1-altup-k2": dict(stag_sections=1, altup_blocks=2),
    "p1-altup-gemma3n-rope": dict(stag_sections=1, altup_blocks=4, altup_form="gemma3n",
                                  altup_schedule="fixed", altup_embedding="projected",
                                  altup_output="projected", position_embedding_type="rope"),
    "p1-altup-moe": dict(stag_sections=1, altup_blocks=2, num_moe_experts=4, moe_router_topk=2,
                         add_bias_linear=False),
    "p2-moe-swiglu": dict(num_moe_experts=3, moe_router_topk=2, add_bias_linear=False, gated_linear_unit=True,
                          activation_func=torch.nn.functional.silu, bias_activation_fusion=False),
    "p2-altup-widened-learned": dict(altup_blocks=3, altup_embedding="widened", altup_output="learned"),
    "p2-shared-altup": dict(stag_shared_weights=True, altup_blocks=2),
    "p2-null-first": dict(stag_null_entry="first"),
    "p2-null-first-window4-rope": dict(stag_null_entry="first", stag_cross_window=4, position_embedding_type="rope"),
}


def serving(model):
    from megatron_stag.serving.convert import to_plain_model

    return to_plain_model(model, None)


def generator(model, max_len=16, batch=1, **kw):
    from megatron_stag.serving.engine import StaggeredGenerator

    return StaggeredGenerator(serving(model), max_len=max_len, batch=batch, **kw)


def _teacher_forced(model, sequence):
    ids = torch.tensor([sequence])
    with torch.no_grad():
        return model(ids, torch.arange(len(sequence))[None])[0]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_decode_logits_equal_megatron_forward(name, monkeypatch):
    """Steps read the caches in buckets of 4 slots (`engine.SLOT_BUCKET`): 8, 12 and then all 16."""
    from megatron_stag.serving import engine

    monkeypatch.setattr(engine, "SLOT_BUCKET", 4)
    model = tiny_model(**VARIANTS[name])
    prompts = [[5, 9, 2, 33, 7], [1, 2, 3], [60, 61, 62, 63, 0, 1, 2]]  # mixed lengths in one batch
    params = SamplingParams(max_new_tokens=9, temperature=0.8, top_k=20, seed=3)
    result = generator(model, batch=len(prompts)).generate(prompts, params, keep_logits=True)
    for r, prompt in enumerate(prompts):
        full = prompt + result.tokens[r]
        ref = _teacher_forced(model, full)
        torch.testing.assert_close(result.prompt_logits[r], ref[len(prompt) - 1], atol=ATOL, rtol=0)
        steps = result.step_logits[:, r]  # logits at positions len(prompt) .. len(full) - 2
        torch.testing.assert_close(steps, ref[len(prompt): len(full) - 1], atol=ATOL, rtol=0)


def test_rope_base_fraction_norm_epsilon_and_head_size_reach_the_decoder():
    """A run trained with megatron's --rotary-base, --rotary-percent, --norm-epsilon or --kv-channels
    has them in its model_args.json, and `generate`, `export` and `import` rebuild the model with them
    (they used 10000, 1.0 and 1e-5 whatever the run had: decoding that differed from training without a
    word; a head size other than hidden / heads did not load at all)."""
    from megatron_stag.models.model_args import ModelArgs
    from megatron_stag.serving.convert import model_args_for

    args = ModelArgs(vocab_size=64, max_sequence_length=MAX_LEN, num_layers=4, hidden_size=32, num_attention_heads=4,
                     stag_sections=2, position_embedding_type="rope", normalization="RMSNorm",
                     rotary_base=500_000, rotary_percent=0.5, layernorm_epsilon=0.05, kv_channels=16)
    torch.manual_seed(0)
    model = args.build(args.config()).eval()
    plain = serving(model)
    assert (plain.cfg.rotary_base, plain.cfg.rotary_dim, plain.cfg.norm_eps, plain.cfg.head_dim) == (500_000.0, 8, 0.05, 16)
    back = model_args_for(plain.cfg)
    assert (back.rotary_base, back.rotary_percent, back.layernorm_epsilon, back.kv_channels) == (500_000, 0.5, 0.05, 16)
    prompt = [5, 9, 2, 33, 7]
    result = generator(model).generate([prompt], SamplingParams(max_new_tokens=8), keep_logits=True)
    ref = _teacher_forced(model, prompt + result.tokens[0])
    torch.testing.assert_close(result.step_logits[:, 0], ref[len(prompt): len(prompt) + 7], atol=ATOL, rtol=0)


def test_llama3_rope_scaling_reaches_the_decoder():
    """A run with megatron's --use-rope-scaling decodes with it: StagFormer p=2 steps at positions
    ~300, where the scaling moves the logits, equal megatron's forward, and do not without it."""
    from megatron_stag.models.model_args import ModelArgs
    from megatron_stag.serving.convert import model_args_for
    from megatron_stag.serving.engine import StaggeredGenerator

    args = ModelArgs(vocab_size=64, max_sequence_length=512, num_layers=4, hidden_size=32, num_attention_heads=4,
                     stag_sections=2, position_embedding_type="rope", rotary_base=500_000, use_rope_scaling=True,
                     rope_scaling_factor=32.0)
    torch.manual_seed(0)
    model = args.build(args.config()).eval()
    with torch.no_grad():  # peaked attention, so that where a key sits (its rotation) shows in the logits
        for name, p in model.named_parameters():
            if "linear_qkv" in name and name.endswith("weight"):
                p.mul_(8)
    back = model_args_for(serving(model).cfg)
    assert (back.use_rope_scaling, back.rope_scaling_factor) == (True, 32.0)
    prompt = torch.randint(0, 64, (290,), generator=torch.Generator().manual_seed(0)).tolist()
    result = generator(model, max_len=300).generate([prompt], SamplingParams(max_new_tokens=8), keep_logits=True)
    ref = _teacher_forced(model, prompt + result.tokens[0])[len(prompt): len(prompt) + 7]
    torch.testing.assert_close(result.step_logits[:, 0], ref, atol=ATOL, rtol=0)
    unscaled = serving(model)
    unscaled.cfg.rope_scaling_factor = None
    again = StaggeredGenerator(unscaled, max_len=300, batch=1).generate([prompt], SamplingParams(max_new_tokens=8),
                                                                         keep_logits=True)
    assert (again.step_logits[:, 0] - ref).abs().max() > 10 * ATOL


def test_prompts_prefill_together_in_groups(monkeypatch):
    """Prompts of similar lengths prefill as one forward, padded on the right, at most PREFILL_TOKENS
    tokens (rows x the group's longest) each: every grouping gives the tokens and logits of prefilling
    each prompt alone (0: one forward per prompt), a window's ring and the mix of p=3 included."""
    from megatron_stag.serving import engine

    assert engine.prefill_groups([5, 3, 7, 3]) == [[1, 3, 0, 2]]
    monkeypatch.setattr(engine, "PREFILL_TOKENS", 10)
    assert engine.prefill_groups([5, 3, 7, 3]) == [[1, 3], [0], [2]]  # 2 x 3, then 3 x 5 > 10
    prompts = [[5, 9, 2, 33, 7], [1, 2, 3], [60, 61, 62, 63, 0, 1, 2], [4, 8, 4]]
    params = SamplingParams(max_new_tokens=6)
    for overrides in (dict(stag_cross_window=4), dict(stag_sections=3, num_layers=6, stag_output="combine")):
        model = tiny_model(**overrides)
        results, forwards = {}, {}
        for budget in (10, 0, 4096):
            monkeypatch.setattr(engine, "PREFILL_TOKENS", budget)
            gen = generator(model, batch=len(prompts))
            calls = []
            monkeypatch.setattr(gen, "_prefill_rows", lambda rows, ps, inner=gen._prefill_rows: (
                calls.append(rows), inner(rows, ps))[1])
            results[budget] = gen.generate(prompts, params, keep_logits=True)
            forwards[budget] = calls
        assert forwards == {10: [[1, 3], [0], [2]], 0: [[1], [3], [0], [2]], 4096: [[1, 3, 0, 2]]}
        alone = results[0]
        for budget in (10, 4096):
            assert results[budget].tokens == alone.tokens
            torch.testing.assert_close(torch.stack(results[budget].prompt_logits), torch.stack(alone.prompt_logits),
                                       atol=1e-5, rtol=0)
            torch.testing.assert_close(results[budget].step_logits, alone.step_logits, atol=1e-5, rtol=0)


def test_recurrent_mode():
    """Recurrent: equals the normal model on the prompt (and the step reading only prompt entries),
    differs afterwards, and is deterministic."""
    model = tiny_model(stag_shared_weights=True)
    prompt = [[3, 14, 15, 9, 26, 5]]
    params = SamplingParams(max_new_tokens=8)
    normal = generator(model, 32).generate(prompt, params, keep_logits=True)
    rec1 = generator(model, 32, recurrent=True).generate(prompt, params, keep_logits=True)
    rec2 = generator(model, 32, recurrent=True).generate(prompt, params, keep_logits=True)
    torch.testing.assert_close(rec1.prompt_logits[0], normal.prompt_logits[0])
    # Step 0 decodes position n, whose cross entries all come from the prompt (pass 1) in both modes.
    torch.testing.assert_close(rec1.step_logits[0], normal.step_logits[0])
    if rec1.tokens == normal.tokens:
        assert not torch.allclose(rec1.step_logits[1:], normal.step_logits[1:])
    assert rec1.tokens == rec2.tokens and torch.equal(rec1.step_logits, rec2.step_logits)
    with pytest.raises(ValueError, match="recurrent=True needs shared weights"):
        generator(tiny_model(), 32, recurrent=True)


def test_recurrent_mode_equals_its_definition():
    """Recurrent mode against its definition, computed without the decode caches: the prompt's cross
    entries are pass 1's outputs; from then on, the entry after position j is pass 2's own output at j.
    Each step t re-runs pass 2 teacher-forced over positions 0..t with that memory."""
    model = tiny_model(stag_shared_weights=True, position_embedding_type="rope")
    plain, prompt, new = serving(model), [3, 14, 15, 9, 26, 5], 8
    rec = generator(model, 32, recurrent=True).generate([prompt], SamplingParams(max_new_tokens=new),
                                                        keep_logits=True)
    ids = torch.tensor([prompt + rec.tokens[0]])
    n, length = len(prompt), len(prompt) + new - 1  # the last token is sampled, never decoded
    with torch.no_grad():
        positions = torch.arange(length)[None]
        h0, rope = plain.embed(ids[:, :length], positions), plain.rope(positions)
        pass1 = plain.sections[0](h0, positions, None, plain.new_caches(1, length)[0], rope)
        memory, logits = pass1[:, :n], []
        for t in range(n, length):
            caches = plain.new_caches(1, t + 1)
            entries = torch.cat([plain.null_entry(memory), memory], 1)  # entries 0..t
            plain.sections[1].write_entries(caches[1], entries, torch.zeros(1, dtype=torch.long))
            cut = (h0[:, :t + 1], positions[:, :t + 1], None, caches[1], tuple(r[..., :t + 1, :] for r in rope))
            out = plain.sections[1](*cut)
            logits.append(plain.logits([out[:, t]])[0])
            memory = torch.cat([memory, out[:, t:t + 1]], 1)
    torch.testing.assert_close(rec.step_logits[:, 0], torch.stack(logits), atol=ATOL, rtol=0)


def test_sampling_controls():
    model = tiny_model()
    greedy = generator(model, 32, 2).generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=6))
    again = generator(model, 32, 2).generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=6))
    assert greedy.tokens == again.tokens
    stop = greedy.tokens[0][2]
    stopped = generator(model, 32, 2).generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=6, stop=lambda ids: ids[-1] == stop))
    assert stopped.tokens[0][-1] == stop and len(stopped.tokens[0]) <= 3
    a = generator(model, 32).generate([[1]], SamplingParams(8, temperature=1.0, seed=1))
    b = generator(model, 32).generate([[1]], SamplingParams(8, temperature=1.0, seed=1))
    assert a.tokens == b.tokens
    gen = generator(model, 32, 2)
    with pytest.raises(ValueError, match="exceeds the context"):
        gen.generate([[1] * 30], SamplingParams(max_new_tokens=5))
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate([[1], []], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="no prompts"):
        gen.generate([], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_sampling_follows_the_distribution():
    """The exponential race (argmax p / E) samples multinomial(p); top-k and top-p cut the tail."""
    from megatron_stag.serving.sampling import sample

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(40000, 1)
    gen = torch.Generator().manual_seed(0)

    def freq(**kw):
        return torch.bincount(sample(logits, SamplingParams(temperature=1.0, **kw), gen), minlength=5) / 40000

    torch.testing.assert_close(freq(), logits[0].softmax(0), atol=0.01, rtol=0)
    torch.testing.assert_close(freq(top_k=2), torch.cat([logits[0, :2].softmax(0), torch.zeros(3)]), atol=0.01, rtol=0)
    probs = logits[0].softmax(0)  # top-p 0.8 keeps the tokens up to and including the one crossing 0.8
    torch.testing.assert_close(freq(top_p=0.8), torch.cat([probs[:3] / probs[:3].sum(), torch.zeros(2)]),
                               atol=0.01, rtol=0)


@pytest.mark.parametrize("vocab", [32768, 50304, 1000, 50257])
def test_greedy_is_torch_argmax(vocab):
    """The two-stage greedy argmax picks torch.argmax's token, the first of tied maxima included,
    eager and compiled, and where the vocabulary has no factor in common with the groups (50257)."""
    from megatron_stag.serving.sampling import greedy

    gen = torch.Generator().manual_seed(vocab)
    ties = torch.randint(0, 3, (8, vocab), generator=gen).float()  # every row has many tied maxima
    late = torch.zeros(2, vocab)
    late[:, -1] = 1.0  # the maximum in the last group, at its last index
    cases = [torch.randn(8, vocab, generator=gen).bfloat16(), ties, late]
    compiled = torch.compile(greedy, backend="aot_eager")
    for x in cases:
        assert torch.equal(greedy(x), x.argmax(-1))
        assert torch.equal(compiled(x), x.argmax(-1))


def test_decode_loop_reads_back_only_to_stop():
    """The loop keeps tokens on the device: a stop rule is checked every `check_every` steps (rows
    run on meanwhile and are cut at their stop), and without one nothing is read until the end."""
    from megatron_stag.serving.sampling import decode_loop

    calls = []

    def step(tokens, positions):
        calls.append(1)
        return tokens + 1, positions + 1, None

    params = SamplingParams(max_new_tokens=40, stop=lambda ids: ids[-1] == 3)
    out, _ = decode_loop(torch.tensor([0, 10]), step, torch.tensor([5, 5]), params, check_every=8)
    assert out[0] == [0, 1, 2, 3] and out[1] == list(range(10, 50))
    assert len(calls) == 39
    out, _ = decode_loop(torch.tensor([0]), step, torch.tensor([5]), params, check_every=8)
    assert out == [[0, 1, 2, 3]] and len(calls) == 39 + 7  # checked once 8 tokens were out
    out, _ = decode_loop(torch.tensor([0, 10]), step, torch.tensor([5, 5]), params, check_every=8, live=1)
    assert out == [[0, 1, 2, 3], []] and len(calls) == 39 + 7 + 7  # a spare row (`live`) holds nothing up


def test_more_prompts_than_the_batch_decode_in_groups():
    """Prompts decode `batch` at a time, the spare rows of a group of fewer running unprefilled: each
    prompt's tokens are its tokens in a batch of its own (greedy and sampled from the same seed, rows
    being independent), and fewer prompts than the batch decode too; kept logits need one group."""
    model = tiny_model(position_embedding_type="rope")
    prompts = [[7, 3, 9, 1, 4], [2, 8], [5, 5, 6], [1], [9, 4, 4, 2]]
    gen = generator(model, 32, batch=2)
    for params in (SamplingParams(max_new_tokens=6), SamplingParams(max_new_tokens=6, temperature=0.8, seed=3)):
        grouped = gen.generate(prompts, params).tokens
        alone = [generator(model, 32, batch=2).generate(prompts[i:i + 2], params).tokens for i in (0, 2)]
        assert grouped[:4] == alone[0] + alone[1]
        if params.temperature == 0:
            assert grouped[4] == gen.generate([prompts[4]], params).tokens[0]
            ref = _teacher_forced(model, prompts[4] + grouped[4])
            assert grouped[4][1:] == ref[len(prompts[4]): -1].argmax(-1).tolist()
            kept = gen.generate([prompts[4]], params, keep_logits=True)
            assert kept.step_logits.shape[1] == 1 and len(kept.prompt_logits) == 1
            assert torch.allclose(kept.step_logits[:, 0], ref[len(prompts[4]): -1], atol=1e-4)
    with pytest.raises(ValueError, match="at most 2 prompts"):
        gen.generate(prompts, SamplingParams(max_new_tokens=2), keep_logits=True)


def test_steps_read_the_slots_their_rows_fill(monkeypatch):
    """SDPA steps read the caches' first slots in whole buckets, enough for every row's position (the
    cross cache as many; a window's ring all of it); where every step is the flash-decoding kernel's
    (`decode_attention.takes`: grouped queries, full heads up to `ROWS` per step or, in self-attention,
    above `CACHED_ROWS`, or deterministic) they read every slot."""
    from megatron_stag.serving import decode_attention, engine
    from megatron_stag.serving.model import Attention

    monkeypatch.setattr(engine, "SLOT_BUCKET", 4)
    params = SamplingParams(max_new_tokens=9)
    steps = [8, 12, 12, 12, 12, 16, 16, 16]  # positions 7..14 (filled 8..15) of the longer prompt
    for window, cross_slots in ((None, steps), (3, [4] * 8)):
        gen = generator(tiny_model(stag_cross_window=window), 16, batch=2)
        assert gen.widths(params, 7) == [8, 12, 16]
        read = {0: [], 1: []}  # per section, the slots each step's attention got
        for k, section in enumerate(gen.model.sections):
            for m in section.layers[0].modules():
                if isinstance(m, Attention):
                    m.attention = lambda q, keys, values, keep, inner=m.attention, k=k: (
                        read[k].append(keys.shape[2]), inner(q, keys, values, keep))[1]
        gen.generate([[5, 9, 2, 33, 7, 1, 1], [1, 2, 3]], params)
        assert read[0][-8:] == steps
        assert read[1][-16::2] == steps and read[1][-15::2] == cross_slots
    q_heads = tiny_model().config.num_attention_heads
    assert engine.SLOT_BUCKET and decode_attention.ROWS >= q_heads
    cpu = generator(tiny_model(), 16, batch=1)
    assert cpu.bucket == 4  # no kernels on CPU: SDPA for every step
    monkeypatch.setattr(engine, "MAX_BUCKETS", 3)
    assert generator(tiny_model(), 16, batch=1).bucket == 8  # at most 3 buckets: 8 and 16
    monkeypatch.setattr(engine, "MAX_BUCKETS", 16)
    monkeypatch.setattr(engine._gemv, "available", lambda device: True)
    monkeypatch.setattr(engine.StagLM, "use_kernels", lambda self, *fns: None)
    assert generator(tiny_model(), 16, batch=1).bucket is None
    batch = decode_attention.ROWS // q_heads + 1
    assert generator(tiny_model(), 16, batch=batch).bucket == 4
    assert generator(tiny_model(), 16, batch=batch, deterministic=True).bucket is None
    # grouped queries take the kernel at any batch; a StagFormer's cross-attention has a kv head per query
    # head, so its steps of that batch take SDPA
    assert generator(tiny_model(num_query_groups=1, stag_sections=1), 16,
                     batch=decode_attention.ROWS + 1).bucket is None
    assert generator(tiny_model(num_query_groups=1), 16, batch=batch).bucket == 4
    # full heads' self-attention steps above CACHED_ROWS are the kernel's again, the cross-attention's are not
    big = decode_attention.CACHED_ROWS // q_heads + 1
    assert generator(tiny_model(stag_sections=1), 16, batch=big).bucket is None
    assert generator(tiny_model(), 16, batch=big).bucket == 4


def test_one_compiled_step_per_section_serves_every_bucket(monkeypatch):
    """The mask's slot dimension is dynamic, and a bucketed generator's caches and mask hold a slot past
    max_len that no step reads, so no bucket is the whole tensor: one compilation of the section step
    per section serves every bucket, the full width included (dynamo specialised the whole width on
    contiguity, and compiled it again). A counting backend stands in for inductor on CPU."""
    import functools

    from torch._dynamo.testing import CompileCounter

    from megatron_stag.serving import engine

    monkeypatch.setattr(engine, "SLOT_BUCKET", 8)
    gen = generator(tiny_model(position_embedding_type="rope"), 24, batch=2)
    assert gen.bucket == 8 and gen.caches[0].kv[0].shape[3] == 25
    assert gen.widths(SamplingParams(max_new_tokens=16), 5) == [8, 16, 24]
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(engine._run_section, backend=counter, dynamic=False)
    for k in gen.mine:
        gen._run[k] = functools.partial(compiled, gen.model.sections[k], gen.caches[k], normed=gen._run[k].keywords["normed"])
    try:
        gen.generate([[5, 9, 2, 33, 7], [1, 2, 3]], SamplingParams(max_new_tokens=16))
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == gen.model.cfg.sections


def test_caches_larger_than_free_memory_fail_first(monkeypatch):
    """A generator whose caches cannot fit in the device's free memory says so, with their size, before
    allocating them."""
    from megatron_stag.serving import engine

    monkeypatch.setattr(engine, "_free_memory", lambda device: 1000)
    with pytest.raises(engine.CacheMemoryError, match=r"batch=3 rows of max_len=16 slots need .* GiB"):
        generator(tiny_model(), 16, batch=3)
    monkeypatch.setattr(engine, "_free_memory", lambda device: 10 ** 9)
    generator(tiny_model(), 16, batch=3)


def test_learned_positions_bound_the_context():
    with pytest.raises(ValueError, match=f"exceeds the model's {MAX_LEN} positions"):
        generator(tiny_model(), MAX_LEN + 1)


def test_window_bounds_cross_cache():
    """With a window W the engine's cross cache is a ring of W + 1 slots whatever the context
    (bounded memory), and decoding through it, past several wraps, still equals the forward."""
    model = tiny_model(stag_cross_window=3)
    small, large = generator(model, 16), generator(model, 32)
    assert small.caches[1].cross.shape == large.caches[1].cross.shape
    assert large.caches[1].cross.shape[4] == 4
    full = generator(tiny_model(), 32)
    assert full.caches[1].cross.shape[4] == full.caches[1].kv[0].shape[3] + 1 >= 33  # every entry, 0..max_len
    prompt = [7, 3, 9, 1, 4, 4, 8, 2, 6]  # longer than the ring: the prefill reads every entry
    result = large.generate([prompt], SamplingParams(max_new_tokens=12), keep_logits=True)
    ref = _teacher_forced(model, prompt + result.tokens[0])
    torch.testing.assert_close(result.step_logits[:, 0], ref[len(prompt): len(prompt) + 11], atol=ATOL, rtol=0)


def test_compile_options_time_no_pick_when_deterministic():
    """The fused step compiles with every inductor option that pays (multi-kernel among them) by default on
    CUDA; deterministic decoding takes none that picks a kernel by timing it, which may pick differently
    in another process; on CPU or with compile off the step runs eagerly."""
    from megatron_stag.serving.engine import compile_options

    cuda, timed = torch.device("cuda"), ("triton.multi_kernel", "max_autotune", "coordinate_descent_tuning")
    fastest = compile_options(cuda, compile=True, deterministic=False)
    assert fastest["triton.multi_kernel"] and fastest["triton.enable_pdl"] and fastest["combo_kernels"]
    repeatable = compile_options(cuda, compile=True, deterministic=True)
    assert repeatable and not any(repeatable.get(k) for k in timed)
    assert {k: v for k, v in fastest.items() if k not in timed} == repeatable
    assert compile_options(torch.device("cpu"), True, False) == {} == compile_options(cuda, False, False)
