"""Run `megatron-stag` as a user does: a subprocess of `python -m megatron_stag.cli`."""

import subprocess
import sys


def cli(*args, check=True, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "megatron_stag.cli", *args], capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc
