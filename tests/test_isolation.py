"""One request's failure costs no other request anything, and the router
batches as many streams as it says, queueing a bounded number more."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import time

import pytest
from mlx_lm import load
from mlx_lm.generate import stream_generate

from expertmesh import Client, ExpertmeshError, InvalidRequestError, OverloadedError
from expertmesh.router import batching

from conftest import in_threads, running_nodes, running_router

PROMPTS = ["Once upon a time", "Hello! How are you", "The router looks at each token", "Numbers like 1, 2",
           "Alice and Bob", "A mixture of experts", "The quick brown fox", "What would you like"]
TOKENS = 40


@pytest.fixture(scope="module")
def expected(tiny):
    model, tok = load(str(tiny))
    return {p: [r.token for r in stream_generate(model, tok, p, max_tokens=TOKENS)] for p in PROMPTS}


@pytest.fixture(scope="module")
def mesh(tiny):
    with running_nodes(tiny, 2) as nodes, running_router(tiny, [n.address for n in nodes], http_port=0) as router:
        yield router


def _eventually(condition, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _with_poison(router, expected, poison) -> None:
    """8 streams run; once each has its first token, ``poison()`` runs (and
    must fail alone); every stream then ends with its single-request output."""
    started = threading.Barrier(len(PROMPTS) + 1)
    finished = []

    def one(i):
        with Client(f"127.0.0.1:{router.port}") as c:
            tokens = []
            for piece in c.generate(PROMPTS[i], max_tokens=TOKENS):
                tokens.append(piece.token)
                if len(tokens) == 1:
                    started.wait(timeout=120)
            finished.append(i)
            return tokens

    with in_threads(one, len(PROMPTS), timeout=300) as runs:
        started.wait(timeout=120)
        poison()
        assert len(finished) < len(PROMPTS)  # the poison failed while the batch was still generating
    assert {PROMPTS[i]: r.result() for i, r in enumerate(runs)} == expected


def test_template_kwargs_that_untokenize_the_chat_fail_that_chat_alone(mesh, expected):
    def poison():
        with Client(f"127.0.0.1:{mesh.port}") as c:
            with pytest.raises(InvalidRequestError, match="tokenize"):
                list(c.chat([{"role": "user", "content": "hi"}], max_tokens=8,
                            chat_template_kwargs={"tokenize": False}))

    _with_poison(mesh, expected, poison)


def test_a_sampler_that_raises_mid_generation_fails_its_request_alone(mesh, expected, monkeypatch):
    real = batching.make_sampler

    def make_sampler(**kw):  # requests with top_k=3 get a sampler that breaks on its third token
        sampler, calls = real(**kw), []
        if kw.get("top_k") != 3:
            return sampler

        def sample(logprobs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("the sampler broke")
            return sampler(logprobs)
        return sample

    monkeypatch.setattr(batching, "make_sampler", make_sampler)

    def poison():
        with Client(f"127.0.0.1:{mesh.port}") as c:
            pieces = []
            with pytest.raises(ExpertmeshError, match="the sampler broke"):
                for piece in c.generate("Hello", max_tokens=30, temperature=0.5, top_k=3, seed=1):
                    pieces.append(piece)
            assert pieces  # it had begun: the tokens before the failure reached it

    _with_poison(mesh, expected, poison)


def test_stop_strings_that_raise_while_decoding_fail_their_request_alone(mesh, expected, monkeypatch):
    class Breaking(batching.StopStrings):
        def __init__(self, tokenizer, stop):
            super().__init__(tokenizer, stop)
            self.poisoned = "POISON" in stop

        def feed(self, token, text, finish_reason):
            if self.poisoned:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a detokenizer met a bad byte")
            return super().feed(token, text, finish_reason)

    monkeypatch.setattr(batching, "StopStrings", Breaking)

    def poison():
        with Client(f"127.0.0.1:{mesh.port}") as c:
            with pytest.raises(InvalidRequestError, match="bad byte"):
                list(c.generate("Hello", max_tokens=30, stop=["POISON"]))

    _with_poison(mesh, expected, poison)


def test_a_stop_string_that_is_not_text_is_refused_over_http_and_costs_no_one(mesh, expected):
    def poison():
        body = ('{"model": "m", "prompt": "Hello", "max_tokens": 8, "stop": ["\\ud800"]}').encode()
        req = urllib.request.Request(f"http://127.0.0.1:{mesh.http.port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code == 400
        assert "stop" in json.loads(err.value.read())["error"]["message"]

    _with_poison(mesh, expected, poison)


def test_32_streams_decode_as_one_batch_with_their_single_request_outputs(tiny, expected):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
    with running_nodes(tiny, 2) as nodes, running_router(tiny, [n.address for n in nodes]) as router:
        start = threading.Barrier(len(prompts))

        def one(i):
            with Client(f"127.0.0.1:{router.port}") as c:
                start.wait(timeout=120)
                return [p.token for p in c.generate(prompts[i], max_tokens=TOKENS)]

        with in_threads(one, len(prompts), timeout=600) as runs:
            pass
        peak = router.engine.scheduler.peak_batch
    assert peak == 32
    assert [r.result() for r in runs] == [expected[p] for p in prompts]


def test_streams_beyond_the_batch_wait_and_beyond_the_queue_are_refused(tiny):
    with running_nodes(tiny, 1) as nodes, \
            running_router(tiny, [n.address for n in nodes], max_batch=2, max_waiting=1) as router:
        with Client(f"127.0.0.1:{router.port}") as c:
            running = [c.generate(p, max_tokens=400) for p in PROMPTS[:2]]
            for stream in running:
                next(stream)  # both run
            waiting = c.generate(PROMPTS[2], max_tokens=4)
            got = []
            waiter = threading.Thread(target=lambda: got.extend(p.token for p in waiting))
            waiter.start()
            scheduler = router.engine.scheduler
            assert _eventually(lambda: len(scheduler._incoming) == 1)  # the third waits in the queue
            assert not got
            with pytest.raises(OverloadedError, match="at capacity: 2 generations running and 1 waiting"):
                list(c.generate(PROMPTS[3], max_tokens=4))
            for stream in running:
                stream.close()  # their slots free up: the waiting one runs
            waiter.join(timeout=120)
            assert len(got) == 4
            assert len(list(c.generate(PROMPTS[3], max_tokens=4))) == 4


def test_chat_without_a_chat_template_uses_mlx_lm_servers_plain_prompt(tmp_path, tiny):
    """mlx-lm's server renders such a conversation with its own ``convert_chat``;
    Chat and /v1/chat/completions do the same."""
    import shutil

    from mlx_lm.server import convert_chat

    model_dir = tmp_path / "no-template"
    shutil.copytree(tiny, model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}]
    model, tok = load(str(model_dir))
    assert not tok.has_chat_template
    expected = [r.text for r in stream_generate(model, tok, tok.encode(convert_chat(messages)), max_tokens=12)]
    with running_nodes(model_dir, 1) as nodes, \
            running_router(model_dir, [n.address for n in nodes], http_port=0) as router:
        with Client(f"127.0.0.1:{router.port}") as c:
            assert [p.text for p in c.chat(messages, max_tokens=12)] == expected
        body = json.dumps({"model": "m", "messages": messages, "max_tokens": 12}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{router.http.port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.loads(r.read())
    assert reply["choices"][0]["message"]["content"] == "".join(expected)


def test_over_http_a_router_at_capacity_answers_429(tiny):
    with running_nodes(tiny, 1) as nodes, \
            running_router(tiny, [n.address for n in nodes], max_batch=1, max_waiting=0, http_port=0) as router:
        with Client(f"127.0.0.1:{router.port}") as c:
            running = c.generate(PROMPTS[0], max_tokens=400)
            next(running)
            body = json.dumps({"model": "m", "prompt": "Hello", "max_tokens": 4}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{router.http.port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=60)
            running.close()
    assert err.value.code == 429 and "at capacity" in json.loads(err.value.read())["error"]["message"]
