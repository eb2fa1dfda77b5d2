"""StagFormerModel invariants on one process: the baseline reduction, causality, the stagger, the
window, shared weights, and the output mix. Each test names the bug it would catch."""

import pytest
import torch

from tests.model_factory import MAX_LEN, SEQ, VOCAB, assert_causal, batch, tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("megatron_world")


def test_one_section_is_megatron_gpt():
    """p=1 with megatron's local spec must be megatron's GPTModel bit for bit (same weights)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron_stag.specs.stagformer_specs import get_stagformer_layer_spec

    spec = get_stagformer_layer_spec(False, backend="local", core_attention="local")
    assert repr(spec) == repr(get_gpt_layer_local_spec())  # MLP builders are partials: compare by value
    stag = tiny_model(stag_sections=1, section_specs=[spec])
    cfg = TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4,
                            use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0)
    gpt = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=MAX_LEN).eval()
    state = {k.replace("decoder.", "blocks.0."): v for k, v in gpt.state_dict().items()}
    missing, unexpected = stag.load_state_dict(state, strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected
    ids, pos = batch()
    with torch.no_grad():
        assert torch.equal(stag(ids, pos), gpt(ids, pos, None))


def test_sdpa_core_attention_matches_megatron_local_attention():
    """The SDPA core attention computes megatron's attention (catches a wrong scale, mask or layout)."""
    from megatron_stag.specs.stagformer_specs import get_stagformer_section_specs

    cfg = tiny_config(stag_sections=2, stag_cross_window=3)
    local = tiny_model(stag_cross_window=3,
                       section_specs=get_stagformer_section_specs(cfg, "local", "local"))
    sdpa = tiny_model(stag_cross_window=3)
    sdpa.load_state_dict(local.state_dict())
    ids, pos = batch()
    with torch.no_grad():
        torch.testing.assert_close(sdpa(ids, pos), local(ids, pos), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", [
    dict(stag_sections=2), dict(stag_sections=2, stag_shared_weights=True),
    dict(stag_sections=3, num_layers=6, stag_output="combine"),
    dict(stag_sections=2, stag_cross_window=1, position_embedding_type="rope"),
])
def test_causality(variant):
    """Changing token t leaves logits at positions < t unchanged (catches a future leak)."""
    assert_causal(tiny_model(**variant), 7)


def _perturb_section_output(model, section: int, position: int):
    block_index = [p.section for p in model.pieces].index(section)

    def hook(module, args, output):
        output = output.clone()
        output[position] += 1.0
        return output

    return model.blocks[block_index].register_forward_hook(hook)


@pytest.mark.parametrize("variant", [dict(), dict(stag_shared_weights=True),
                                     dict(stag_sections=3, num_layers=6)])
def test_stagger(variant):
    """Section k at i must not see section k-1 at i: perturbing section k-1's output at i changes
    logits only at positions > i (catches an unshifted or off-by-one cross-attention)."""
    model = tiny_model(**variant)
    ids, pos = batch()
    i = 5
    p = model.config.stag_sections
    with torch.no_grad():
        base = model(ids, pos)
        handle = _perturb_section_output(model, p - 2, i)
        moved = model(ids, pos)
        handle.remove()
    assert torch.equal(base[:, : i + 1], moved[:, : i + 1])
    assert not torch.allclose(base[:, i + 1], moved[:, i + 1])


@pytest.mark.parametrize("window", [1, 3])
def test_window(window):
    """With window W, section k at j sees section k-1 only at j-W..j-1 (catches a window off by one,
    or one that leaks older positions)."""
    model = tiny_model(stag_cross_window=window, num_layers=2)  # one layer per section: no mixing
    ids, pos = batch()
    i = 3
    with torch.no_grad():
        base = model(ids, pos)
        handle = _perturb_section_output(model, 0, i)
        moved = model(ids, pos)
        handle.remove()
    moved_at = [j for j in range(SEQ) if not torch.allclose(base[:, j], moved[:, j])]
    # One layer per section: section 1's self-attention reads only embeddings, so t_i reaches
    # exactly the positions whose window holds it.
    assert moved_at == list(range(i + 1, min(SEQ, i + window + 1)))


