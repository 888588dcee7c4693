"""What the router routed and what its requests saw, counted on the hot path.

``RoutingStats.record_layer`` runs once per MoE layer with the arrays the
dispatcher already has in numpy: two ``bincount``s and a few additions per
request, never a Python loop over tokens. Pipeline stage spans run their
gates on their nodes, which count what they route and send it back with
each reply: ``record_stage`` keeps that, with the span's round trip, and it is
counted in batches when read (or 256 are waiting). ``RequestStats`` counts requests,
generated tokens and time to first token. Both can be reset; ``snapshot``
turns them into one ``RouterStats`` message.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from ..metrics import Histogram
from ..placement import balance_ratio
from ..v1 import expertmesh_pb2 as pb

logger = logging.getLogger(__name__)


class RoutingStats:
    """Per MoE layer: token-slots per expert and per node; per node: requests,
    bytes each way and round-trip latency."""

    def __init__(self, moe_layers: list[int], num_experts: int, nodes: list[str], top_k: int = 0):
        self.moe_layers = list(moe_layers)
        self.num_experts = num_experts
        self.nodes = list(nodes)
        self._row = {l: i for i, l in enumerate(self.moe_layers)}
        # layer -> its row, -1 for a dense layer: stage replies look their layers up in one step
        self._row_of = np.full(max(self.moe_layers, default=0) + 1, -1, np.int64)
        self._row_of[self.moe_layers] = np.arange(len(self.moe_layers))
        self._node = {n: i for i, n in enumerate(self.nodes)}
        self._lock = threading.Lock()
        self.top_k = top_k
        self.staged = np.zeros(len(self.moe_layers), bool)  # layers a pipeline stage runs: not balanceable
        self.reset()

    def reset(self) -> None:
        L, E, N = len(self.moe_layers), self.num_experts, len(self.nodes)
        with self._lock:
            if getattr(self, "_waiting", None):  # which layers are staged outlives a reset
                self._fold()
            self.expert_tokens = np.zeros((L, E), np.int64)
            self.node_tokens = np.zeros((L, N), np.int64)
            self.layer_tokens = np.zeros(L, np.int64)
            self.requests = np.zeros(N, np.int64)
            self.bytes_sent = np.zeros(N, np.int64)
            self.bytes_received = np.zeros(N, np.int64)
            self.rtt = [Histogram() for _ in range(N)]
            self.round_trips = 0
            self._waiting: list[tuple] = []  # stage round trips not counted yet (record_stage)

    def totals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of the token-slot counts: [layers, experts], [layers, nodes]
        (0 in stage layers, whose load no expert move changes), tokens [layers]."""
        with self._lock:
            self._fold()
            return self.expert_tokens.copy(), self._spread_node_tokens(), self.layer_tokens.copy()

    def _spread_node_tokens(self) -> np.ndarray:
        return np.where(self.staged[:, None], 0, self.node_tokens)

    def record_layer(self, layer: int, ids: np.ndarray, slot_nodes: np.ndarray,
                     sent: list[tuple[int, int, int, float]]) -> None:
        """One MoE layer's routing.

        Args:
            layer: the MoE layer.
            ids: [T, k] global expert per token slot.
            slot_nodes: [T, k] index (into ``nodes``) of the node serving each slot.
            sent: per request, ``(node index, bytes sent, bytes received, round trip seconds)``.
        """
        i = self._row[layer]
        experts = np.bincount(ids.ravel(), minlength=self.num_experts)
        nodes = np.bincount(slot_nodes.ravel(), minlength=len(self.nodes))
        with self._lock:
            self.top_k = ids.shape[1]
            self.expert_tokens[i] += experts
            self.node_tokens[i] += nodes
            self.layer_tokens[i] += ids.shape[0]
            self.round_trips += 1
            for n, out, back, rtt in sent:
                self.requests[n] += 1
                self.bytes_sent[n] += out
                self.bytes_received[n] += back
                self.rtt[n].observe(rtt)

    def record_stage(self, node: str, start: int, end: int, tokens: int, routing: pb.StageRouting,
                     sent: int, received: int, rtt: float) -> None:
        """One round trip of the stage span of layers ``[start, end)`` to ``node``.

        Kept as it came and counted with others (``_fold``) when the counts
        are read or ``FOLD_EVERY`` are waiting: counting one at a time cost
        ~350 µs a span call on the 2-core VM (cProfile of an auto-mode
        decode), on the generation's own thread.

        Args:
            tokens: rows x positions of the hidden states sent.
            routing: what the span's gates routed, as the node counted it (validated when counted).
            sent, received, rtt: the request's and the reply's bytes, and the round trip in seconds.
        """
        # the counts copied out: a reference would keep the whole reply (its output too) alive
        slots, counts = np.asarray(routing.slots, np.int64), np.asarray(routing.counts, np.int64)
        with self._lock:
            self._waiting.append((node, start, end, tokens, slots, counts, sent, received, rtt))
            if len(self._waiting) >= self.FOLD_EVERY:
                self._fold()

    FOLD_EVERY = 256  # stage round trips kept before they are counted

    def _fold(self) -> None:
        """Count the waiting stage round trips, all at once (hold ``_lock``)."""
        waiting, self._waiting = self._waiting, []
        if not waiting:
            return
        E, L = max(self.num_experts, 1), len(self._row_of)
        slots, counts = [w[4] for w in waiting], [w[5] for w in waiting]
        bad = np.array([len(a) != len(c) for a, c in zip(slots, counts)])
        counts = [np.zeros(len(a), np.int64) if x else c for a, c, x in zip(slots, counts, bad)]
        starts, ends, tokens = (np.array([w[i] for w in waiting], np.int64) for i in (1, 2, 3))
        starts = np.clip(starts, 0, L)  # the router's own spans; kept in range all the same
        ends = np.clip(ends, starts, L)
        which = np.repeat(np.arange(len(waiting)), [len(a) for a in slots])  # the round trip of each slot
        layer, expert = np.divmod(np.concatenate(slots), E)
        count = np.concatenate(counts)
        known = (layer >= 0) & (layer < L)
        good = (known & (self._row_of[np.where(known, layer, 0)] >= 0) & (layer >= starts[which])
                & (layer < ends[which]) & (expert < self.num_experts) & (count <= tokens[which] * self.num_experts))
        bad[which[~good]] = True
        for i in np.flatnonzero(bad):
            logger.warning("node %s reported routing outside layers %d-%d (or over %d tokens): not counted",
                           waiting[i][0], waiting[i][1], waiting[i][2] - 1, waiting[i][3])
        keep = ~bad[which]
        row, expert, count, which = self._row_of[layer[keep]], expert[keep], count[keep], which[keep]
        nodes = np.array([self._node.get(w[0], -1) for w in waiting])
        # every MoE layer of each span: staged, and its tokens counted
        spans = np.zeros(L + 1, np.int64)
        np.add.at(spans, starts, tokens)
        np.add.at(spans, ends, -tokens)
        per_layer = np.cumsum(spans)[:L]
        touched = np.zeros(L + 1, np.int64)
        np.add.at(touched, starts, 1)
        np.add.at(touched, ends, -1)
        moe = self._row_of >= 0
        rows = self._row_of[moe]
        self.staged[rows[np.cumsum(touched)[:L][moe] > 0]] = True
        self.layer_tokens[rows] += per_layer[moe]
        self.round_trips += len(waiting)
        np.add.at(self.expert_tokens, (row, expert), count)
        served = nodes[which] >= 0
        np.add.at(self.node_tokens, (row[served], nodes[which][served]), count[served])
        for (*_, sent, received, rtt), n in zip(waiting, nodes):
            if n >= 0:
                self.requests[n] += 1
                self.bytes_sent[n] += sent
                self.bytes_received[n] += received
                self.rtt[n].observe(rtt)

    def fill(self, m: pb.RouterStats) -> None:
        """Copy the counts into ``m`` (with the balance ratio and bytes per token)."""
        with self._lock:
            self._fold()
            m.num_experts, m.top_k = self.num_experts, self.top_k
            for i, layer in enumerate(self.moe_layers):
                m.layers.add(layer=layer, expert_tokens=self.expert_tokens[i].tolist(),
                             node_tokens=self.node_tokens[i].tolist(), tokens=int(self.layer_tokens[i]))
            for n, name in enumerate(self.nodes):
                m.nodes.add(name=name, tokens=int(self.node_tokens[:, n].sum()), requests=int(self.requests[n]),
                            bytes_sent=int(self.bytes_sent[n]), bytes_received=int(self.bytes_received[n]),
                            rtt_seconds=self.rtt[n].to_message())
            m.tokens_processed = int(self.layer_tokens.max(initial=0))
            m.round_trips = self.round_trips
            spread = self._spread_node_tokens()
            # the layers whose experts are spread; with none, how evenly the stages share the model
            m.balance_ratio = balance_ratio(spread if spread.any() else self.node_tokens.sum(0, keepdims=True))
            traffic = int(self.bytes_sent.sum() + self.bytes_received.sum())
            m.bytes_per_token = traffic / m.tokens_processed if m.tokens_processed else 0.0


class RequestStats:
    """Requests by kind, generated tokens and time to first token."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.since = time.monotonic()
            self.requests: dict[str, int] = {}
            self.tokens_generated = 0
            self.ttft = Histogram()

    def started(self, kind: str) -> None:
        with self._lock:
            self.requests[kind] = self.requests.get(kind, 0) + 1

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def token(self) -> None:
        with self._lock:
            self.tokens_generated += 1

    def fill(self, m: pb.RouterStats) -> None:
        with self._lock:
            m.seconds = time.monotonic() - self.since
            m.requests.update(self.requests)
            m.tokens_generated = self.tokens_generated
            m.ttft_seconds.CopyFrom(self.ttft.to_message())


def hot_experts(m: pb.RouterStats, top: int) -> list[tuple[int, int, float]]:
    """The ``top`` busiest ``(layer, expert, share of the layer's token-slots)``, busiest first."""
    if not m.layers or not m.num_experts:
        return []
    counts = np.array([l.expert_tokens for l in m.layers], np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    order = np.argsort(-counts, axis=None, kind="stable")[:top]
    rows, cols = np.unravel_index(order, counts.shape)
    return [(m.layers[r].layer, int(c), float(share[r, c])) for r, c in zip(rows, cols) if counts[r, c] > 0]
