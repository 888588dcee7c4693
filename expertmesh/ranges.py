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


def expand(text: str, below: int | None = None) -> list[int]:
    """``"0-2,5"`` -> ``[0, 1, 2, 5]``.

    With ``below``, every id must be under it and there are at most ``below``
    of them: text from the network may say "0-99999" in 7 bytes.

    Raises:
        ValueError: a part is not ``N`` or ``N-M`` with ``N <= M``, or ids pass ``below``.
    """
    out: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        hi = hi or lo
        if not (lo.isdigit() and hi.isdigit() and len(lo) <= 9 and len(hi) <= 9) or int(lo) > int(hi):
            raise ValueError(f"{part!r} is not a number or a range N-M")
        if below is not None and int(hi) >= below:
            raise ValueError(f"{int(hi)} is out of range: ids lie below {below}")
        out.extend(range(int(lo), int(hi) + 1))
        if below is not None and len(out) > below:
            raise ValueError(f"more than {below} ids")
    return out


def per_layer(experts: dict[int, list[int]]) -> str:
    """``{0: [0, 1], 1: [0, 1]}`` -> "0-1 (every layer)"; else "L0: 0-1; L1: 2"; "none"."""
    ranges = {compact(e) for e in experts.values()}
    if not any(ranges):
        return "none"
    if len(ranges) == 1:
        return ranges.pop() + " (every layer)"
    return "; ".join(f"L{l}: {compact(e)}" for l, e in sorted(experts.items()))
