"""Run `megatron-stag` as a user does: a subprocess of `python -m megatron_stag.cli`."""

import os
import subprocess
import sys


def cli(*args, check=True, timeout=600, env=None):
    """`env`: variables set for this command on top of the test's environment."""
    proc = subprocess.run([sys.executable, "-m", "megatron_stag.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=None if env is None else {**os.environ, **env})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc
