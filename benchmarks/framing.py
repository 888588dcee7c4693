"""What the data plane's framing costs for a prompt-sized tensor (a
512-token layer's 2 MB of bfloat16 hidden states), on this machine's CPU:
ways of sending and receiving one frame over a loopback socket pair, side by
side in alternating rounds (µs, medians). Host work only, so the CPU box
measures it too.

    python benchmarks/framing.py [--tokens 512] [--hidden 2048] [--json out.json]

send: ``ByteSize`` then the prefix and message copied into one write (the
old way), the same without ``ByteSize``, ``wire.send_frame`` (two writes
for a large frame), and a prototype for what is next: the message
serialized without the tensor's bytes, which follow straight from the numpy
array as a second occurrence of their nested field (protobuf parsers merge
the two; checked here to parse to the same message). recv: ``wire.recv_frame`` (parts joined) against one
buffer grown in place (tried; slower here: growing it copies).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time

import numpy as np

from expertmesh import wire
from expertmesh.v1 import expertmesh_pb2 as pb


def _grown(sock: socket.socket, n: int) -> bytearray:
    buf, got = bytearray(min(n, wire.RECV_CHUNK)), 0
    while True:
        with memoryview(buf) as view:
            while got < len(buf):
                got += sock.recv_into(view[got:])
        if got == n:
            return buf
        buf.extend(bytes(min(n - got, max(wire.RECV_CHUNK, got))))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def spliced(sock: socket.socket, message, path: tuple[int, ...], data) -> None:
    """``message`` (its tensor's bytes left empty), then ``data`` as the bytes
    field at ``path`` (field numbers, outermost first; the last is the bytes
    field itself), sent from ``data``'s own memory."""
    view = memoryview(data).cast("B")
    size, heads = len(view), []
    for field in reversed(path):  # length-delimited (wire type 2) headers, innermost first
        head = _varint(field << 3 | 2) + _varint(size)
        heads.insert(0, head)
        size += len(head)
    body = message.SerializeToString()
    sock.sendall(wire._LEN.pack(len(body) + size) + body + b"".join(heads))
    sock.sendall(view)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--frames", type=int, default=60, help="frames per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    values = np.random.default_rng(0).integers(0, 1 << 16, (args.tokens, args.hidden)).astype(np.uint16)
    message = pb.ForwardResponse(request_id=1)
    wire.encode_into(message.output, values, pb.BFLOAT16)
    frame = message.SerializeToString()
    a, b = socket.socketpair()
    bare = pb.ForwardResponse(request_id=1)
    bare.output.shape.extend(values.shape)
    bare.output.dtype = pb.BFLOAT16

    def splice(sock, m):  # as a node would send its output: no tobytes, no protobuf copy
        spliced(sock, bare, (2, 1), values)

    check = threading.Thread(target=splice, args=(a, message))  # a reader must drain it as it goes
    check.start()
    assert wire.recv_frame(b, pb.ForwardResponse, 1 << 28) == message
    check.join()

    def encoded():
        m = pb.ForwardResponse(request_id=1)
        wire.encode_into(m.output, values, pb.BFLOAT16)
        return m

    def concat(sock, m):
        data = m.SerializeToString()
        sock.sendall(wire._LEN.pack(len(data)) + data)

    senders = {"send_bytesize_concat": lambda s, m: (m.ByteSize(), concat(s, m)), "send_concat": concat,
               "send_frame": wire.send_frame, "send_spliced": splice}
    receivers = {"recv_frame": lambda s, n: wire.recv_exact(s, n), "recv_grown": _grown}

    def timed(fn, other) -> float:
        th = threading.Thread(target=other)
        th.start()
        ts = []
        for _ in range(args.frames):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        th.join()
        return statistics.median(ts)

    per: dict[str, list[float]] = {k: [] for k in (*senders, *receivers)}
    for _ in range(args.rounds):
        for name, send in senders.items():
            # the tensor encoded as a sender does (the spliced one leaves it out)
            per[name].append(timed(lambda: send(a, message if name == "send_spliced" else encoded()), lambda: [
                wire.recv_frame(b, pb.ForwardResponse, 1 << 28) for _ in range(args.frames)]))
        for name, recv in receivers.items():
            per[name].append(timed(lambda: pb.ForwardResponse.FromString(recv(b, len(frame))),
                                   lambda: [a.sendall(frame) for _ in range(args.frames)]))
    r = {"frame_bytes": len(frame), **{f"{k}_us": statistics.median(v) * 1e6 for k, v in per.items()}}
    for k, v in r.items():
        print(f"{k:<28} {v:10.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
