"""The mesh computes what mlx-lm computes in one process."""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.generate import stream_generate

from expertmesh import Client
from expertmesh.models import get_adapter
from expertmesh.router.dense import load_dense
from expertmesh.checkpoint import Checkpoint

from conftest import VARIANTS, running_nodes, running_router

PROMPT = "Once upon a time there was a little model"


def reference_tokens(path, prompt=PROMPT, n=64):
    model, tok = load(str(path))
    return [r.token for r in stream_generate(model, tok, prompt, max_tokens=n)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_tokens_match_mlx_lm_for_1_2_3_nodes(checkpoints, variant):
    path = checkpoints[variant]
    expected = reference_tokens(path)
    assert len(expected) == 64
    with running_nodes(path, 3) as nodes:
        for count in (1, 2, 3):
            with running_router(path, [n.address for n in nodes[:count]]) as router:
                with Client(f"127.0.0.1:{router.port}") as client:
                    pieces = list(client.generate(PROMPT, max_tokens=64))
                    held = [n.experts for n in client.cluster().nodes]
            assert [p.token for p in pieces] == expected, f"{variant} on {count} nodes"
            assert pieces[-1].finish_reason == "length"
            # every expert of every MoE layer on exactly one node
            for layer in held[0]:
                assert sorted(e for h in held for e in h[layer]) == list(range(8))


def test_layers_whose_answers_are_added_on_the_device_give_mlx_lms_tokens(checkpoints, monkeypatch, host_copies):
    """A prompt's layers add their nodes' answers on the device (decode steps
    on the host): here every layer does, prompt and decode alike."""
    from expertmesh.router import dispatcher

    path = checkpoints["mlx-4bit"]
    expected = reference_tokens(path, n=16)
    monkeypatch.setattr(dispatcher, "DEVICE_SUM_VALUES", 1)
    with running_nodes(path, 2) as nodes, running_router(path, [n.address for n in nodes]) as router:
        with Client(f"127.0.0.1:{router.port}") as client:
            assert [p.token for p in client.generate(PROMPT, max_tokens=16)] == expected


def test_logits_match_mlx_lm_within_1e_4_in_float32(checkpoints):
    path = checkpoints["hf-f32"]
    ref_model, tok = load(str(path))
    tokens = mx.array([tok.encode("The router looks at each token and picks two experts " * 3)[:32]])
    assert tokens.shape[1] == 32
    expected = ref_model(tokens)
    with running_nodes(path, 2) as nodes, running_router(path, [n.address for n in nodes]) as router:
        def forward():
            logits = router.model(tokens)
            mx.eval(logits)
            return logits

        got = router.worker.run(forward)
    diff = mx.abs(got - expected).max().item()
    assert diff < 1e-4, diff
    assert mx.abs(expected).max().item() > 1.0  # the comparison is not between zeros


@pytest.mark.parametrize("variant", ["hf-f32", "mlx-4bit"])
def test_router_holds_no_expert_weights(checkpoints, variant):
    path = checkpoints[variant]
    ref_model, _ = load(str(path))
    checkpoint = Checkpoint(path)
    model, _, adapter = load_dense(checkpoint)
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert not [k for k in names if "switch_mlp" in k or ".experts." in k]
    ref = dict(tree_flatten(ref_model.parameters()))
    expert_params = sum(v.size for k, v in ref.items() if "switch_mlp" in k)
    assert expert_params > 0
    loaded = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert loaded == sum(v.size for v in ref.values()) - expert_params
    assert get_adapter(checkpoint.config).moe_layers == adapter.moe_layers


def test_sparse_step_config_routes_only_moe_layers(checkpoints):
    adapter = get_adapter(Checkpoint(checkpoints["sparse-step"]).config)
    # decoder_sparse_step=2 makes layers 1 and 3 sparse; mlp_only_layers=[1] removes 1
    assert adapter.moe_layers == [3]
