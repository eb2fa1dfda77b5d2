"""Where the files shipped beside the package live: `recipes/` and `slurm/`.

In a source checkout (and its editable install) they sit next to the package; a wheel installs them as
data files under `<prefix>/share/megatron-stag/` (setup.py's `data_files`), where `prefix` is the
environment's data path (the venv, the user base, or the system prefix).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path


def shipped_dir(name: str) -> Path:
    """`recipes` or `slurm`: the checkout's folder when there is one, else the installed copy."""
    source = Path(__file__).resolve().parents[2] / name
    if source.is_dir():
        return source
    return Path(sysconfig.get_path("data")) / "share" / "megatron-stag" / name
