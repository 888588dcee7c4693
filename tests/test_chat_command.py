"""``expertmesh chat`` in a pseudo-terminal, as a person uses it."""

import os
import re
import sys

import pexpect
import pytest

from expertmesh import Client

from conftest import cli
from test_cli import one_line_error

STATS = re.compile(r"\[(\d+) tokens, [\d.]+ tok/s, prompt (\d+) tokens\]")


def spawn_chat(router, max_tokens: int) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "expertmesh.cli", "chat", "--router", f"127.0.0.1:{router.port}",
                                           "--max-tokens", str(max_tokens)],
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb"}, encoding="utf-8", timeout=60)
    child.expect(f"chatting with {router.checkpoint.model_id}")
    return child


@pytest.fixture
def chat(live_router):
    child = spawn_chat(live_router, max_tokens=6)
    yield child
    child.close(force=True)


def say(child, line: str) -> tuple[int, int]:
    """Send one user turn; return (tokens generated, prompt tokens) from the stats line."""
    child.expect_exact(">>> ")
    child.sendline(line)
    child.expect(STATS)
    return int(child.match.group(1)), int(child.match.group(2))


def test_chat_streams_replies_shows_speed_and_keeps_the_history(chat, live_router):
    tokenizer = live_router.tokenizer
    first = [{"role": "user", "content": "Hello"}]
    with Client(f"127.0.0.1:{live_router.port}") as client:
        reply = "".join(p.text for p in client.chat(first, max_tokens=6))
    assert say(chat, "Hello") == (6, len(tokenizer.apply_chat_template(first, add_generation_prompt=True)))
    assert reply and reply in chat.before
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    assert say(chat, "And then?") == (6, len(tokenizer.apply_chat_template(second, add_generation_prompt=True)))
    chat.expect_exact(">>> ")
    chat.sendline("/reset")
    chat.expect_exact("[conversation cleared]")
    assert say(chat, "Hello")[1] == len(tokenizer.apply_chat_template(first, add_generation_prompt=True))
    chat.expect_exact(">>> ")
    chat.sendeof()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_ctrl_c_stops_a_reply_and_quit_leaves_cleanly(live_router):
    with Client(f"127.0.0.1:{live_router.port}") as client:
        start = "".join(p.text for p in client.chat([{"role": "user", "content": "Hello"}], max_tokens=2))
    child = spawn_chat(live_router, max_tokens=400)  # the tiny model does not stop by itself
    try:
        child.expect_exact(">>> ")
        child.sendline("Hello")
        child.expect_exact(start)  # the reply has begun
        child.sendintr()
        child.expect_exact("[interrupted]")
        child.expect_exact(">>> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0 and "Traceback" not in child.before
    finally:
        child.close(force=True)


def test_chat_without_a_router_is_one_line():
    out = cli("chat", "--router", "127.0.0.1:1")
    assert "cannot reach router 127.0.0.1:1" in one_line_error(out, "chat")
