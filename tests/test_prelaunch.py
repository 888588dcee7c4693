"""A stage node's next decode step set running behind a gate before its
request comes (``nodes/prelaunch.py``; on MLX's CUDA backend). Here its
emulation (``EXPERTMESH_PINNED=emulate``) holds the span's side to what the
GPU path needs: a step that is let go, or whose gate gave up, leaves the
caches as if it never ran, and the tokens stay mlx-lm's."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np

import pytest

from expertmesh import Client, hostcopy
from expertmesh.builtin import model_dir
from expertmesh.nodes import prelaunch
from expertmesh.nodes import span as spans

from conftest import running_nodes, running_router
from test_builtin import PROMPTS, not_greedy, reference  # noqa: F401 (a fixture)

TOKENS = 24
LONG = PROMPTS[0] * 18  # ~250 tokens


@pytest.fixture
def emulated(monkeypatch):
    """Host copies and gates emulated for one test, decided again after it."""
    monkeypatch.setenv(hostcopy.ENV, "emulate")
    hostcopy._reset()
    yield
    hostcopy._reset()  # the environment is put back after this: the next use decides from it


@pytest.fixture
def counted(monkeypatch, emulated):
    """What the nodes' spans did with their steps set running: set running,
    answered through the gate, given up by it, let go unused."""
    seen = {"set running": 0, "answered": 0, "gave up": 0, "let go": 0}
    prelaunch_, launched, cancel = spans._Span._prelaunch, spans._Span._launched, spans._Span._cancel

    def counted_prelaunch(self, *args):
        seen["set running"] += 1
        if seen["set running"] % 4 == 0:  # every 4th gate gives up before its request comes
            prelaunch.Gate.give_up = True
        return prelaunch_(self, *args)

    def counted_launched(self, nxt, hidden):
        out = launched(self, nxt, hidden)
        seen["answered" if out is not None else "gave up"] += 1
        return out

    def counted_cancel(self):
        seen["let go"] += self._next is not None and self._next.step > 0
        return cancel(self)

    monkeypatch.setattr(spans._Span, "_prelaunch", counted_prelaunch)
    monkeypatch.setattr(spans._Span, "_launched", counted_launched)
    monkeypatch.setattr(spans._Span, "_cancel", counted_cancel)
    yield seen


def generations(model, prelaunch: bool) -> tuple[list[list[int]], dict]:
    """A long prompt alone (its decode crosses the KV cache's 256-position
    growth), then three prompts at once (rows join and leave the batch, so a
    step set running is let go), through 2 stage nodes; the tokens, and the
    steps set running as the nodes' stats count them."""
    with running_nodes(model, 2, prelaunch=prelaunch) as nodes, \
            running_router(model, [n.address for n in nodes], mode="pipeline") as router, \
            Client(f"127.0.0.1:{router.port}") as client:
        def stream(prompt):
            return [x.token for x in client.generate(prompt, max_tokens=TOKENS)]

        alone = stream(LONG)
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(stream, PROMPTS[1:4]))
        assert all(n.stages.wait_sequences(lambda s: not s, timeout=30) for n in nodes)
        stats = [n.core.snapshot()[0] for n in nodes]
    reported = {"answered": sum(s.prelaunch_answered for s in stats), "gave up": sum(s.prelaunch_gave_up for s in stats),
                "let go": sum(s.prelaunch_let_go for s in stats)}
    return [alone, *together], reported


def test_steps_given_up_or_let_go_leave_the_tokens_of_steps_never_set_running(reference, counted):
    model = model_dir()
    got, reported = generations(model, prelaunch=True)
    forced = counted["set running"] // 4
    # the same tokens, bit for bit, as steps only built ahead; those set no step running
    assert generations(model, prelaunch=False) == (got, {"answered": 0, "gave up": 0, "let go": 0})
    assert reported == {k: counted[k] for k in reported}  # GetStats and /metrics say what the spans did
    assert len(reference[1].encode(LONG)) + TOKENS > 256
    for prompt, tokens in zip([LONG, *PROMPTS[1:4]], got):
        assert len(tokens) == TOKENS and not_greedy(reference, prompt, tokens) == [], prompt
    # one row's steps go through the gates (batched ones are only built ahead): both nodes answered most of
    # the lone stream's decode steps there; every 4th gate gave up, or its step was let go
    assert counted["answered"] >= TOKENS
    assert 3 <= counted["gave up"] <= forced and counted["let go"] >= 1, counted


def _step(gate: prelaunch.Gate, *, launch_s: float = 0.0, give_up: bool = False) -> bool:
    """One step through ``gate`` (emulated): set running in ``launch_s``, then opened with its input."""
    prelaunch.Gate.give_up = give_up
    step, _ = gate.open_input(4)
    gate.launched(launch_s)
    gate.open(step, np.arange(4, dtype=np.uint32))
    return gate.went(step)


def test_a_first_step_that_is_slow_to_set_running_and_gives_up_does_not_end_setting_steps_running(emulated):
    # on the H200 a span's first step set running compiles the gate's kernel (a slow launch) and waits while
    # the router compiles its own first decode step (a give-up): session 12 stopped every span right there
    gate = prelaunch.Gate()
    assert not _step(gate, launch_s=2 * prelaunch.SLOW_LAUNCH_S, give_up=True)
    assert _step(gate, launch_s=2 * prelaunch.SLOW_LAUNCH_S)  # answered, but slow: a second miss
    assert _step(gate) and gate.usable  # answered and quick: the count starts again
    assert not _step(gate, give_up=True)
    assert _step(gate, launch_s=1.0)
    assert gate.usable
    assert not _step(gate, give_up=True)  # the third miss in a row
    assert not gate.usable
    assert (gate.counts.answered, gate.counts.gave_up) == (3, 3)
