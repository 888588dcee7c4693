"""Compact expert ranges: [0, 1, 2, 5, 7, 8] <-> "0-2,5,7-8"."""

from __future__ import annotations


def compact(ids: list[int]) -> str:
    parts, ids = [], sorted(ids)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


def expand(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def per_layer(held: dict[int, list[int]]) -> str:
    """{layer: experts} in a line: "0-3 (every layer)", or "L0: 0-3; L1: 4-7"."""
    sets = {compact(e) for e in held.values()}
    if len(sets) == 1:
        return f"{sets.pop()} (every layer)"
    return "; ".join(f"L{l}: {compact(e)}" for l, e in sorted(held.items()))
