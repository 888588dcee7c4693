"""One HTTP client never costs another: slow-loris clients are cut off, the
connection cap answers 503 at once, bodies and generations are bounded, and a
client that leaves mid-generation (streaming or not) frees its batch slot at
once. Official ``openai`` client for the well-behaved, raw sockets for the rest."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import openai
import pytest

from expertmesh import Client
from expertmesh.router.openai import MAX_BODY_BYTES, Limits, OpenAIServer

PROMPT = "The router looks at each token"


@contextlib.contextmanager
def http_server(router, **limits):
    server = OpenAIServer(router, "127.0.0.1", 0, Limits(**limits)).start()
    try:
        yield server
    finally:
        server.stop()


def api(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=30)


def post(port: int, body: dict, headers: str = "") -> socket.socket:
    """A raw POST /v1/completions; the socket, for the test to read or drop."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n{headers}\r\n".encode() + data)
    return s


def read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(live_router) -> str:
    with Client(f"127.0.0.1:{live_router.port}") as c:
        return "".join(p.text for p in c.generate(PROMPT, max_tokens=24))


def test_slow_clients_are_cut_off_and_past_the_cap_new_ones_get_503_while_others_are_served(live_router, reference):
    with http_server(live_router, max_connections=3, read_s=1.5) as server:
        opened = {}

        def connect(name: str) -> socket.socket:
            opened[name] = time.monotonic()
            return socket.create_connection(("127.0.0.1", server.port), timeout=10)
        silent = connect("silent")
        silent.sendall(b"POST /v1/completions HTTP/1.1\r\n")  # and never the rest
        trickle = connect("trickle")
        stop = threading.Event()

        def drip():  # a header byte every 0.2 s: no single read ever times out
            try:
                trickle.sendall(b"POST /v1/completions HTTP/1.1\r\n")
                while not stop.wait(0.2):
                    trickle.sendall(b"X")
            except OSError:
                pass
        dripping = threading.Thread(target=drip)
        dripping.start()
        try:
            with api(server) as client:  # closed here, not whenever it is collected: its keep-alive
                whole = client.completions.create(model="any", prompt=PROMPT, max_tokens=24)  # holds a slot
            assert whole.choices[0].text == reference  # served beside them
            wait_for(lambda: server._httpd.slots._value == 1, 5, "the served client's slot comes back")
            idle = connect("idle")
            wait_for(lambda: server._httpd.slots._value == 0, 5, "the third connection holds the last slot")
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as fifth:
                tic = time.monotonic()
                answer = read_all(fifth)
                busy_s = time.monotonic() - tic
            assert answer.startswith(b"HTTP/1.0 503") and b"3 HTTP connections open" in answer
            assert busy_s < 1.0  # at once, not after anyone's timeout
            for name, sock in (("silent", silent), ("trickle", trickle), ("idle", idle)):
                with contextlib.suppress(ConnectionResetError):
                    read_all(sock)  # returns once the server shut it (else the 10 s socket timeout fails)
                cut = time.monotonic() - opened[name]
                print(f"\n{name} client cut off after {cut:.2f}s (read limit 1.5s)", end="")
                assert cut < 1.5 + 1.0
            print(f"; 503 past the cap in {busy_s * 1e3:.0f} ms")
        finally:
            stop.set()
            dripping.join()
            for sock in (silent, trickle):
                sock.close()
        wait_for(lambda: server._httpd.slots._value == 3, 5, "their slots come back")
        assert api(server).completions.create(model="any", prompt=PROMPT, max_tokens=24).choices[0].text == reference


def test_bodies_past_the_limit_are_refused_unread_and_long_generations_end_at_the_time_limit(live_router):
    scheduler = live_router.engine.scheduler
    with http_server(live_router, request_s=0.5) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(f"POST /v1/completions HTTP/1.1\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode())
            answer = read_all(s)  # without sending a byte of the body
        assert answer.startswith(b"HTTP/1.0 413") and f"at most {MAX_BODY_BYTES}".encode() in answer
        tic = time.monotonic()
        with pytest.raises(openai.InternalServerError) as e:
            api(server).completions.create(model="any", prompt=PROMPT, max_tokens=400)
        assert e.value.status_code == 504 and "ran past the router's limit of 0.5s" in e.value.message
        assert time.monotonic() - tic < 3
        scheduler.kv_cache_bytes(timeout=2)  # the loop gave the worker back: no sequence left


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_mid_generation_frees_its_slot_and_costs_others_nothing(live_router, reference,
                                                                                    stream):
    scheduler = live_router.engine.scheduler
    with http_server(live_router) as server:
        others: list[str] = []
        steps = scheduler.steps
        leaver = post(server.port, {"prompt": "Once upon a time", "max_tokens": 400, "stream": stream})
        wait_for(lambda: scheduler.steps >= steps + 5, 30, "the generation runs")
        other = threading.Thread(target=lambda: others.append(
            api(server).completions.create(model="any", prompt=PROMPT, max_tokens=24).choices[0].text))
        other.start()
        leaver.close()  # mid-generation: 400 tokens take seconds
        left_at = scheduler.steps
        other.join(timeout=60)
        tic = time.monotonic()
        scheduler.kv_cache_bytes(timeout=2)  # returns once no sequence is active: the leaver's slot is free
        print(f"\nstream={stream}: {scheduler.steps - left_at} steps after the client left; "
              f"idle {(time.monotonic() - tic) * 1e3:.0f} ms later")
        assert scheduler.steps - left_at < 60  # the other's 24 and a few: not the 395 left of its 400 tokens
        assert others == [reference]
