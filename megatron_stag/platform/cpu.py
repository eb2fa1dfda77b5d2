"""Run megatron-core on a CPU-only machine (gloo), and stay inert when CUDA is present.

megatron-core 0.19 assumes CUDA in places that have nothing to do with the maths: it allocates on
`device="cuda"` / `torch.cuda.current_device()`, calls `.cuda()`, seeds and forks CUDA RNG
generators, and synchronises streams. Each adaptation below names the megatron code it serves.
They are applied by `activate()`, once, only when `torch.cuda.is_available()` is False; on a GPU
machine `activate()` returns False and changes nothing (tested).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE = False

# Factory functions whose `device=` argument megatron sets to "cuda" or a CUDA index
# (GlobalMemoryBuffer, default masks, pipeline schedules' communication buffers, optimizers).
_FACTORIES = {
    torch.empty, torch.zeros, torch.ones, torch.full, torch.arange, torch.tensor, torch.rand,
    torch.randn, torch.randint, torch.empty_like, torch.zeros_like, torch.ones_like,
    torch.full_like, torch.as_tensor, torch.empty_strided, torch.linspace, torch.eye,
    torch.randperm, torch.rand_like, torch.randn_like, torch.tril, torch.triu,
}


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True  # a bare index means a CUDA ordinal in torch's factory functions
    return torch.device(device).type == "cuda"


def _cpu_factory(fn):
    def factory(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return fn(*args, **kwargs)

    factory.__wrapped__ = fn
    return factory


def _patch_factories() -> None:
    """Function modes are thread-local and not active inside every autograd backward (megatron's
    sequence-parallel linear allocates its reduce-scatter buffer there), so the factory functions
    themselves are wrapped too. `with torch.device(...)` recognises factories by identity, from a set
    it builds once: built after this patch, it would hold the wrappers, miss the functions they call,
    and leave `torch.device("meta")` (transformers' model loading) allocating on the CPU."""
    try:
        from torch.utils._device import _device_constructors
    except ImportError:  # a private helper: a torch without it has nothing to cache first
        pass
    else:
        _device_constructors()  # cached with torch's own functions
    for fn in _FACTORIES:
        name = fn.__name__
        if getattr(torch, name, None) is fn:
            setattr(torch, name, _cpu_factory(fn))


def _patch_tensor_type_names() -> None:
    """megatron's optimizer and gradient clipping assert `param.type() == 'torch.cuda.FloatTensor'`
    (optimizer/clip_grads.py, distrib_optimizer.py): report CPU tensors under their CUDA type names
    when `.type()` is asked for a name (conversions with `.type(dtype)` are untouched)."""
    original = torch.Tensor.type

    def type_name(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            if self.device.type == "cpu" and not name.startswith("torch.cuda."):
                return name.replace("torch.", "torch.cuda.", 1)
            return name
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_name


class CudaToCpuMode(TorchFunctionMode):
    """Maps every CUDA device request onto the CPU (`.cuda()`, `.to("cuda")`, `device=`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda,):
            return args[0]
        if func is torch.Tensor.pin_memory:
            return args[0]
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.to,):
            args = tuple("cpu" if (isinstance(a, (str, torch.device, int)) and not isinstance(a, bool)
                                   and not isinstance(a, torch.dtype) and _is_cuda_device(a))
                         else a for a in args)
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


class _InertStream:
    """Stand-in for torch.cuda.Stream/Event: CPU work is already ordered, so waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def query(self):
        return True

    def record_event(self, *args, **kwargs):  # megatron's MoE dispatcher syncs on the event
        return _InertStream()

    def elapsed_time(self, other):
        return 0.0


def _patch_rng() -> None:
    """megatron's RNG tracker (`tensor_parallel/random.py`) forks CUDA generators: use the CPU one."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, clone=False, **k: (
        torch.get_rng_state().clone() if clone else torch.get_rng_state())
    mrandom._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None  # torch.manual_seed calls it after seeding the CPU
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


class _CpuGenerator(torch.Generator):
    """torch.Generator(device=<cuda>) (megatron.core.inference's sampling RNG) -> a CPU generator;
    a subclass, so isinstance checks against torch.Generator still hold."""

    def __new__(cls, device=None):
        return super().__new__(cls, "cpu" if _is_cuda_device(device) else (device or "cpu"))

    def __init__(self, device=None):
        pass


def _patch_cuda_queries() -> None:
    """Device queries and synchronisation that megatron calls unconditionally."""
    torch.cuda.current_device = lambda: 0
    torch.cuda.device_count = lambda: 1  # megatron skips model-parallel init when this is 0
    # ...but availability stays honest: with PYTORCH_NVML_BASED_CUDA_CHECK=1 (set by importing
    # DeepSpeed) torch derives is_available() from device_count()
    torch.cuda.is_available = lambda: False
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.Stream = _InertStream
    torch.cuda.Event = _InertStream
    torch.cuda.current_stream = lambda *a, **k: _InertStream()
    torch.cuda.default_stream = lambda *a, **k: _InertStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.nvtx.range_push = lambda *a, **k: None
    torch.cuda.nvtx.range_pop = lambda *a, **k: None
    torch.cuda.memory_allocated = lambda *a, **k: 0
    torch.cuda.max_memory_allocated = lambda *a, **k: 0
    torch.cuda.get_device_capability = lambda *a, **k: (0, 0)
    torch.Generator = _CpuGenerator


def activate() -> bool:
    """Apply the CPU adaptations if (and only if) CUDA is absent. Returns whether they are active."""
    global _ACTIVE
    if _ACTIVE:
        return True
    if torch.cuda.is_available():
        return False
    _patch_rng()
    _patch_cuda_queries()
    _patch_factories()
    _patch_tensor_type_names()
    CudaToCpuMode().__enter__()  # global for the process: megatron allocates from many call sites
    _ACTIVE = True
    return True


def adapt_megatron_training() -> None:
    """What `megatron.training.pretrain` needs on top of `activate()` (environment.md): it asserts
    CUDA unless `allow_no_cuda`, its argument checks ask for a GPU architecture, and it warms up
    fused functions that are off here."""
    import functools

    from megatron.training import arguments, initialize, training

    if not _ACTIVE:
        raise RuntimeError("adapt_megatron_training() is for CPU machines: call activate() first.")
    training.initialize_megatron = functools.partial(initialize.initialize_megatron, allow_no_cuda=True)
    # its warm-up compiles the fused bias + activation and bias + dropout + add functions (inductor,
    # C++ here); on CPU they are off (`platform_flags`), so the warm-up only cost seconds per process
    training.set_jit_fusion_options = lambda tp_size=None: None
    arguments.get_device_arch_version = lambda: 0  # only picks performance advice for TP/CP
    training.report_memory = lambda name, process_group=None: None  # CUDA's allocator counters: all 0 here
    from megatron_stag.platform.quiet import drop_log_lines

    # the "GPU" RNG is the CPU generator here, so megatron's check that the CPU state stays untouched
    # inside the GPU RNG context always fires: noise on CPU only
    drop_log_lines("megatron.core.tensor_parallel.random", "CPU RNG state changed within GPU RNG context")


def is_active() -> bool:
    return _ACTIVE
