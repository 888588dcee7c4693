"""Dispatcher: one long-lived Forward stream per node; per MoE layer, one
request per node that has work, and the sum of the answers."""

from __future__ import annotations

import logging
import time
from typing import Callable

import mlx.core as mx
import numpy as np

from .. import wire
from ..errors import UnavailableError
from ..placement import describe
from .link import expert_request
from .snapshot import Snapshot
from .stats import RoutingStats

logger = logging.getLogger(__name__)

# a layer's answers are added on the device from this many values (a prompt's
# rows); fewer (decode steps) are added in numpy. On the H200 a 512-token
# layer's two answers took 7.6 ms to add in numpy, converting each to float32
# and rounding back (benchmarks/requestprof.py --parts prefill)
DEVICE_SUM_VALUES = 1 << 16


class Dispatcher:
    """Sends each MoE layer's routed tokens to live nodes holding their experts.

    Each layer reads the current ``Snapshot`` (``current()``) once and routes
    by it: a new one (a rebalance's switch) applies from the next layer on.
    Tokens of a replicated expert are spread evenly over its live copies:
    by token row, turning one copy further at each call of a layer (so one
    decoding sequence alternates too). When a node fails during a layer, only
    the (token, slot) pairs it had are sent again, to live copies; when no
    live node holds an expert, ``recover(missing)`` may load it onto live
    nodes (a command of the state's owner, returning the new snapshot) or raise.

    Layers run on one thread (the router's MLX worker); ``wait_unused`` tells
    the owner when no layer routes by an older snapshot any more.
    """

    def __init__(self, current: Callable[[], Snapshot], timeout: float,
                 recover: Callable[[dict[int, list[int]]], Snapshot] | None = None,
                 stats: RoutingStats | None = None):
        self.current = current
        self.timeout = timeout
        self.recover = recover
        self.stats = stats
        self.retries = 0  # layers partly sent again after a node failed during them
        self._turns: dict[int, int] = {}  # layer -> calls so far, to rotate over copies
        self._reading: int | None = None  # epoch of the snapshot the running layer routes by

    def wait_unused(self, epoch: int, timeout: float) -> bool:
        """Wait until no layer routes by a snapshot older than ``epoch``; False on timeout."""
        deadline = time.monotonic() + timeout
        while (reading := self._reading) is not None and reading < epoch:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def _read(self) -> Snapshot:
        """The current snapshot, noted as in use before it is used (so a switch after this waits for the layer)."""
        while True:
            snap = self.current()
            self._reading = snap.epoch
            if self.current() is snap:
                return snap

    def __call__(self, layer: int, x: mx.array, inds: mx.array, scores: mx.array) -> mx.array:
        try:
            return self._layer(layer, x, inds, scores)
        finally:
            self._reading = None

    def _layer(self, layer: int, x: mx.array, inds: mx.array, scores: mx.array) -> mx.array:
        shape, code = x.shape, wire.wire_dtype(x.dtype)
        hidden, ids, weights = _to_host(x, inds, scores)  # the one sync point of the layer; the rest is numpy
        out = (_DeviceSum if hidden.size >= DEVICE_SUM_VALUES else _Sum)(hidden.shape)
        todo = None  # the (token, slot) pairs left to compute; None: all of them
        served = None  # the node that answered each slot
        sent: list[tuple[int, int, int, float]] = []
        turn = self._turns[layer] = self._turns.get(layer, -1) + 1
        while True:  # each failed round takes a node out, until _choose finds none left
            snap, node = self._choose(layer, ids, todo, turn)
            failed = self._exchange(layer, code, hidden, ids, weights, snap.links, node, out, sent)
            if failed is None:  # mostly at once: every slot of the layer answered
                served = node if served is None else np.where(todo, node, served)
                break
            served = np.where(~failed, node, -1) if served is None else np.where(todo & ~failed, node, served)
            self.retries += 1
            todo = failed
        if self.stats is not None:
            self.stats.record_layer(layer, ids, served, sent)
        return out.array(code).reshape(shape)

    def _choose(self, layer: int, ids: np.ndarray, todo: np.ndarray | None,
                turn: int) -> tuple[Snapshot, np.ndarray]:
        """The snapshot routed by, and [T, k] node index per (token, slot) in
        ``todo`` (None: all) to compute, -1 elsewhere: the ((row + turn) mod
        copies)-th live holder of the expert."""
        snap = self._read()
        holders = snap.placement.owners[layer][ids]  # [T, k, R]
        links = snap.links
        if holders.shape[-1] == 1 and not any(link.down for link in links):  # one live copy of each
            node = holders[..., 0]
            if node.min() >= 0:
                return snap, node if todo is None else np.where(todo, node, -1)
        todo = np.ones(ids.shape, bool) if todo is None else todo
        live = np.array([not link.down for link in links])
        ok = (holders >= 0) & live[np.maximum(holders, 0)]
        if (todo & ~ok.any(-1)).any():
            missing = snap.placement.missing(live)
            if self.recover is not None:
                self._reading = None  # nothing in flight while the owner loads them
                self.recover(missing)
                snap = self._read()
                holders, links = snap.placement.owners[layer][ids], snap.links
                live = np.array([not link.down for link in links])
                ok = (holders >= 0) & live[np.maximum(holders, 0)]
                missing = snap.placement.missing(live)
            if (todo & ~ok.any(-1)).any():
                raise UnavailableError(f"no live node holds {describe(missing)}")
        count = ok.sum(-1)
        pick = (np.arange(ids.shape[0])[:, None] + turn) % np.maximum(count, 1)
        column = np.argmax(ok & (np.cumsum(ok, -1) - 1 == pick[..., None]), -1)
        node = np.take_along_axis(holders, column[..., None], -1)[..., 0]
        return snap, np.where(todo, node, -1)

    def _exchange(self, layer, code, hidden, ids, weights, links, node, out, sent) -> np.ndarray | None:
        """One request per chosen node, answers added into ``out`` and their
        traffic to ``sent``; returns the (token, slot) pairs of nodes that
        failed (``None`` when none did)."""
        T = ids.shape[0]
        failed = None
        calls = []
        chosen = sorted({n for n in node.ravel().tolist() if n >= 0})
        for n in chosen:
            link = links[n]
            if len(chosen) == 1 and node.min() >= 0:  # one node has every slot
                mine, rows, req_ids, req_weights = None, None, ids, weights
            else:
                mine = node == n
                rows = None if T == 1 else np.flatnonzero(mine.any(axis=1))  # the tokens it gets
                if rows is not None and rows.size == T:
                    rows = None
                req_ids, req_weights = np.where(mine, ids, -1), np.where(mine, weights, 0.0)
                if rows is not None:
                    req_ids, req_weights = req_ids[rows], req_weights[rows]
            req = expert_request(layer, hidden if rows is None else hidden[rows], code, req_ids, req_weights)
            try:
                calls.append((n, link, mine, rows, time.perf_counter(), link.submit(req)))
            except UnavailableError as e:
                failed = self._note_failure(layer, link, e, mine, node, failed)
        for n, link, mine, rows, t0, pending in calls:
            try:
                resp = pending.result(timeout=self.timeout)
            except UnavailableError as e:
                if not link.down:  # the node itself refused: no failover helps
                    raise
                failed = self._note_failure(layer, link, e, mine, node, failed)
                continue
            sent.append((n, pending.sent_bytes, pending.received_bytes, time.perf_counter() - t0))
            out.add(rows, wire.decode_numpy(resp.output, "output"), resp.output.dtype)
        return failed

    @staticmethod
    def _note_failure(layer, link, err, mine, node, failed) -> np.ndarray:
        """``failed`` with the slots of ``link`` (``mine``; ``None``: all that
        ``node`` chose) added."""
        mine = node >= 0 if mine is None else mine
        logger.warning("layer %d: %s failed (%s); sending its %d tokens to other holders", layer, link, err,
                       int(mine.any(axis=1).sum()))
        return mine if failed is None else failed | mine


