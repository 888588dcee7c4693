"""ExpertStore: the routed experts a node holds, stacked per layer.

Each held layer is one mlx-lm ``SwitchGLU`` over the node's experts only
(``[n_local, out, in]``, quantized like the checkpoint) plus a global→local
index map, so compute stays on mlx's ``gather_mm`` / ``gather_qmm`` path.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchGLU
from mlx_lm.utils import infer_quant_config

from expertmesh import compiled, fused, wire
from expertmesh.checkpoint import Checkpoint
from expertmesh.errors import InvalidRequestError, ModelError
from expertmesh.models import Adapter, get_adapter
from expertmesh.models.base import PARTS, PROJECTIONS
from expertmesh.staging import Staging

logger = logging.getLogger(__name__)

# requests of at most this many tokens run compiled, their (token, expert)
# pairs padded to a power of two so that few shapes are ever traced
DECODE_TOKENS = 16


def _combine(mlp: SwitchGLU, hidden: mx.array, tok: mx.array, lids: mx.array, w: mx.array) -> mx.array:
    """``out[tok[p]] += w[p] * expert_{lids[p]}(hidden[tok[p]])``, accumulated
    in float32 like mlx-lm's weighted sum, then cast once."""
    y = mlp(hidden[tok], lids[:, None])[:, 0, :]  # [P, H]
    out = mx.zeros(hidden.shape, dtype=mx.float32).at[tok].add(y * w[:, None])
    return out.astype(hidden.dtype)


@dataclass
class _Layer:
    experts: list[int]      # global ids, sorted
    local: np.ndarray       # [E] global -> local index, -1 when not held
    mlp: SwitchGLU
    nbytes: int

    def __post_init__(self):
        self._steps: dict[tuple[int, int, int, int], Callable] = {}

    def step(self, buf: mx.array, layout: tuple[int, int, int, int], rows: int) -> mx.array:
        """``_combine`` compiled for one ``layout`` (padded rows, hidden width,
        padded pairs, wire dtype) of the packed inputs ``buf`` (``_pack``),
        unpacked inside the compiled graph; the first ``rows`` of its output."""
        step = self._steps.get(layout)
        if step is None:
            step = self._steps[layout] = compiled.for_decode(partial(_unpacked, self.mlp, layout))
        out = step(buf)
        return out if rows == out.shape[0] else out[:rows]


def _unpacked(mlp: SwitchGLU, layout: tuple[int, int, int, int], buf: mx.array) -> mx.array:
    Tp, H, Pp, code = layout
    n = buf.size - 3 * Pp
    hidden = buf[:n].view(wire.mlx_dtype(code)).reshape(Tp, H)
    ints = buf[n:].view(mx.int32).reshape(3, Pp)
    return _combine(mlp, hidden, ints[0], ints[1], ints[2].view(mx.float32))


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted ids -> maximal [lo, hi) runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for i in ids:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


