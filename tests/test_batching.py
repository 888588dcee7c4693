"""Concurrent requests share forward passes and still get their own output."""

import gc
import threading

import pytest

from mlx_lm import load
from mlx_lm.generate import stream_generate

from expertmesh import Client

from conftest import in_threads, running_nodes, running_router

PROMPTS = ["Once upon a time", "Hello! How are you", "The router looks at each token", "Numbers like 1, 2"]


def test_concurrent_streams_share_steps_and_match_single_requests(tiny):
    model, tok = load(str(tiny))
    expected = [[r.token for r in stream_generate(model, tok, p, max_tokens=24)] for p in PROMPTS]
    with running_nodes(tiny, 2) as nodes, running_router(tiny, [n.address for n in nodes]) as router:
        start = threading.Barrier(len(PROMPTS))

        def one(i):
            with Client(f"127.0.0.1:{router.port}") as c:
                start.wait()
                return [p.token for p in c.generate(PROMPTS[i], max_tokens=24)]

        with in_threads(one, len(PROMPTS), timeout=300) as runs:
            pass
        steps = router.engine.scheduler.steps
    assert [r.result() for r in runs] == expected
    assert steps < sum(len(e) for e in expected)  # streams were batched together


@pytest.mark.parametrize("leave", ["close", "drop"])
def test_a_cancelled_stream_frees_its_kv_cache_and_the_node_stops_seeing_it(tiny, leave):
    with running_nodes(tiny, 1) as nodes, running_router(tiny, [n.address for n in nodes]) as router:
        scheduler, stats = router.engine.scheduler, nodes[0].core.stats
        with Client(f"127.0.0.1:{router.port}") as c:
            stream = c.generate("Once upon a time", max_tokens=400)
            next(stream)
            if leave == "close":
                stream.close()  # the client walks away
            else:  # or drops the stream half read: that ends it at once, not at some garbage collection
                gc.disable()
                try:
                    del stream
                    assert scheduler.kv_cache_bytes() == 0
                finally:
                    gc.enable()
            assert scheduler.kv_cache_bytes() == 0  # once the router's loop has nothing left to run
            rows = [stats.forward_tokens]
            for _ in range(2):
                pieces = list(c.generate("Hello", max_tokens=8))
                rows.append(stats.forward_tokens)
        assert len(pieces) == 8
        assert scheduler.steps < 100  # the abandoned request did not run to 400
        # after the cancel, a request costs the node the same rows alone as after another request:
        # the abandoned sequence sends nothing any more
        assert rows[1] - rows[0] == rows[2] - rows[1] > 0
