"""The router's HTTP API, driven by the official openai client."""

import http.client
import json
import os
import signal
import sys

import openai
import pexpect
import pytest

from expertmesh import Client

from conftest import running_nodes

MESSAGES = [{"role": "user", "content": "Tell me about the experts."}]


@pytest.fixture(scope="module")
def api(live_router):
    return openai.OpenAI(base_url=live_router.http.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def grpc_client(live_router):
    with Client(f"127.0.0.1:{live_router.port}") as c:
        yield c


def test_models_lists_the_checkpoint(api, live_router):
    assert [m.id for m in api.models.list()] == [live_router.checkpoint.model_id]


def test_streamed_chat_sends_the_grpc_chat_reply_with_usage(api, grpc_client):
    expected = list(grpc_client.chat(MESSAGES, max_tokens=12))
    chunks = list(api.chat.completions.create(model="any", messages=MESSAGES, max_tokens=12, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1 and "".join(content) == "".join(p.text for p in expected)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected[-1].prompt_tokens, 12)
    assert usage.total_tokens == usage.prompt_tokens + 12


def test_completion_returns_text_stop_and_usage(api, grpc_client):
    text = "".join(p.text for p in grpc_client.generate("The router looks at each token", max_tokens=16))
    whole = api.completions.create(model="any", prompt="The router looks at each token", max_tokens=16)
    assert whole.choices[0].text == text and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 16 and whole.usage.prompt_tokens > 0
    stop = text[5:8]
    cut = api.completions.create(model="any", prompt="The router looks at each token", max_tokens=16, stop=stop)
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_error_json(api, live_router):
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="any", messages=openai.NOT_GIVEN, max_tokens=4)  # no messages
    assert e.value.status_code == 400 and e.value.body["param"] == "messages"
    assert e.value.body["message"] == "messages is required"
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model="any", prompt="word " * 600, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded" and "context is 512" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="any", messages=MESSAGES, temperature=-1, stream=True)
    assert e.value.body["param"] == "temperature"
    status, body = raw_post(live_router.http.port, "/v1/chat/completions", b"{not json")
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    status, body = raw_post(live_router.http.port, "/v1/embeddings", b"{}")
    assert status == 404 and body["error"]["code"] == "not_found"


def raw_post(port, path, data):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_router_command_serves_the_api_on_http_port(tiny):
    with running_nodes(tiny, 1) as (node,):
        router = pexpect.spawn(sys.executable, ["-m", "expertmesh.cli", "router", "--model", str(tiny), "--port", "0",
                                                "--peer", node.address, "--http-port", "0", "--no-discovery"],
                               env={**os.environ, "PYTHONUNBUFFERED": "1"}, encoding="utf-8", timeout=120)
        try:
            router.expect(r"OpenAI-compatible API at (http://127\.0\.0\.1:\d+/v1)")
            api = openai.OpenAI(base_url=router.match.group(1), api_key="unused", max_retries=0, timeout=60)
            reply = api.chat.completions.create(model=tiny.name, messages=MESSAGES, max_tokens=3)
            assert reply.usage.completion_tokens == 3 and reply.choices[0].message.role == "assistant"
            router.kill(signal.SIGINT)
            router.expect(pexpect.EOF)
            router.close()
            assert router.exitstatus == 130 and "Traceback" not in router.before  # Ctrl-C: a clean stop
        finally:
            router.close(force=True)
