"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, flushed to disk, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data.encode() if isinstance(data, str) else data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(staging, 0o666 & ~_umask())  # as an ordinary open() would create it (mkstemp makes it 0600)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def replace_folder(staging: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make the complete folder `staging` (on the same file system) become `path`: its files flushed to disk
    first, then any old `path` removed and `staging` renamed."""
    for file in Path(staging).rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(staging, path)
