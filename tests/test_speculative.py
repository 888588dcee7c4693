"""Speculative decoding through the mesh: a draft model on the router proposes
tokens, one forward pass through the nodes checks them; greedy output stays
mlx-lm's, with fewer round trips per token when the draft guesses well."""


import mlx.core as mx
import pytest

from expertmesh import Client, InvalidRequestError, ModelError, wire
from expertmesh.router import Router, RouterConfig
from expertmesh.serving import channel
from expertmesh.testing.tinymodel import write_tiny_model
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from conftest import cli, in_threads, running_nodes, running_router
from test_cli import one_line_error
from test_correctness import PROMPT, reference_tokens
from test_stages import PROMPTS

TOKENS = 24


@pytest.fixture(scope="module")
def small_draft(tmp_path_factory):
    """Another random model of one layer with the same tokenizer: it rarely guesses right."""
    return write_tiny_model(tmp_path_factory.mktemp("draft") / "small", seed=7,
                            config_overrides=dict(num_hidden_layers=1))


def run(router, prompt=PROMPT, n=TOKENS) -> tuple[list[int], float]:
    """Tokens, and round trips per generated token."""
    with Client(f"127.0.0.1:{router.port}") as client:
        client.stats(reset=True)
        tokens = [p.token for p in client.generate(prompt, max_tokens=n)]
        return tokens, client.stats().round_trips / len(tokens)


@pytest.mark.parametrize("mode", ["expert", "pipeline"])
def test_greedy_tokens_with_a_draft_are_mlx_lm_s_in_fewer_round_trips(tiny, small_draft, mode):
    expected = reference_tokens(tiny, PROMPT, TOKENS)
    with running_nodes(tiny, 2) as nodes:
        trips = {}
        for name, draft in (("none", None), ("same", tiny), ("small", small_draft)):
            with running_router(tiny, [n.address for n in nodes], mode=mode, draft_model=draft) as router:
                assert router.plan.mode == mode
                tokens, trips[name] = run(router)
                assert tokens == expected, f"draft {name}"
        # the checkpoint itself as the draft: every guess accepted, 4 tokens per pass
        assert trips["same"] < trips["none"] / 2
        assert trips["small"] <= trips["none"]
        if mode == "pipeline":  # trimmed drafts were dropped on the nodes too: nothing left behind
            assert all(n.stages.wait_sequences(lambda s: not s, timeout=30) for n in nodes)


def test_requests_arriving_during_a_speculative_one_batch_beside_it(tiny):
    long_expected = reference_tokens(tiny, PROMPT, 200)
    with running_nodes(tiny, 2) as nodes, \
            running_router(tiny, [n.address for n in nodes], draft_model=tiny) as router:
        singles = [run(router, p, 12)[0] for p in PROMPTS]
        with Client(f"127.0.0.1:{router.port}") as client:
            long_one = client.generate(PROMPT, max_tokens=200)
            first = next(long_one)  # decoding speculatively: the others batch beside it
            with in_threads(lambda i: [p.token for p in client.generate(PROMPTS[i], max_tokens=12)],
                            len(PROMPTS)) as runs:
                pass
            rest = [first.token] + [p.token for p in long_one]
        assert [r.result() for r in runs] == singles
        assert rest == long_expected


def test_a_draft_with_another_vocabulary_is_refused(tiny, tmp_path):
    other = write_tiny_model(tmp_path / "other", seed=1)
    for f in other.glob("*.json"):  # one special token renamed: another vocabulary
        f.write_text(f.read_text().replace("<|im_end|>", "<|im_stop|>"))
    with pytest.raises(ModelError, match="has another tokenizer than the model"):
        Router(RouterConfig(model=tiny, peers=["127.0.0.1:1"], port=0, draft_model=other))


def test_nodes_refuse_trims_they_cannot_do_and_keep_serving(tiny):
    with running_nodes(tiny, 1) as (node,), channel(node.address) as ch:
        stub = pb_grpc.ExpertServiceStub(ch)
        config_hash = stub.GetInfo(pb.GetInfoRequest(), timeout=10).config_hash
        list(stub.AssignStages(pb.AssignStagesRequest(config_hash=config_hash, stages=[pb.LayerSpan(start=0, end=4)]),
                               timeout=30))

        def step(rows, tokens, trim):
            hidden = wire.encode(mx.zeros((len(rows), tokens, 64), mx.float32))
            return node.core.forward(pb.ForwardRequest(request_id=1, stage=pb.StageRequest(
                layer=0, hidden=hidden, sequences=rows, trim=trim)))
        step([7], 3, 0)
        with pytest.raises(InvalidRequestError, match="cannot trim 4 tokens off a sequence's KV of 3"):
            step([7], 1, 4)
        with pytest.raises(InvalidRequestError, match="trim needs a positive count and one row"):
            step([7, 8], 1, 1)
        assert step([7], 1, 2).output.shape == [1, 1, 64]  # 3 - 2 + 1 tokens of KV now
        assert node.stages.kv_bytes > 0


def test_a_draft_model_that_is_no_checkpoint_is_one_line(tiny, tmp_path):
    out = cli("router", "--model", str(tiny), "--port", "0", "--peer", "127.0.0.1:1", "--draft-model", str(tmp_path))
    assert f"the draft model {tmp_path} is not a checkpoint directory" in one_line_error(out, "router")
