"""Chat and sampling through the mesh do what mlx-lm does in one process."""

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from expertmesh import Client, GenerationOptions, InvalidRequestError
from expertmesh.testing.tinymodel import write_tiny_model

from conftest import running_nodes, running_router

CONVERSATION = [{"role": "system", "content": "You are a tiny model."},
                {"role": "user", "content": "Tell me about the experts."}]
PROMPT = "The router looks at each token"  # the tiny model continues it with varied tokens


@pytest.fixture(scope="module")
def reference(tiny):
    return load(str(tiny))


@pytest.fixture(scope="module")
def client(live_router):
    with Client(f"127.0.0.1:{live_router.port}") as c:
        yield c


@pytest.fixture(scope="module")
def soft(tmp_path_factory):
    """A client and mlx-lm on a checkpoint whose logits are a few nats apart,
    as a real model's: every sampling setting then changes what is drawn (the
    default tiny model's are hundreds apart, so top_p and min_p keep one token)."""
    path = write_tiny_model(tmp_path_factory.mktemp("soft") / "model", seed=1, logit_std=10.0)
    with running_nodes(path, 2) as nodes, running_router(path, [n.address for n in nodes]) as router:
        with Client(f"127.0.0.1:{router.port}") as c:
            yield c, load(str(path))


def mlx_lm_pieces(reference, prompt, max_tokens, seed=None, **kw):
    model, tok = reference
    if seed is not None:
        mx.random.seed(seed)
    return [(r.token, r.text) for r in stream_generate(model, tok, prompt, max_tokens=max_tokens, **kw)]


def templated(reference, messages):
    return reference[1].apply_chat_template(messages, add_generation_prompt=True)


def test_greedy_chat_equals_mlx_lm_on_the_templated_prompt(client, reference):
    expected = mlx_lm_pieces(reference, templated(reference, CONVERSATION), 24)
    pieces = list(client.chat(CONVERSATION, max_tokens=24))
    assert [(p.token, p.text) for p in pieces] == expected
    assert pieces[-1].prompt_tokens == len(templated(reference, CONVERSATION))
    assert pieces[-1].finish_reason == "length"


def test_stop_strings_cut_the_text_before_them(client):
    full = [p.text for p in client.generate(PROMPT, max_tokens=32)]
    text = "".join(full)
    at_token = next(t for t in full[6:] if t and text.count(t) == 1)   # a whole token's text
    across = text[len("".join(full[:8])) - 2:][:4]                       # straddles two tokens
    for stop in (at_token, across):
        pieces = list(client.generate(PROMPT, max_tokens=32, stop=["never appears", stop]))
        assert "".join(p.text for p in pieces) == text[:text.index(stop)], stop
        assert pieces[-1].finish_reason == "stop"
        assert len(pieces) < 32


def test_seeded_sampling_is_reproducible_and_matches_mlx_lm(soft):
    client, reference = soft
    options = GenerationOptions(max_tokens=24, temperature=1.0, top_p=0.99, top_k=50, min_p=0.001, seed=7)
    first = [p.token for p in client.generate(PROMPT, options)]
    assert [p.token for p in client.generate(PROMPT, options)] == first
    sampler = make_sampler(1.0, top_p=0.99, min_p=0.001, top_k=50)
    assert [t for t, _ in mlx_lm_pieces(reference, PROMPT, 24, seed=7, sampler=sampler)] == first
    assert [p.token for p in client.generate(PROMPT, options.replace(seed=8))] != first


def test_repetition_penalty_changes_output_as_mlx_lm_does(client, reference):
    prompt = templated(reference, CONVERSATION)
    plain = [p.token for p in client.chat(CONVERSATION, max_tokens=24)]
    # the tiny model's text seldom repeats itself within 16 tokens: the penalty
    # reaches back over the whole templated prompt, which the text would repeat
    penalized = [p.token for p in client.chat(CONVERSATION, max_tokens=24, repetition_penalty=1.5,
                                              repetition_context_size=64)]
    processors = make_logits_processors(repetition_penalty=1.5, repetition_context_size=64)
    assert [t for t, _ in mlx_lm_pieces(reference, prompt, 24, logits_processors=processors)] == penalized
    assert penalized != plain


def test_bad_requests_name_the_field_at_fault(client):
    with pytest.raises(InvalidRequestError) as e:
        client.generate(PROMPT, top_p=1.5)
    assert e.value.param == "top_p"
    with pytest.raises(InvalidRequestError, match="messages must not be empty"):
        list(client.chat([]))
    with pytest.raises(InvalidRequestError, match="the model's context is 512"):
        list(client.chat([{"role": "user", "content": "word " * 600}]))