def test_window_bounds_what_cross_attention_reads():
    """Directly at the cross-attention: query j attends to shifted keys j-W+1..j only."""
    from megatron_stag.layers.sdpa_attention import banded_causal_mask

    keep = banded_causal_mask(6, 6, window=1, device="cpu")
    assert keep.sum(1).tolist() == [1, 2, 2, 2, 2, 2]
    assert keep[4].nonzero().flatten().tolist() == [3, 4]


def test_shared_weights_share_storage_and_count():
    """Shared weights: parameters = h-layer model + the cross-attention (+ its norm and the extra
    final norm); the passes use the very same tensors (catches silent copies)."""
    shared = tiny_model(stag_sections=2, stag_shared_weights=True)
    half = tiny_model(stag_sections=1, num_layers=2)
    n_shared = sum(p.numel() for p in shared.parameters())
    n_half = sum(p.numel() for p in half.parameters())
    cross = sum(p.numel() for layer in shared.blocks[1].layers
                for m in (layer.cross_attention, layer.pre_cross_attn_layernorm) for p in m.parameters())
    final_norm = sum(p.numel() for p in shared.blocks[0].final_layernorm.parameters())
    assert n_shared == n_half + cross + final_norm
    a, b = shared.blocks[0].layers[0], shared.blocks[1].layers[0]
    assert a.mlp.linear_fc1.weight.data_ptr() == b.mlp.linear_fc1.weight.data_ptr()
    assert a.cross_attention is not b.cross_attention


def test_combine_starts_as_last_section():
    """stag_output='combine' is initialised to the last section only (catches a mix that starts
    as an average and changes the model at step 0)."""
    model = tiny_model(stag_sections=3, num_layers=6, stag_output="combine")
    ids, pos = batch()
    with torch.no_grad():
        _, _, outs = model.run_sections(ids, pos)
        torch.testing.assert_close(model.section_output(outs), outs[-1])
        model.section_mix.data[0] = 0.5
        assert not torch.allclose(model.section_output(outs), outs[-1])


def test_gradients_reach_every_section_and_the_embedding():
    model = tiny_model(stag_sections=3, num_layers=6).train()
    ids, pos = batch()
    model(ids, pos, labels=ids).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_null_entry_for_the_first_position_only(megatron_world):
    """stag_null_entry='first' (the paper's literal reading): position 0 still reads the null entry,
    later positions do not. Same weights: position 0's logits equal the default model's ('all', where
    every softmax includes the null entry), later positions' differ; the mask itself says exactly that."""
    import torch

    from megatron_stag.layers.sdpa_attention import SDPAttention
    from megatron_stag.layers.staggered_cross_attention import cross_attention_config
    from megatron.core.transformer.enums import AttnMaskType
    from tests.model_factory import batch, tiny_config, tiny_model

    every, first = tiny_model(), tiny_model(stag_null_entry="first")
    first.load_state_dict(every.state_dict())
    ids, pos = batch()
    with torch.no_grad():
        a, b = every(ids, pos), first(ids, pos)
    assert torch.equal(a[:, 0], b[:, 0])
    assert (a[:, 1:] - b[:, 1:]).abs().amax(-1).min() > 0
    core = SDPAttention(cross_attention_config(tiny_config(stag_null_entry="first")), 1, AttnMaskType.causal, "cross")
    keep = core._keep_mask(5, 5, "cpu")
    expected = torch.ones(5, 5).tril().bool()
    expected[1:, 0] = False
    assert torch.equal(keep, expected)
    with pytest.raises(ValueError, match="stag_null_entry='first'"):
        from megatron_stag.specs.stagformer_specs import get_stagformer_section_specs

        get_stagformer_section_specs(tiny_config(stag_null_entry="first"), core_attention="local")
    with pytest.raises(Exception, match="stag_null_entry='last'"):
        tiny_config(stag_null_entry="last")
