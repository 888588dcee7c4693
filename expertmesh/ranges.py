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


def per_layer(experts: dict[int, list[int]]) -> str:
    """``{0: [0, 1], 1: [0, 1]}`` -> "0-1 (every layer)"; else "L0: 0-1; L1: 2"; "none"."""
    ranges = {compact(e) for e in experts.values()}
    if not any(ranges):
        return "none"
    if len(ranges) == 1:
        return ranges.pop() + " (every layer)"
    return "; ".join(f"L{l}: {compact(e)}" for l, e in sorted(experts.items()))
