"""Where a checkpoint's bytes come from: a local directory (``LocalFiles``);
``hub.HubFiles`` reads a Hugging Face repo the same way, by the byte range."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelError

INDEX = "model.safetensors.index.json"

Range = tuple[str, int, int]  # (file, start, count)


class LocalFiles:
    """The files of directory ``root``, never read outside ``boundary``
    (``root`` itself, or a Hugging Face repo's cache folder for a snapshot)."""

    def __init__(self, root: Path, boundary: Path | None = None, where: str = "the model directory"):
        self.root, self.boundary, self.where = root, boundary or root, where

    def inside(self, name: str) -> Path:
        """``name`` resolved within the boundary.

        Raises:
            ModelError: it (or a symlink on the way) leads outside.
        """
        file = (self.root / name).resolve()
        if not file.is_relative_to(self.boundary):
            raise ModelError(f"{name!r} lies outside {self.where} {self.boundary}")
        return file

    def exists(self, name: str) -> bool:
        return self.inside(name).is_file()

    def text(self, name: str) -> str:
        return self.inside(name).read_text()

    def safetensors(self) -> list[str]:
        return sorted(p.name for p in self.root.glob("*.safetensors"))

    def read(self, name: str, start: int, count: int) -> bytes:
        file = self.inside(name)
        # resolved inside the boundary; no symlink put there since is followed
        with open(os.open(file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb") as f:
            f.seek(start)
            data = f.read(count)
        if len(data) != count:
            raise ModelError(f"{file} is truncated (wanted bytes {start}-{start + count})")
        return data

    def read_many(self, ranges: list[Range]) -> list[bytes]:
        return [self.read(*r) for r in ranges]

    def to_fetch(self, ranges: list[Range]) -> int:
        return 0  # every byte is on disk

    def prefetch(self, ranges: list[Range]) -> None:
        """Nothing to fetch: every byte is on disk."""

    def memo(self, key: str, compute):
        return compute()

    def dense_dir(self, checkpoint, is_expert) -> Path:
        return self.root
