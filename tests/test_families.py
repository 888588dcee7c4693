"""Every family, in every checkpoint layout and every ``--mode``, through a
mesh of ``expertmesh node`` processes and an ``expertmesh router`` process,
started as a user starts them: greedy tokens identical to mlx-lm's.

Each checkpoint is written once, its nodes started once, and the three
routers (one per mode; ``auto`` is the default, so it runs without
``--mode``) run against them one after the other, each stopped before the
next. Meshes of 2 and of 3 nodes alternate across families and layouts, so
every family, every layout and every mode meets both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import make_prompt_cache

from expertmesh import Client
from expertmesh.testing.process import Process
from expertmesh.testing.tinymodel import CORPUS, DEFAULT_CONFIGS, write_tiny_model

from test_models import variants

FAMILIES = list(DEFAULT_CONFIGS)
MODES = ("expert", "pipeline", "auto")
PROMPT = "Once upon a time there was a little model"
LONG_TOKENS = 300  # a long prompt's prefill: spans and experts see hundreds of rows at once
MAX_TOKENS, LONG_MAX_TOKENS = 64, 16
MIN_DISTINCT = 20  # of the 64 greedy tokens: the fixtures must not be near-constant
# mlx-lm's top-two logit gap at every greedy step, relative to the top logit: the
# mesh's reordered float sums move logits by about 1e-6 of their scale, so
# tokens compare one for one (test_models.py bounds the float32 logits)
MIN_MARGIN = 1e-4


def layouts(i: int) -> dict[str, dict]:
    """HF float32 and MLX 4- and 8-bit (group sizes 64 and 32 crossed across
    families, as in test_models.py)."""
    return {k: kw for k, kw in variants(i).items() if k.startswith(("hf-", "mlx-4bit", "mlx-8bit"))}


CASES = [(family, name, kw, 2 + (i + j) % 2)
         for i, family in enumerate(FAMILIES) for j, (name, kw) in enumerate(layouts(i).items())]


def test_cases_cover_every_family_layout_and_mode_on_2_and_3_nodes():
    for key in (lambda c: c[0], lambda c: c[1][:8]):  # each family, and each layout, meets both mesh sizes
        groups: dict[str, set] = {}  # (and every mode runs on every mesh)
        for case in CASES:
            groups.setdefault(key(case), set()).add(case[3])
        assert all(sizes == {2, 3} for sizes in groups.values()), groups
    assert {c[0] for c in CASES} == set(FAMILIES)
    assert {c[1][:8] for c in CASES} == {"hf-f32", "mlx-4bit", "mlx-8bit"}


@dataclass
class Reference:
    """mlx-lm's greedy run of a checkpoint."""

    tokens: list[int]       # for PROMPT
    long_prompt: str        # LONG_TOKENS tokens
    long_tokens: list[int]  # for long_prompt
    margins: list[float]    # top-two gap over top logit at each step for PROMPT


def long_prompt(tok) -> str:
    text = " ".join(CORPUS)
    ids = (tok.encode(text) + tok.encode(" " + text))[:LONG_TOKENS]
    text = tok.decode(ids)
    while len(tok.encode(text)) > LONG_TOKENS:  # the cut may merge differently on the way back
        text = text[:-1]
    return text


def greedy_margins(model, tok, prompt: str, steps: int) -> tuple[list[int], list[float]]:
    cache, x, tokens, margins = make_prompt_cache(model), mx.array([tok.encode(prompt)]), [], []
    for _ in range(steps):
        logits = model(x, cache=cache)[0, -1]
        top2 = mx.sort(logits)[-2:]
        margins.append(((top2[1] - top2[0]) / mx.abs(top2[1])).item())
        tokens.append(mx.argmax(logits).item())
        x = mx.array([[tokens[-1]]])
    return tokens, margins


def reference(path: Path) -> Reference:
    model, tok = load(str(path))
    tokens = [r.token for r in stream_generate(model, tok, PROMPT, max_tokens=MAX_TOKENS)]
    stepped, margins = greedy_margins(model, tok, PROMPT, MAX_TOKENS)
    assert stepped == tokens
    text = long_prompt(tok)
    assert len(tok.encode(text)) >= LONG_TOKENS - 2
    long = [r.token for r in stream_generate(model, tok, text, max_tokens=LONG_MAX_TOKENS)]
    return Reference(tokens, text, long, margins)


@dataclass
class Mesh:
    family: str
    path: Path
    reference: Reference
    nodes: list[str]
    logs: Path
    name: str


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{n}-{k}nodes" for f, n, _, k in CASES])
def mesh(request, tmp_path_factory):
    """One checkpoint (written once) and its node processes (started once),
    shared by the modes' routers."""
    family, name, kw, count = request.param
    root = tmp_path_factory.mktemp(f"{family}-{name}")
    path = write_tiny_model(root / "model", model_type=family, seed=1, **kw)
    ref = reference(path)
    nodes = [Process(["node", "--model", str(path), "--port", "0", "--name", f"n{i}", "--memory-gb", "1",
                      "--no-discovery"], root / f"node{i}.log") for i in range(count)]
    try:
        yield Mesh(family, path, ref, [p.address(timeout=120) for p in nodes], root, f"{family} {name} on {count} nodes")
    finally:
        for p in nodes:
            p.stop()


@pytest.mark.parametrize("mode", MODES)
def test_greedy_tokens_match_mlx_lm_through_node_and_router_processes(mesh, mode):
    ref = mesh.reference
    assert len(set(ref.tokens)) >= MIN_DISTINCT, f"{mesh.name}: near-constant fixture {ref.tokens}"
    assert min(ref.margins) > MIN_MARGIN, f"{mesh.name}: a near-tie in mlx-lm's own greedy run"
    peers = [a for node in mesh.nodes for a in ("--peer", node)]
    flags = [] if mode == "auto" else ["--mode", mode]  # auto: the default, as a user starts it
    router = Process(["router", "--model", str(mesh.path), "--port", "0", "--no-discovery", *peers, *flags],
                     mesh.logs / f"router-{mode}.log")
    try:
        with Client(router.address(timeout=120)) as client:
            got = [p.token for p in client.generate(PROMPT, max_tokens=MAX_TOKENS)]
            long = [p.token for p in client.generate(ref.long_prompt, max_tokens=LONG_MAX_TOKENS)]
            nodes = client.cluster().nodes
    finally:
        router.stop()
    assert router.proc.returncode == 130, \
        f"the router stops cleanly (and lets its nodes go) on SIGTERM; its log ends:\n{router.tail()}"
    assert got == ref.tokens, f"{mesh.name}, --mode {mode}"
    assert long == ref.long_tokens, f"{mesh.name}, --mode {mode}, {LONG_TOKENS}-token prompt"
    assert len(nodes) == len(mesh.nodes)
    if mode == "expert":
        assert all(any(n.experts.values()) and not n.stages for n in nodes), "every node holds experts"
    elif mode == "pipeline":
        spans = sorted(tuple(s) for n in nodes for s in n.stages)
        layers = DEFAULT_CONFIGS[mesh.family]["num_hidden_layers"]
        assert [a for a, _ in spans] == [0, *(b for _, b in spans[:-1])] and spans[-1][1] == layers, spans
        assert not any(any(n.experts.values()) for n in nodes)
