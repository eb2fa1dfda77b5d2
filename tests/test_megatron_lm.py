"""The patched Megatron-LM `pretrain_gpt.py` (patches/README.md) trains StagFormer and StagFormer +
AltUp for a few iterations with the flags a machine without Transformer Engine or apex needs.

Needs a GPU and a Megatron-LM checkout of tag core_v0.19.0 with the patch applied, named by
MEGATRON_LM_DIR; skipped otherwise (`make test` has neither)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHECKOUT = os.environ.get("MEGATRON_LM_DIR")
pytestmark = pytest.mark.skipif(not CHECKOUT or not torch.cuda.is_available(),
                                reason="needs MEGATRON_LM_DIR (a patched core_v0.19.0 checkout) and a GPU")

# what megatron asserts deep in model construction without Transformer Engine or apex (patches/README.md)
NO_TE_FLAGS = ["--transformer-impl", "local", "--no-rope-fusion", "--no-persist-layer-norm",
               "--no-masked-softmax-fusion", "--no-bias-dropout-fusion", "--no-bias-swiglu-fusion",
               "--no-gradient-accumulation-fusion"]
TINY = ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "128",
        "--max-position-embeddings", "128", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
        "--swiglu", "--disable-bias-linear", "--micro-batch-size", "4", "--global-batch-size", "4",
        "--train-iters", "6", "--lr", "1e-3", "--log-interval", "1", "--eval-iters", "1", "--eval-interval", "6",
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1024", "--bf16"]


@pytest.mark.parametrize("model", [["--stag-sections", "2"], ["--stag-sections", "2", "--altup-blocks", "2"]],
                         ids=["stagformer", "stagformer-altup"])
def test_patched_pretrain_gpt_trains(model, tmp_path):
    checkout = Path(CHECKOUT)
    assert "megatron_stag" in (checkout / "pretrain_gpt.py").read_text(), "apply the patch first"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]),
               CUDA_DEVICE_MAX_CONNECTIONS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "pretrain_gpt.py",
           *TINY, *NO_TE_FLAGS, *model]
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    losses = [float(x) for x in re.findall(r"lm loss: ([0-9.E+-]+)", out)]
    assert len(losses) == 6 and losses[-1] < losses[0], out[-3000:]