def _to_host(x: mx.array, inds: mx.array, scores: mx.array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A layer's (hidden [T, H] as the wire carries it, expert ids [T, k]
    int32, weights [T, k] float32) on the host, after one evaluation,
    packed into one read where their sizes allow (``wire.read_back``)."""
    H, k = x.shape[-1], inds.shape[-1]
    hidden, ids, weights = wire.read_back([x, inds.astype(mx.int32), scores.astype(mx.float32)])
    return hidden.reshape(-1, H), ids.reshape(-1, k), weights.reshape(-1, k)


class _Sum:
    """A layer's answers: the one that covers every row kept as its bits, or
    several added in float32 (and rounded once, at the end)."""

    __slots__ = ("shape", "whole", "total")

    def __init__(self, shape: tuple[int, int]):
        self.shape = shape
        self.whole: tuple[np.ndarray, int] | None = None
        self.total: np.ndarray | None = None

    def add(self, rows: np.ndarray | None, part: np.ndarray, code: int) -> None:
        if self.whole is None and self.total is None and rows is None and part.shape == self.shape:
            self.whole = (part, code)
            return
        if self.total is None:
            self.total = np.zeros(self.shape, np.float32)
            if self.whole is not None:
                self.total += wire.to_float32(*self.whole)
        self.total[slice(None) if rows is None else rows] += wire.to_float32(part, code)

    def result(self, code: int) -> np.ndarray:
        """The sum as ``code``'s carrier values."""
        if self.total is None and self.whole is not None and self.whole[1] == code:
            return self.whole[0]
        if self.total is None:
            self.total = np.zeros(self.shape, np.float32) if self.whole is None else wire.to_float32(*self.whole)
        return wire.from_float32(self.total, code)

    def array(self, code: int) -> mx.array:
        """The sum as an array of ``code``'s dtype: a new one (``wire.to_device``),
        not a staged one (on the H200 staging here cost ~70 µs a layer more,
        hotpath.py --parts ab, where on the node it saves ~30)."""
        return wire.to_device(self.result(code), code)


class _DeviceSum:
    """A large layer's answers (a prompt's), added on the device as ``_Sum``
    adds them on the host: each answer widened to float32 and added in the
    order they came, and rounded once, so the result is the same, bit for bit.
    Each answer is one copy to the device; nothing waits for the sum."""

    __slots__ = ("shape", "parts")

    def __init__(self, shape: tuple[int, int]):
        self.shape = shape
        self.parts: list[tuple[np.ndarray | None, mx.array]] = []

    def add(self, rows: np.ndarray | None, part: np.ndarray, code: int) -> None:
        self.parts.append((rows, wire.to_device(part, code)))

    def array(self, code: int) -> mx.array:
        dtype = wire.mlx_dtype(code)
        if len(self.parts) == 1 and self.parts[0][0] is None and self.parts[0][1].shape == self.shape:
            return self.parts[0][1].astype(dtype)
        total = mx.zeros(self.shape, mx.float32)
        for rows, part in self.parts:
            part = part.astype(mx.float32)
            total = total + part if rows is None else total.at[mx.array(rows)].add(part)
        return total.astype(dtype)
