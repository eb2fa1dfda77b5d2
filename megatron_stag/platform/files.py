"""Output files that are complete or absent: written beside their destination, then renamed onto it."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def write_atomic(path: Path, text: str | bytes) -> None:
    """`path` holds `text` (or bytes), or (if the process dies first) whatever it held before: a job
    killed while writing leaves no half-written file. The file gets the permissions a plain write would."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A new folder at `out`, filled in a temporary sibling (yielded) and renamed onto `out` when the
    block ends without error, removed otherwise: whole or absent. It and the files written in it get
    the permissions a plain mkdir and write would (mkdtemp's 0700 and safetensors' 0600 would hide
    them from the rest of a team)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = _umask()
    try:
        yield tmp
        for path in [tmp, *tmp.rglob("*")]:
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def refuse_existing(path, overwrite: bool, flag: str) -> None:
    """A result already at `path` (a finished job's, say) is replaced only when asked: FileExistsError
    naming the flag, the file and the fix."""
    if path and not overwrite and Path(path).exists():
        raise FileExistsError(f"{flag} {path} exists: write to a new file, or add --overwrite to replace it")


def check_output(path, overwrite: bool, flag: str = "--output") -> None:
    """A result file can go to `path` (None: none asked for): its folder exists, and a file there is
    replaced only when asked. FileNotFoundError or FileExistsError, naming the flag and the fix."""
    if path and not Path(path).parent.is_dir():
        raise FileNotFoundError(f"{flag} {path}: the folder {Path(path).parent} does not exist; create it first")
    refuse_existing(path, overwrite, flag)
