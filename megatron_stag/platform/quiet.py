"""Library messages a user can neither act on nor needs, silenced at megatron-stag's entry points
(`cli.main`, in every rank it starts), never on `import megatron_stag`: each entry below is known and
harmless here, and anything else, a real warning included, stays visible."""

from __future__ import annotations

import logging
import os
import re
import warnings

KNOWN_WARNINGS = [  # (category, start of the message: no ',' or ':', which PYTHONWARNINGS splits on)
    (UserWarning, "Transformer Engine and Apex are not installed"),  # megatron's local fallbacks
    (UserWarning, "Apex is not installed. Falling back to Torch Norm"),
    (UserWarning, "Only transformer-engine>=1.7.0 supports MoE experts"),
    (UserWarning, "absl.logging is not installed"),
    (UserWarning, "full scope is deprecated"),  # megatron's own default cuda-graph scope
    (UserWarning, "MimoModelConfig is experimental"),  # imported by megatron, unused here
    (UserWarning, "torch.distributed is disabled"),  # DCP loading in one process
    (UserWarning, "The argument order of load has been changed"),  # megatron's DCP call
    (UserWarning, "'pin_memory' argument is set as true but no accelerator is found"),  # CPU runs
    (UserWarning, "Could not determine rank from torch.distributed"),  # before the launcher's init
    (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated"),  # megatron's call
]

KNOWN_LOG_LINES = [  # (logger, start of the message)
    ("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated"),
    ("megatron.core.rerun_state_machine", "Setting RerunStateMachine mode"),  # start-up notes at WARNING
    ("megatron.core.rerun_state_machine", "RerunStateMachine initialized in mode"),
    ("megatron.core.rerun_state_machine", "Result validation enabled"),
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),  # megatron.training imports it; CPU runs
    ("DeepSpeed", "Setting accelerator to CPU"),  # `--engine deepspeed` where torch sees no GPU either
    # `eval` hands the harness a model it built (the documented way to evaluate an in-memory model)
    ("lm_eval.models.huggingface", "`pretrained` model kwarg is not of type `str`"),
    ("lm_eval.models.huggingface", "Passed an already-initialized model through `pretrained`"),
]


class _DropKnown(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def install() -> None:
    # megatron logs its set-up (dataset indices, gradient buckets, ...) at INFO: WARNING and above
    # unless the user asks (MEGATRON_LOGGING_LEVEL=20 brings it back, here and in every rank)
    level = os.environ.setdefault("MEGATRON_LOGGING_LEVEL", str(logging.WARNING))
    for name in ("", "megatron"):  # megatron.core sets its own logger's level on import
        logging.getLogger(name).setLevel(int(level) if level.isdigit() else logging.WARNING)
    for category, start in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)
    # and in every process started from here (ranks, spawned data workers), from its first import
    ours = [f"ignore:{start}:{category.__name__}" for category, start in KNOWN_WARNINGS]
    given = [f for f in os.environ.get("PYTHONWARNINGS", "").split(",") if f]
    os.environ["PYTHONWARNINGS"] = ",".join(given + [f for f in ours if f not in given])
    for logger, start in KNOWN_LOG_LINES:
        drop_log_lines(logger, start)


def drop_log_lines(logger: str, start: str) -> None:
    """Drop the records of `logger` whose message starts with `start`."""
    logging.getLogger(logger).addFilter(_DropKnown(start))