class ExpertStore:
    """The experts of one checkpoint that this node holds."""

    def __init__(self, checkpoint: Checkpoint, adapter: Adapter | None = None):
        self.checkpoint = checkpoint
        self.adapter = adapter or get_adapter(checkpoint.config)
        self.layers: dict[int, _Layer] = {}
        self._moe_layers = set(self.adapter.moe_layers)
        self._lock = threading.Lock()  # guards swapping `layers` during Assign

    @property
    def nbytes(self) -> int:
        return sum(l.nbytes for l in self.layers.values())

    def held(self) -> dict[int, list[int]]:
        return {i: list(l.experts) for i, l in sorted(self.layers.items())}

    def expert_bytes(self, layer: int) -> int:
        return self.adapter.expert_bytes(self.checkpoint.tensors, layer)

    def validate_assignment(self, wanted: dict[int, list[int]]) -> None:
        E = self.adapter.num_experts
        for layer, experts in wanted.items():
            if layer not in self._moe_layers:
                raise InvalidRequestError(f"layer {layer} is not an MoE layer of this model")
            bad = [e for e in experts if not 0 <= e < E]
            if bad:
                raise InvalidRequestError(f"layer {layer}: expert ids {bad} out of range [0, {E})")
            if len(set(experts)) != len(experts):
                raise InvalidRequestError(f"layer {layer}: duplicate expert ids")

    def assign(self, wanted: dict[int, list[int]], progress: Callable[[int, int, int], None] | None = None) -> None:
        """Hold exactly ``wanted`` (layer -> global expert ids) afterwards.

        Layers whose set is unchanged are kept; the rest are read from disk.
        """
        self.validate_assignment(wanted)
        wanted = {l: sorted(e) for l, e in wanted.items() if e}
        todo = [l for l in sorted(wanted) if l not in self.layers or self.layers[l].experts != wanted[l]]
        total = sum(self.expert_bytes(l) * len(wanted[l]) for l in todo)
        loaded = 0
        if progress:
            progress(0, total, 0)
        self.checkpoint.prefetch(r for l in todo for r in self.reads(l, wanted[l]))  # a repo's missing bytes, at once
        fresh = {}
        for n, layer in enumerate(todo, 1):
            fresh[layer] = self._load_layer(layer, wanted[layer])
            loaded += fresh[layer].nbytes
            if progress:
                progress(loaded, total, n)
        with self._lock:
            self.layers = {l: fresh.get(l) or self.layers[l] for l in wanted}
        logger.info("holding %d experts in %d layers (%.1f MB)",
                    sum(len(e) for e in wanted.values()), len(wanted), self.nbytes / 1e6)

    def reads(self, layer: int, experts: list[int]) -> list[tuple[str, tuple[int, int] | None]]:
        """The ``(tensor, rows)`` reads that load these experts of ``layer`` (for ``Checkpoint.prefetch``)."""
        return [r for proj in PROJECTIONS for rs in self._proj_reads(layer, proj, experts).values() for r in rs]

    def _proj_reads(self, layer: int, proj: str, experts: list[int]) -> dict[str, list]:
        """part -> its reads: row runs of a stacked tensor, or one per-expert tensor each."""
        ck, a = self.checkpoint, self.adapter
        base = a.stacked_path(layer, proj)
        if f"{base}.weight" in ck:
            return {part: [(f"{base}.{part}", r) for r in _runs(experts)] for part in PARTS if f"{base}.{part}" in ck}
        out = {}
        for part in PARTS:
            names = [f"{a.hf_path(layer, e, proj)}.{part}" for e in experts]
            if names[0] in ck:
                out[part] = [(n, None) for n in names]
        if "weight" not in out:
            raise ModelError(f"checkpoint has no tensors for {base} (nor per-expert {a.hf_path(layer, experts[0], proj)})")
        return out

    def _read_proj(self, layer: int, proj: str, experts: list[int]) -> dict[str, mx.array]:
        ck = self.checkpoint
        stacked = f"{self.adapter.stacked_path(layer, proj)}.weight" in ck
        out = {}
        for part, reads in self._proj_reads(layer, proj, experts).items():
            pieces = [ck.read(name, rows) for name, rows in reads]
            out[part] = (pieces[0] if len(pieces) == 1 else mx.concatenate(pieces)) if stacked else mx.stack(pieces)
        return out

    def _quant_params(self, path: str, module: nn.Module, tensors: dict):
        """mlx-lm's rule: per-path override, else inferred from the packing."""
        quant = self.checkpoint.config.get("quantization") or {}
        if path in quant:
            return quant[path]
        if "scales" not in tensors:
            return False
        return infer_quant_config(path, module, {f"{path}.{k}": v for k, v in tensors.items()})

    def _load_layer(self, layer: int, experts: list[int]) -> _Layer:
        a = self.adapter
        tensors = {p: self._read_proj(layer, p, experts) for p in PROJECTIONS}
        inter = tensors["gate_proj"]["weight"].shape[1]
        mlp = SwitchGLU(a.hidden_size, inter, len(experts))
        params = {}
        for proj in PROJECTIONS:
            module = getattr(mlp, proj)
            q = self._quant_params(a.stacked_path(layer, proj), module, tensors[proj])
            if q:
                setattr(mlp, proj, module.to_quantized(**q))
            for part, value in tensors[proj].items():
                params[f"{proj}.{part}"] = value
        mlp.load_weights(list(params.items()), strict=True)
        mx.eval(mlp.parameters())
        mlp = fused.fuse(mlp)  # gate and up in one gathered matmul
        local = np.full(a.num_experts, -1, dtype=np.int32)
        local[experts] = np.arange(len(experts), dtype=np.int32)
        nbytes = sum(v.nbytes for _, v in tree_flatten(mlp.parameters()))
        return _Layer(experts, local, mlp, nbytes)

    def forward(self, layer: int, hidden: mx.array, ids: np.ndarray, weights: np.ndarray) -> mx.array:
        """``sum_j weights[t, j] * expert_{ids[t, j]}(hidden[t])`` over slots with id >= 0 (lazy).

        Raises:
            InvalidRequestError: shapes disagree, or a layer or expert is not held.
        """
        code = wire.wire_dtype(hidden.dtype)
        return self.forward_wire(layer, wire.to_numpy(hidden), code, ids, weights)

    def forward_wire(self, layer: int, hidden: np.ndarray, code: int, ids: np.ndarray,
                     weights: np.ndarray, staging: Staging | None = None) -> mx.array:
        """``forward`` of ``hidden`` as the wire carries it (``code``'s carrier
        values, bfloat16 as uint16 bits): a decode-sized request goes to the
        device as one buffer, its rows padded to a power of two (few shapes,
        so few compiled traces, however a batch's rows spread over nodes).
        With ``staging``, that buffer is its array for the buffer's size: the
        caller evaluates the result before its next call with the same staging.

        Raises:
            InvalidRequestError: shapes disagree, or a layer or expert is not held.
        """
        with self._lock:
            held = self.layers.get(layer)
        if held is None:
            raise InvalidRequestError(f"layer {layer} is not held by this node")
        if hidden.ndim != 2 or hidden.shape[1] != self.adapter.hidden_size:
            raise InvalidRequestError(
                f"hidden has shape {list(hidden.shape)}, expected [T, {self.adapter.hidden_size}]")
        T = hidden.shape[0]
        if ids.ndim != 2 or ids.shape[0] != T or weights.shape != ids.shape:
            raise InvalidRequestError(
                f"expert_ids {list(ids.shape)} and weights {list(weights.shape)} must both be [{T}, k]")
        if T == 0:
            raise InvalidRequestError("empty batch: no tokens")
        if ids.shape[1] > self.adapter.num_experts:
            raise InvalidRequestError(f"k={ids.shape[1]} exceeds the {self.adapter.num_experts} experts")
        if not np.isfinite(weights).all():
            raise InvalidRequestError("weights contain NaN or inf")
        E, k = self.adapter.num_experts, ids.shape[1]
        flat = ids.reshape(-1)
        if flat.size and (flat.min() < -1 or flat.max() >= E):
            raise InvalidRequestError(f"expert ids must lie in [-1, {E})")
        pair = np.flatnonzero(flat >= 0)  # the (token, slot) pairs to compute, row-major
        if pair.size == 0:
            return wire.from_numpy(np.zeros(hidden.shape, hidden.dtype), code)
        lids = held.local[flat[pair]]
        if lids.min() < 0:
            missing = sorted(set(flat[pair][lids < 0].tolist()))
            raise InvalidRequestError(f"layer {layer}: experts {missing} are not held by this node")
        w = weights.reshape(-1)[pair].astype(np.float32, copy=False)
        tok = (pair // k).astype(np.int32)
        if T > DECODE_TOKENS:
            return _combine(held.mlp, wire.from_numpy(hidden, code), mx.array(tok), mx.array(lids), mx.array(w))
        buf, layout = _pack(hidden, code, tok, lids, w, staging)
        return held.step(buf, layout, T)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _pack(hidden: np.ndarray, code: int, tok: np.ndarray, lids: np.ndarray, w: np.ndarray,
          staging: Staging | None = None):
    """The compiled step's inputs as one host-to-device copy (on the H200 each
    array made from numpy costs ~70-90 µs, benchmarks/README.md), written into
    ``staging``'s array for its size when given: rows padded to a power of
    two with zeros, pairs to a power of two by repeating the first with
    weight 0 (it adds nothing), all in one uint32 buffer.
    Returns ``(buffer, layout)``; the output's extra rows are sliced off."""
    T, H = hidden.shape
    Tp, P = _pow2(T), tok.size
    Pp = _pow2(P)
    words = hidden.dtype.itemsize * H // 4  # 32-bit words per row (H is even in every supported family)
    size = Tp * words + 3 * Pp
    if staging is None:
        array, buf = None, np.zeros(size, np.uint32)
    else:
        array, buf = staging.buffer("experts", (size,), np.uint32)
        buf.fill(0)
    buf[:T * words] = np.ascontiguousarray(hidden).view(np.uint32).reshape(-1)
    ints = buf[Tp * words:].view(np.int32).reshape(3, Pp)
    ints[0, :P], ints[1, :P], ints[1, P:] = tok, lids, lids[0]  # tok of the padding: row 0
    ints[2].view(np.float32)[:P] = w
    return (mx.array(buf) if array is None else array), (Tp, H, Pp, code)
