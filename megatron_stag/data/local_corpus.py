"""Real text that every machine has: the Python standard library's own sources.

No data set can be downloaded at run time, so the quickstart and tests read `.py` files under
`sysconfig.get_paths()["stdlib"]` (tens of MB, present wherever Python is), in sorted order, so
megatron's in-order document split keeps held-out files out of training.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "lib2to3", "turtledemo"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(max_bytes: int | None = None, root: Path | None = None) -> list[Path]:
    """Sorted stdlib `.py` files (tests and vendored packages skipped), up to `max_bytes` in total."""
    root = root or stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    if not files:
        raise FileNotFoundError(f"no Python sources under {root}: pass text files explicitly.")
    out, total = [], 0
    for f in files:
        size = f.stat().st_size
        if max_bytes is not None and total + size > max_bytes:
            continue
        out.append(f)
        total += size
    return out
