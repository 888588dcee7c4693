"""A forward pass through spans that follow each other layer after layer: a chain.

When the model reaches the first span of a chain, ``StageRuntime`` runs the
whole chain here, and the later spans' stand-ins pass its output on (a span
with no neighbour, or one rebuilding KV, runs here as a chain of one):

- The cache stand-ins of every span are updated first and evaluated with
  the hidden states in one ``mx.eval``, so the router syncs with its device
  once a pass, not once a span.
- Each span's reply goes on to the next span's node as the wire carried it
  (numpy over the reply's bytes): no ``mx.array``, eval or read-back on the
  router between two spans. Only the chain's last reply becomes an array.
- A prompt longer than a chunk (``chunk_size``: 128 tokens a row where the
  chain's nodes are on other hosts) goes in chunks, pipelined in lockstep:
  at step ``t`` the chain's span ``s`` runs chunk ``t - s``. Every request of a step is sent before any reply of it
  is read, so while a later span's node runs one chunk, an earlier span's
  node runs the next. With S spans and k chunks a prompt takes k + S - 1
  steps of a chunk's time, against k * S one after the other.

A step sends one request a node at a time (``_one_a_link``). Failover is
``StageRuntime.send``'s: a step's replies are all read first, then each
request whose node failed is sent again once its span has moved and its
sequences' KV is rebuilt (no reply of the step is still unread on any link
then, since a rebuild sends requests of its own). A piece's round trip, in
the router's stats, runs from its send to its reply's read, so in a prompt's
step it includes reading the replies read before it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .. import wire
from ..errors import UnavailableError
from ..v1 import expertmesh_pb2 as pb
from ..serving import split_address
from .link import stage_request_numpy

PREFILL_CHUNK = 128  # tokens a row per chunk of a prompt, by default, where the chain spans hosts


@dataclass(eq=False)
class _Piece:
    """One chunk of one span's request in the pass."""

    stage: "Stage"
    s: int                    # the span's place in the chain
    j: int                    # the chunk's place in the pass
    request: pb.StageRequest  # the rows' sequences, this chunk's right padding, the trim (first chunk)
    at: int                   # the chunk's first token in the pass
    tokens: int               # its tokens a row
    hidden: np.ndarray | None = field(default=None, repr=False)  # its input, as the wire carries it
    code: int = 0             # that input's wire dtype


