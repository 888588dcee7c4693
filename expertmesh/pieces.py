"""PieceCache: byte ranges of blobs, each kept as a file named by its range.

``ROOT/<etag>/<start>-<end>`` holds bytes ``[start, end)`` of the blob whose
content hash is ``etag``. A piece is written under a temporary name and
renamed when whole, so a cut connection leaves nothing a reader would take;
a file whose size does not match its name is ignored. Reads assemble what
the pieces cover and fetch only the gaps, so a node given other experts
fetches only what it did not have.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

logger = logging.getLogger(__name__)

_PIECE = re.compile(r"^(\d{1,15})-(\d{1,15})$")

# fetch(start, end, sink): write bytes [start, end) into sink
Fetch = Callable[[int, int, BinaryIO], None]


class atomic:
    """``with atomic(path) as f``: written under a temporary name, renamed into place when whole."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> BinaryIO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-")
        self.file = os.fdopen(fd, "wb")
        return self.file

    def __exit__(self, kind, *_) -> None:
        self.file.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)


def write_atomic(path: Path, data: bytes) -> None:
    with atomic(path) as f:
        f.write(data)


class PieceCache:
    def __init__(self, root: Path):
        self.root = root

    def pieces(self, etag: str) -> list[tuple[int, int]]:
        """The whole pieces of blob ``etag``, sorted."""
        folder = self.root / etag
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            m = _PIECE.match(entry.name)
            if m and entry.is_file(follow_symlinks=False):
                start, end = int(m[1]), int(m[2])
                if start < end and entry.stat(follow_symlinks=False).st_size == end - start:
                    found.append((start, end))
        return sorted(found)

    def missing(self, etag: str, start: int, count: int) -> list[tuple[int, int]]:
        """The gaps ``[a, b)`` of ``[start, start + count)`` no piece covers."""
        gaps, cursor, end = [], start, start + count
        for a, b in self.pieces(etag):
            if b <= cursor or a >= end:
                continue
            if a > cursor:
                gaps.append((cursor, a))
            cursor = max(cursor, b)
            if cursor >= end:
                break
        if cursor < end:
            gaps.append((cursor, end))
        return gaps

    def peek(self, etag: str, start: int, count: int) -> bytes | None:
        """The bytes, when the pieces cover them all; else None."""
        if self.missing(etag, start, count):
            return None
        return self._assemble(etag, start, count)

    def get(self, etag: str, start: int, count: int, fetch: Fetch) -> bytes:
        """The bytes, fetching (and keeping) the gaps first.

        Raises:
            whatever ``fetch`` raises; the gap it was fetching is not kept.
        """
        for a, b in self.missing(etag, start, count):
            with atomic(self.root / etag / f"{a}-{b}") as f:
                fetch(a, b, f)
        return self._assemble(etag, start, count)

    def _assemble(self, etag: str, start: int, count: int) -> bytes:
        out, cursor, end = bytearray(), start, start + count
        for a, b in self.pieces(etag):
            if b <= cursor or a > cursor:
                continue
            take = min(b, end) - cursor
            fd = os.open(self.root / etag / f"{a}-{b}", os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with open(fd, "rb") as f:
                f.seek(cursor - a)
                out += f.read(take)
            cursor += take
            if cursor >= end:
                break
        if cursor < end:  # a piece went away meanwhile (another process cleaning up)
            raise OSError(f"the piece cache lost bytes {cursor}-{end} of {etag}")
        return bytes(out)
