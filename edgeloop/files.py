"""Writing a file so that a crash never leaves half of it, and secrets are never readable by others."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: str | os.PathLike, data: bytes | str, mode: int = 0o600, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` through a synced temp file in the same directory, then rename.

    The temp file is created with ``mode`` already applied (mkstemp creates it 0600, and the mode
    is set before any byte is written), so a private file is never briefly world-readable.
    ``durable=False`` skips the fsync (still atomic, not crash-proof): for simulated fleets only.
    """
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
