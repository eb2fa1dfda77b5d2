"""What a benchmark needs to know about the GPU it ran on, measured in the same process."""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from megatron_stag.platform.files import write_atomic

# Dense bf16 tensor-core peaks (vendor datasheets, SXM parts): the MFU denominator.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def peak_tflops() -> float:
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    raise ValueError(f"no bf16 peak recorded for {name!r}: add it to PEAK_BF16_TFLOPS.")


def copy_bandwidth_gbs(nbytes: int = 2 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth, counting bytes read and written (GB/s)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * nbytes / times[len(times) // 2] / 1e9


def capture_cuda_graph(fn, stream=None):
    """`fn` run once on a side stream (warm-up: lazy init, cuBLAS workspaces), then captured there:
    (graph, the captured call's outputs, which every replay refreshes). `stream`: the side stream, where
    fn runs work on streams of its own (none of them may be the capture stream: `engine.distinct_streams`)."""
    side = stream or torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        outputs = fn()
    return graph, outputs


def machine() -> dict:
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError:
        smi = ""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None  # a CPU smoke run records none
    return dict(gpu=gpu, gpus=torch.cuda.device_count(), nvidia_smi=smi,
                torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version())


def write_result(path: Path, record: dict) -> None:
    command = shlex.join(["python", *sys.orig_argv[1:]])  # `-m module` kept, where sys.argv has a file path
    record = dict(command=command, machine=machine(), **record)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=2) + "\n")


def run(main) -> None:
    """A benchmark's entry point: the known library warnings off (as `megatron-stag`'s commands have
    them), and the process group, where the benchmark started one, shut down at the end."""
    from megatron_stag.platform import quiet
    from megatron_stag.platform.distributed import shutdown

    quiet.install()
    try:
        main()
    finally:
        if torch.distributed.is_initialized():
            shutdown()
