"""`python -m megatron_stag.platform.torchrun [torchrun options] -m MODULE ...`: torch.distributed.run
with a failed rank reported in one line.

A rank that stops with a message (a refused save folder, a bad data file) has already printed it;
torchrun follows it with its agent's error log, a ChildFailedError traceback and a failure table, ~30
lines that bury the message. Here the launch is torchrun's own; only its logging is off, and a failure
ends in one line naming the rank and its exit code or signal, with that code as the exit status.
"""

from __future__ import annotations

import logging
import signal
import sys

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError


def main(argv: list[str]) -> int:
    for name in ["torch.distributed", *logging.root.manager.loggerDict]:  # torch sets levels per module
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        torchrun.run(torchrun.parse_args(argv))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode < 0:
            print(f"rank {rank} was killed by {failure.signal_name()}", file=sys.stderr)
            return 128 - failure.exitcode
        print(f"rank {rank} exited with status {failure.exitcode}", file=sys.stderr)
        return failure.exitcode
    except SignalException as err:  # torchrun stopped its ranks on SIGINT / SIGTERM
        print(f"stopped by {signal.Signals(err.sigval).name}", file=sys.stderr)
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
