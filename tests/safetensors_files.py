"""Checkpoints written straight from tensor shapes: random bytes, or headers only."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np

ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "U32": 4}


def write_checkpoint(path: Path, config: dict, tensors: dict[str, tuple[str, tuple]],
                     shards: int = 2, data: bool = True) -> int:
    """``config.json``, an index and ``shards`` safetensors files holding
    ``tensors`` (name -> (dtype, shape)) in order: random bytes, or with
    ``data=False`` only each file's header, as a config-only download has.
    Returns the bytes of tensor data the files describe."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    names = list(tensors)
    per_shard = math.ceil(len(names) / shards)
    rng, weight_map, total = np.random.default_rng(0), {}, 0
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "mlx"}}, 0
        for name in names[s * per_shard:(s + 1) * per_shard]:
            dtype, shape = tensors[name]
            nbytes = math.prod(shape) * ITEMSIZE[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path / file, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, meta in header.items():
                if data and name != "__metadata__":
                    f.write(rng.bytes(meta["data_offsets"][1] - meta["data_offsets"][0]))
        total += offset
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def headers_only(src: Path, dst: Path) -> Path:
    """A copy of checkpoint ``src`` with every safetensors file cut after its header."""
    dst.mkdir(parents=True)
    for name in ("config.json", "model.safetensors.index.json"):
        shutil.copy(src / name, dst / name)
    for file in src.glob("*.safetensors"):
        with open(file, "rb") as f:
            head = f.read(8)
            (dst / file.name).write_bytes(head + f.read(struct.unpack("<Q", head)[0]))
    return dst