def chunks(T: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk of ``T`` tokens, ``size`` at most and as
    even as can be; one chunk when ``size`` is 0 or ``T`` fits it."""
    if size <= 0 or T <= size:
        return [(0, T)]
    k = -(-T // size)
    ends = [T * (i + 1) // k for i in range(k)]  # sizes differ by one token at most
    return list(zip([0] + ends[:-1], ends))


def chunk_size(rt: "StageRuntime", chain: list["Stage"]) -> int:
    """Tokens a row per chunk of a prompt through ``chain``: the router's
    ``prefill_chunk`` when it names one; else ``PREFILL_CHUNK`` when the
    chain's nodes are at two or more host addresses (``localhost``,
    127.0.0.1 and ::1 counting as one; names are not resolved), and none
    when they all share one. Nodes on one host share its GPU, and there
    chunks only add work: on one H200 a 512-token prompt through 2 nodes took
    147 ms whole, 148 / 158 / 177 ms in chunks of 256 / 128 / 64
    (benchmarks/README.md). On compute of their own the nodes run chunks
    side by side (2 CPUs: 529 ms whole, 286 in chunks of 128)."""
    if rt.prefill_chunk is not None:
        return rt.prefill_chunk
    hosts = {_host(split_address(rt.locate(stage.start).address)[0]) for stage in chain}
    return PREFILL_CHUNK if len(hosts) > 1 else 0


def _host(host: str) -> str:
    """``host`` as ``chunk_size`` compares it: ``localhost``, 127.0.0.1 and
    ::1 are one; any other address or name is its own."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # a name
        return "127.0.0.1" if host.lower() == "localhost" else host.lower()
    return "127.0.0.1" if ip in (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")) else str(ip)


def run_chain(rt: "StageRuntime", chain: list["Stage"], x: mx.array, caches: list) -> mx.array:
    """The output of ``chain``'s spans on ``x`` [B, T, H] (``caches``: each
    span's cache slot, None in a one-off forward). A span alone is a chain
    of one, with no chunks: they pay only where two nodes overlap."""
    B, T, H = x.shape
    keeps_kv = caches[0] is not None  # a chunk's KV is there for the next
    bounds = chunks(T, chunk_size(rt, chain) if keeps_kv and T > 1 and len(chain) > 1 else 0)
    pieces, states = [], []
    for s, (stage, cache) in enumerate(zip(chain, caches)):
        row, state = [], []
        for j, (a, b) in enumerate(bounds):
            request, state = rt.prepare(cache, B, b - a)
            row.append(_Piece(stage, s, j, request, a, b - a))
        pieces.append(row)
        states += state  # the stand-in's state after all its chunks
    hidden, code = wire.read_back([x], states)[0].reshape(x.shape), wire.wire_dtype(x.dtype)
    for piece, (a, b) in zip(pieces[0], bounds):
        piece.hidden, piece.code = hidden[:, a:b], code
    S, k = len(chain), len(bounds)
    for step in range(S + k - 1):
        work = [pieces[s][step - s] for s in range(S) if 0 <= step - s < k]
        while work:
            while rt.lost([piece.request for piece in work]):  # a rebuild may lose another node: until none is
                _detach(pieces[0])  # the rebuild reads back on this thread, over what read_back gave
                for piece in work:  # rebuilt while nothing of the pass is in flight
                    rt.restore(piece.stage, piece.request)
            now, work = _one_a_link(rt, work)
            _exchange(rt, pieces, now, B, H)
    last = [piece.hidden for piece in pieces[-1]]  # _pass_on leaves the chain's output there
    codes = {piece.code for piece in pieces[-1]}
    if len(codes) > 1:
        raise UnavailableError(f"layers {chain[-1].start}-{chain[-1].end - 1} answered a prompt's chunks in "
                               f"{len(codes)} dtypes")
    return wire.to_device(last[0] if k == 1 else np.concatenate(last, axis=1), codes.pop())


def _detach(pieces: list[_Piece]) -> None:
    """The first span's inputs as copies of their own, not views of this thread's read buffer."""
    for piece in pieces:
        if piece.hidden is not None and not piece.hidden.flags.owndata:
            piece.hidden = np.array(piece.hidden)


def _one_a_link(rt: "StageRuntime", work: list[_Piece]) -> tuple[list[_Piece], list[_Piece]]:
    """(the first piece of ``work`` for each node, the others): a node runs
    one connection's requests one by one, and writes each reply before it
    reads the next request, so a second large request sent before the
    first reply is read would block both sides (after a failover one node
    may hold two spans of a chain)."""
    now, later, seen = [], [], set()
    for piece in work:
        link = id(rt.locate(piece.stage.start))
        (later if link in seen else now).append(piece)
        seen.add(link)
    return now, later


def _exchange(rt: "StageRuntime", pieces: list[list[_Piece]], now: list[_Piece], B: int, H: int) -> None:
    """Send every piece of ``now``, then read every reply; then send again,
    one by one, each whose node failed, once its span has moved."""
    forwards = [_forward(piece) for piece in now]
    sent = [rt.submit(piece.stage, forward) for piece, forward in zip(now, forwards)]
    failed = []
    for piece, forward, (link, pending, t0) in zip(now, forwards, sent):
        reply, rtt = rt.wait(link, pending, t0)
        if reply is None:
            failed.append((piece, link))
            continue
        rt.done(piece.stage, link, pending, piece.request, reply, rtt, B, piece.tokens, piece.at)
        _pass_on(pieces, piece, reply, (B, piece.tokens, H), link)
    if failed:
        _detach(pieces[0])  # the rebuild in rt.send reads back on this thread, over what read_back gave
    for piece, link in failed:
        rt.moved(piece.stage, link)
        reply = rt.send(piece.stage, _forward(piece), piece.request, B, piece.tokens, piece.at)
        _pass_on(pieces, piece, reply, (B, piece.tokens, H), rt.locate(piece.stage.start))


def _forward(piece: _Piece):
    r = piece.request
    return stage_request_numpy(piece.stage.start, piece.hidden, piece.code, r.sequences, r.right_padding, r.trim)


def _pass_on(pieces: list[list[_Piece]], piece: _Piece, reply: pb.ForwardResponse, shape: tuple, link) -> None:
    """The reply's output as the next span's input (or, after the last span,
    in place of this piece's input: the chain's output)."""
    out = wire.decode_numpy(reply.output, "output")
    if out.shape != shape:
        raise UnavailableError(f"{link!r} answered layers {piece.stage.start}-{piece.stage.end - 1} with shape "
                               f"{list(out.shape)}, expected {list(shape)}")
    target = pieces[piece.s + 1][piece.j] if piece.s + 1 < len(pieces) else piece
    target.hidden, target.code = out, reply.output.dtype
