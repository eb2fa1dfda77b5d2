"""TP=2 / PP=2 / PP=4 runs equal the TP=1/PP=1 run (loss and every gradient shard), and torch_dist
checkpoints reshard between layouts. CPU ranks on gloo; fp32, no dropout."""

import glob
import os

import pytest
import torch

from tests.dist_helpers import run_ranks
from tests.parallel_workers import evaluate, train_step

# Summation order changes under TP/PP (all-reduce, split matmuls): fp32 agreement to ~1e-6
# relative is expected; 1e-4 absolute leaves room without hiding a wrong gradient (those are O(1e-2)).
ATOL, RTOL = 1e-4, 1e-4


def _results(out_dir):
    loss, grads = None, {}
    for path in sorted(glob.glob(os.path.join(out_dir, "rank*.pt"))):
        r = torch.load(path, weights_only=True)
        loss = r.get("loss", loss)
        for key, parts in r["grads"].items():
            grads.setdefault(key, []).extend(parts)
    return loss, grads


def _assemble(parts):
    """The whole tensor from the reference run's pieces (one, or one per expert for MoE)."""
    shape = [max(o + n for o, n in zip(offs, dims)) for offs, dims in
             zip(zip(*[off for off, _ in parts]), zip(*[t.shape for _, t in parts]))]
    full = torch.zeros(shape)
    for offset, t in parts:
        full[tuple(slice(o, o + n) for o, n in zip(offset, t.shape))] = t
    return full


def _compare(ref_dir, out_dir):
    ref_loss, ref = _results(ref_dir)
    loss, got = _results(out_dir)
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert set(got) == set(ref), set(got) ^ set(ref)
    for key, parts in got.items():
        full = _assemble(ref[key])
        for offset, shard in parts:
            index = tuple(slice(o, o + n) for o, n in zip(offset, shard.shape))
            torch.testing.assert_close(shard, full[index], atol=ATOL, rtol=RTOL, msg=key)


CASES = {
    "tp2-sequence-parallel-combine": (2, 1, dict(sequence_parallel=True, stag_output="combine",
                                                  position_embedding_type="rope")),
    "pp2-separate": (1, 2, dict()),
    # a gated MLP checkpoints linear_fc1 through a ShardedTensorFactory: keys must be layout-free too
    "pp2-shared-gated-mlp": (1, 2, dict(stag_shared_weights=True, gated_linear_unit=True)),
    # AltUp: K=3 on one section puts layers 2, 3 (blocks 2, 0) on stage 1: a stage-local schedule
    # would compute blocks 0, 1 there; the K*d stream crosses the stage boundary.
    "pp2-altup-k3-widened": (1, 2, dict(stag_sections=1, altup_blocks=3, altup_embedding="widened",
                                         altup_output="learned")),
}
SLOW_CASES = {  # the default run keeps one case per mechanism: TP+SP, PP, PP+shared, AltUp across stages
    "tp2-separate-window": (2, 1, dict(stag_cross_window=2)),
    "pp2-shared": (1, 2, dict(stag_shared_weights=True)),
    "pp2-one-section": (1, 2, dict(stag_sections=1)),
    "tp2-sp-altup-gemma3n": (2, 1, dict(sequence_parallel=True, altup_blocks=2, altup_form="gemma3n",
                                         altup_schedule="fixed", altup_embedding="projected",
                                         altup_output="projected", position_embedding_type="rope")),
    "pp4-two-stages-per-section": (1, 4, dict()),
    "pp4-shared": (1, 4, dict(stag_shared_weights=True)),
    "tp2-pp2-combine": (2, 2, dict(stag_output="combine")),
    "pp2-shared-altup": (1, 2, dict(stag_shared_weights=True, altup_blocks=2)),
    "tp2-sp-altup-moe": (2, 1, dict(stag_sections=1, sequence_parallel=True, altup_blocks=2,
                                     num_moe_experts=4, moe_router_topk=2, add_bias_linear=False)),
    "tp2-altup-sequence-stride2": (2, 1, dict(stag_sections=1, altup_sequence_stride=2)),
}


def _run_case(tmp_path, tp, pp, stag):
    stag = dict(dict(stag_sections=2), **stag)
    ref_dir, par_dir, back_dir = (str(tmp_path / d) for d in ("ref", "par", "back"))
    for d in (ref_dir, par_dir, back_dir):
        os.makedirs(d)
    run_ranks(train_step, 1, 1, 1, stag, None, ref_dir)
    run_ranks(train_step, tp * pp, tp, pp, stag, os.path.join(ref_dir, "ckpt"), par_dir)
    _compare(ref_dir, par_dir)
    # Round trip: the checkpoint written at TP/PP loads at TP=1/PP=1 and gives the same loss.
    run_ranks(evaluate, 1, 1, 1, stag, os.path.join(par_dir, "ckpt"), back_dir)
    run_ranks(evaluate, 1, 1, 1, stag, os.path.join(ref_dir, "ckpt"), ref_dir)
    back = torch.load(os.path.join(back_dir, "eval0.pt"))["loss"]
    assert back == torch.load(os.path.join(ref_dir, "eval0.pt"))["loss"]


@pytest.mark.parametrize("case", list(CASES))
def test_parallel_matches_single_rank(tmp_path, case):
    _run_case(tmp_path, *CASES[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SLOW_CASES))
def test_parallel_matches_single_rank_slow(tmp_path, case):
    _run_case(tmp_path, *SLOW_CASES[case])


@pytest.mark.parametrize("stag", [
    pytest.param(dict(stag_sections=2), marks=pytest.mark.slow),
    dict(stag_sections=2, stag_shared_weights=True),  # shared weights: the gradient most easily reduced twice
    pytest.param(dict(stag_sections=2, altup_blocks=2, altup_embedding="widened"), marks=pytest.mark.slow)])
def test_distributed_optimizer_step_matches_single_rank(tmp_path, stag):
    """DP=2 with megatron's distributed optimizer takes the same Adam step as DP=1 (catches a
    gradient that is reduced twice or not at all, e.g. for shared weights)."""
    from tests.parallel_workers import optimizer_step

    ref_dir, dp_dir = tmp_path / "ref", tmp_path / "dp"
    ref_dir.mkdir(), dp_dir.mkdir()
    run_ranks(train_step, 1, 1, 1, stag, None, str(ref_dir))  # writes the initial checkpoint
    ckpt = str(ref_dir / "ckpt")
    run_ranks(optimizer_step, 1, False, stag, ckpt, str(ref_dir))
    run_ranks(optimizer_step, 2, True, stag, ckpt, str(dp_dir))
    ref, got = (torch.load(d / "step.pt") for d in (ref_dir, dp_dir))
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    for key, value in ref["params"].items():
        torch.testing.assert_close(got["params"][key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_initializing_again_at_the_same_sizes_keeps_megatron_groups(megatron_world):
    """Every in-process export, import or benchmark calls `initialize(tp=1, pp=1)`. Re-made, megatron's
    groups leaked (its destroy leaves them in torch's registry, each gloo group with three polling
    threads): a test session reached 500 of them and two thirds of a core."""
    from megatron.core import parallel_state
    from torch.distributed import distributed_c10d

    from megatron_stag.platform.distributed import initialize

    groups, tp_group = len(distributed_c10d._world.pg_map), parallel_state.get_tensor_model_parallel_group()
    for _ in range(3):
        initialize(tp=1, pp=1)
    assert len(distributed_c10d._world.pg_map) == groups
    assert parallel_state.get_tensor_model_parallel_group() is tp_group
