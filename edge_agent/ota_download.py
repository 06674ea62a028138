"""On-disk bookkeeping of model downloads in progress: part files, chunk bitmaps, resume.

:class:`edge_agent.ota.ModelReceiver` decides what may be downloaded and installed; this module
only keeps the bytes and the record of which chunks are stored, so that a download survives a
restart (or a kill -9) and asks only for what is still missing. Nothing here checks signatures
or manifests, and nothing here is thread-safe: the receiver holds its lock around every call.

Layout under ``downloads/`` (one directory per version)::

    <version>/offer.json    the offer being followed (resume after a restart)
    <version>/model.part    pre-sized to the model's size; chunk i at offset i * chunk_size
    <version>/have.bin      the offer's sha256 (64 hex bytes) + a bitmap of the stored chunks

Crash safety: ``have.bin`` is written (atomically) only after the part file is synced, so the
bitmap never claims bytes that are not on disk; a crash loses at most the chunks stored since
the last :meth:`Downloads.save`, which are then requested again. ``offer.json`` too is written at
the first save, not at the start: before it a crash could resume no chunk anyway, and a download
that completes before its first save (a small model, a fast link: the usual case) never writes
either file. A directory without them is deleted at resume. Memory stays bounded whatever the
model size: a chunk goes straight to its offset with ``pwrite`` on a descriptor kept open while
chunks come (closed when the download completes or is dropped).

Files per download are few on purpose: a fleet simulated in one process pushes a model to a
thousand devices at once, and each file created, renamed or deleted costs a journal entry.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import msgspec

from edgeloop import wire_models

__all__ = ["SAFE_VERSION", "Downloads", "PartialDownload", "fsync_path"]

OFFER_FILE, PART_FILE, HAVE_FILE = "offer.json", "model.part", "have.bin"
#: A model version that is safe as a directory name (no separators, no leading dot).
SAFE_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-+]{0,63}\Z")


class PartialDownload:
    """One model being downloaded: its offer, its directory, and which chunks are stored."""

    def __init__(self, offer: wire_models.ModelOffer, directory: Path, have: bytearray | None = None) -> None:
        self.offer = offer
        self.dir = directory
        self.have = have if have is not None else bytearray((offer.chunks + 7) // 8)
        self.count = sum(bin(b).count("1") for b in self.have)
        self.unsaved = 0  # chunks stored since the bitmap was last written
        self.saved_at = time.monotonic()
        self.verified_fp: str | None = ""  # fingerprint of the key that verified the offer ("": none yet)
        self.manifest = None  # the offer's manifest as the receiver parsed and checked it
        self.offer_saved = False  # offer.json on disk (written at the first save)
        self._fd: int | None = None  # the part file, open while chunks come

    @property
    def part(self) -> Path:
        return self.dir / PART_FILE

    @property
    def complete(self) -> bool:
        return self.count == self.offer.chunks

    def has(self, i: int) -> bool:
        return bool(self.have[i >> 3] & (1 << (i & 7)))

    def chunk_len(self, i: int) -> int:
        o = self.offer
        return min(o.chunk_size, o.size - i * o.chunk_size)

    def same_as(self, offer: wire_models.ModelOffer) -> bool:
        """Whether ``offer`` names the very same bytes (then the stored chunks stay valid)."""
        o = self.offer
        return (o.sha256, o.size, o.chunk_size, o.chunk_sha256, o.manifest) == (
            offer.sha256, offer.size, offer.chunk_size, offer.chunk_sha256, offer.manifest)

    def store(self, i: int, data: bytes) -> None:
        """Write chunk ``i`` at its offset and mark it (the caller checked its length and hash).
        The part file stays open between chunks and is closed with the last one."""
        if self._fd is None:
            self._fd = os.open(self.part, os.O_WRONLY)
        view, offset = memoryview(data), i * self.offer.chunk_size
        while view:  # pwrite may write less than asked (a signal, a full disk's last blocks)
            n = os.pwrite(self._fd, view, offset)
            if n <= 0:
                raise OSError(f"{self.part}: nothing written at offset {offset} (disk full?)")
            view, offset = view[n:], offset + n
        self.have[i >> 3] |= 1 << (i & 7)
        self.count += 1
        self.unsaved += 1
        if self.count == self.offer.chunks:
            self.close()

    def close(self) -> None:
        """Close the part file if it is open (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def missing(self, max_ranges: int | None = None) -> list[tuple[int, int]]:
        """Inclusive chunk ranges still missing, in order (at most ``max_ranges``)."""
        out: list[tuple[int, int]] = []
        n, i, start = self.offer.chunks, 0, None
        while i < n:
            if start is None and not i & 7 and self.have[i >> 3] == 0xFF:
                i += 8  # eight stored chunks at once
                continue
            if self.has(i):
                if start is not None:
                    out.append((start, i - 1))
                    start = None
                    if max_ranges is not None and len(out) >= max_ranges:
                        return out
            elif start is None:
                start = i
            i += 1
        if start is not None and (max_ranges is None or len(out) < max_ranges):
            out.append((start, n - 1))
        return out


class Downloads:
    """The ``downloads/`` directory: one :class:`PartialDownload` per version.

    ``write(path, data)`` writes a small file atomically (the receiver's writer, which syncs or
    not); ``durable=False`` also skips syncing the part file (simulated fleets on one machine).
    """

    def __init__(self, root: Path, *, write: Callable[[Path, bytes], None], durable: bool = True) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._write = write
        self.durable = durable
        self._by_version: dict[str, PartialDownload] = {}

    def get(self, version: str) -> PartialDownload | None:
        return self._by_version.get(version)

    def versions(self) -> list[str]:
        return sorted(self._by_version)

    def all(self) -> list[PartialDownload]:
        return list(self._by_version.values())

    def start(self, offer: wire_models.ModelOffer) -> PartialDownload:
        """Create the directory, the pre-sized part file and ``offer.json`` for a new download.

        Raises ``OSError`` when the space cannot be reserved (nothing is left behind then).
        """
        if not SAFE_VERSION.match(offer.version):  # a decoded offer always passes; a hand-made one may not
            raise ValueError(f"model version {offer.version!r} cannot name a download directory")
        self.drop(offer.version)
        directory = self.root / offer.version
        directory.mkdir(parents=True)
        fd = None
        try:
            fd = os.open(directory / PART_FILE, os.O_CREAT | os.O_WRONLY, 0o600)
            _reserve(fd, offer.size)
        except OSError:
            if fd is not None:
                os.close(fd)
            shutil.rmtree(directory, ignore_errors=True)
            raise
        dl = self._by_version[offer.version] = PartialDownload(offer, directory)
        dl._fd = fd  # kept open for the chunks to come
        return dl

    def save(self, dl: PartialDownload) -> None:
        """Record which chunks are stored (after syncing the part file, see the module docstring)."""
        if self.durable:
            fsync_path(dl.part)
        if not dl.offer_saved:
            self._write(dl.dir / OFFER_FILE, msgspec.json.encode(dl.offer))
            dl.offer_saved = True
        self._write(dl.dir / HAVE_FILE, dl.offer.sha256.encode() + bytes(dl.have))
        dl.unsaved, dl.saved_at = 0, time.monotonic()

    def flush(self) -> None:
        """Save every download with chunks not yet recorded, and close the part files (a later
        chunk opens its file again)."""
        for dl in self._by_version.values():
            if dl.unsaved:
                self.save(dl)
            dl.close()

    def drop(self, version: str) -> None:
        """Forget a download and delete its files (no error if there is none)."""
        dl = self._by_version.pop(version, None)
        if dl is not None:
            dl.close()
        if SAFE_VERSION.match(version):
            shutil.rmtree(self.root / version, ignore_errors=True)

    def forget(self, version: str) -> None:
        """Forget a download whose directory was moved away (installed); no file is touched."""
        dl = self._by_version.pop(version, None)
        if dl is not None:
            dl.close()

    def resume(self, done: Callable[[str], bool]) -> None:
        """Pick up the downloads left on disk by an earlier run. A directory that is unreadable,
        misplaced or whose version ``done`` says is installed already is deleted (a re-offer then
        starts over); a missing or stale bitmap resumes with no chunk stored."""
        for directory in self.root.iterdir():
            try:
                offer = wire_models.decode_offer((directory / OFFER_FILE).read_bytes())
                if offer.version != directory.name or done(offer.version):
                    raise ValueError("already installed or misplaced")
                have = None
                raw = (directory / HAVE_FILE).read_bytes() if (directory / HAVE_FILE).is_file() else b""
                if raw[:64] == offer.sha256.encode() and len(raw) == 64 + (offer.chunks + 7) // 8:
                    have = bytearray(raw[64:])
                if not (directory / PART_FILE).is_file():
                    raise ValueError("no part file")
                dl = self._by_version[offer.version] = PartialDownload(offer, directory, have)
                dl.offer_saved = True
            except (OSError, ValueError, msgspec.MsgspecError):
                shutil.rmtree(directory, ignore_errors=True)


def fsync_path(path: Path) -> None:
    """Flush a file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reserve(fd: int, size: int) -> None:
    """Pre-size the part file, reserving the blocks where the system can (a full disk fails now,
    not half-way through the download)."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in (95, 22):  # EOPNOTSUPP / EINVAL: a filesystem without fallocate
                raise
    os.ftruncate(fd, size)
