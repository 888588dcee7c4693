"""What the data plane's framing costs for a prompt-sized tensor (a
512-token layer's 2 MB of bfloat16 hidden states), on this machine's CPU:
ways of sending and receiving one frame over a loopback socket pair, side by
side in alternating rounds (µs, medians). Host work only, so the CPU box
measures it too.

    python benchmarks/framing.py [--tokens 512] [--hidden 2048] [--json out.json]

send, each frame built as the hot path builds it and then sent: a node's
answer with ``ByteSize`` and the prefix and message copied into one write
(session 5's way), the same without ``ByteSize``; then a node's answer and
the router's expert request, each ``whole`` (the tensor's bytes copied into
the message, serialized, ``wire.send_frame``: session 6's way) and
``framed`` (``wire.Framed``: the message serialized without the tensor's
bytes, which follow from the array's own memory as a second occurrence of
their nested field; checked here to parse to the same message).
recv: ``wire.recv_frame`` (parts joined) against one buffer grown in place
(tried; slower here: growing it copies).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--frames", type=int, default=60, help="frames per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    import mlx.core as mx

    from expertmesh.router.link import expert_request

    T, H, k = args.tokens, args.hidden, 8
    rng = np.random.default_rng(0)
    values = rng.integers(0, 1 << 16, (T, H)).astype(np.uint16)  # bfloat16 bits
    ids = rng.integers(0, 64, (T, k)).astype(np.int32)
    weights = np.full((T, k), 1.0 / k, np.float32)
    output = mx.array(values).view(mx.bfloat16)  # a node's answer, as its expert step leaves it
    mx.eval(output)
    message = pb.ForwardResponse(request_id=1)
    wire.encode_into(message.output, values, pb.BFLOAT16)
    frame = message.SerializeToString()
    a, b = socket.socketpair()

    def concat(sock, m):
        data = m.SerializeToString()
        sock.sendall(wire._LEN.pack(len(data)) + data)

    # each sender builds its frame as the hot path does, then sends it: the
    # router's expert request (hidden from the read-back numpy) and a node's
    # answer (from its output array), whole (tensor bytes copied into the
    # message, as before) and framed (wire.Framed: sent from the array's memory)
    def request(framed: bool):
        req = expert_request(0, values, pb.BFLOAT16, ids, weights)
        return req if framed else wire.materialized(req)

    def reply(framed: bool):
        if framed:
            return wire.framed_tensor(pb.ForwardResponse(request_id=1), ("output",), wire.to_numpy(output),
                                      pb.BFLOAT16)
        return pb.ForwardResponse(request_id=1, output=wire.encode(output))

    senders = {"send_bytesize_concat": (lambda: reply(False), lambda s, m: (m.ByteSize(), concat(s, m))),
               "send_concat": (lambda: reply(False), concat),
               "reply_whole": (lambda: reply(False), wire.send_frame),
               "reply_framed": (lambda: reply(True), wire.send_frame),
               "request_whole": (lambda: request(False), wire.send_frame),
               "request_framed": (lambda: request(True), wire.send_frame)}
    receivers = {"recv_frame": lambda s, n: wire.recv_exact(s, n), "recv_grown": _grown}
    for framed in (False, True):  # both forms parse to the same message
        for build, cls in ((request, pb.ForwardRequest), (reply, pb.ForwardResponse)):
            sent = build(framed)
            check = threading.Thread(target=wire.send_frame, args=(a, sent))
            check.start()
            got = wire.recv_frame(b, cls, 1 << 28)
            check.join()
            assert got == wire.materialized(sent)

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

    def drain(cls):
        return lambda: [wire.recv_frame(b, cls, 1 << 28) for _ in range(args.frames)]

    per: dict[str, list[float]] = {k: [] for k in (*senders, *receivers)}
    for _ in range(args.rounds):
        for name, (build, send) in senders.items():
            cls = pb.ForwardRequest if name.startswith("request") else pb.ForwardResponse
            per[name].append(timed(lambda: send(a, build()), drain(cls)))
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
