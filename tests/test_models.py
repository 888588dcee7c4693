"""Every supported family runs through the mesh exactly as mlx-lm runs it alone."""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import KVCache, make_prompt_cache

from expertmesh import Client
from expertmesh.checkpoint import Checkpoint
from expertmesh.errors import ModelError
from expertmesh.models import SUPPORTED, get_adapter
from expertmesh.nodes import Node, NodeConfig
from expertmesh.router import Router, RouterConfig
from expertmesh.router.dense import load_dense
from expertmesh.testing.tinymodel import DEFAULT_CONFIGS, write_tiny_model

from conftest import cli, running_nodes, running_router

PROMPT = "Once upon a time there was a little model"
FAMILIES = list(DEFAULT_CONFIGS)

Q4_64 = {"bits": 4, "group_size": 64}
Q8_32 = {"bits": 8, "group_size": 32}
Q4_32 = {"bits": 4, "group_size": 32}
Q8_64 = {"bits": 8, "group_size": 64}
MIXED = {"bits": 4, "group_size": 64, "recipe": "mixed_3_6"}  # per-layer bits in config


def variants(i: int) -> dict:
    """Both layouts, 4 and 8 bits, group sizes 32 and 64 (crossed across
    families), and a mixed per-layer recipe."""
    q4, q8 = (Q4_64, Q8_32) if i % 2 == 0 else (Q4_32, Q8_64)
    return {"hf-f32": dict(layout="hf"), "mlx-f32": dict(layout="mlx"),
            f"mlx-4bit-gs{q4['group_size']}": dict(quantize=q4),
            f"mlx-8bit-gs{q8['group_size']}": dict(quantize=q8), "mlx-mixed_3_6": dict(quantize=MIXED)}


CASES = [(family, name, kw) for i, family in enumerate(FAMILIES) for name, kw in variants(i).items()]


def test_families_and_supported_list_agree():
    assert set(FAMILIES) == set(SUPPORTED) == {
        "qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3", "olmoe"}
    quant = [kw["quantize"] for _, _, kw in CASES if "quantize" in kw and "recipe" not in kw["quantize"]]
    assert {(q["bits"], q["group_size"]) for q in quant} == {(4, 32), (4, 64), (8, 32), (8, 64)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def logits_of(model, tokens):
    logits = model(tokens)
    mx.eval(logits)
    return logits


@pytest.mark.parametrize("family,variant,kw", CASES, ids=[f"{f}-{v}" for f, v, _ in CASES])
def test_greedy_tokens_and_logits_match_mlx_lm_on_2_and_3_nodes(root, family, variant, kw):
    path = write_tiny_model(root / f"{family}-{variant}", model_type=family, seed=1, **kw)
    ref_model, tok = load(str(path))
    expected = [r.token for r in stream_generate(ref_model, tok, PROMPT, max_tokens=64)]
    assert len(expected) == 64 and len(set(expected)) >= 20  # varied text: an easy bar no more
    tokens = mx.array([tok.encode(PROMPT * 3)[:32]])
    ref_logits = ref_model(tokens)
    with running_nodes(path, 3) as nodes:
        for count in (2, 3):
            with running_router(path, [n.address for n in nodes[:count]]) as router:
                with Client(f"127.0.0.1:{router.port}") as client:
                    got = [p.token for p in client.generate(PROMPT, max_tokens=64)]
                    held = [n.experts for n in client.cluster().nodes]
                logits = router.worker.run(logits_of, router.model, tokens)
            assert got == expected, f"{family} {variant} on {count} nodes"
            assert all(held), "every node holds experts"
            if "f32" in variant:  # float32 rounding of a reordered sum, no more
                scale = mx.abs(ref_logits).max().item()
                assert mx.abs(logits - ref_logits).max().item() <= 1e-6 * scale, f"{family} on {count} nodes"


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_mlx_lm_within_1e_4_in_float32(root, family):
    # logits of a real model's size: the default tiny ones reach ~800, where
    # one float32 ulp is 6e-5 and any reordering of a top-k >= 3 sum shows
    path = write_tiny_model(root / f"logits-{family}", model_type=family, layout="hf", seed=2, logit_std=10.0)
    ref_model, tok = load(str(path))
    tokens = mx.array([tok.encode(PROMPT * 3)[:32]])
    expected = ref_model(tokens)
    assert 10 < mx.abs(expected).max().item() < 100  # not a comparison between zeros
    with running_nodes(path, 3) as nodes:
        for count in (2, 3):
            with running_router(path, [n.address for n in nodes[:count]]) as router:
                got = router.worker.run(logits_of, router.model, tokens)
            diff = mx.abs(got - expected).max().item()
            assert diff < 1e-4, f"{family} on {count} nodes: {diff}"


# Each family's own routing rule shapes the output: a mesh that ignored it
# would not match mlx-lm in the test above.
SPECIFICS = {
    "deepseek_v2 group_limited_greedy": ("deepseek_v2", {"topk_method": "gready"}),
    "deepseek_v2 routed_scaling_factor": ("deepseek_v2", {"routed_scaling_factor": 1.0}),
    "deepseek_v2 first_k_dense_replace": ("deepseek_v2", {"first_k_dense_replace": 0}),
    "deepseek_v3 groups": ("deepseek_v3", {"n_group": 1, "topk_group": 1}),
    "deepseek_v3 routed_scaling_factor": ("deepseek_v3", {"routed_scaling_factor": 1.0}),
    "olmoe norm_topk_prob=False": ("olmoe", {"norm_topk_prob": True}),
    "qwen3_moe norm_topk_prob=True": ("qwen3_moe", {"norm_topk_prob": False}),
}


def prompt_logits(path):
    model, tok = load(str(path))
    return model(mx.array([tok.encode(PROMPT)]))


@pytest.mark.parametrize("case", list(SPECIFICS))
def test_tiny_configs_exercise_each_family_rule(root, case):
    family, overrides = SPECIFICS[case]
    default = write_tiny_model(root / f"rule-{family}", model_type=family, seed=1)
    changed = write_tiny_model(root / f"rule-{case}", model_type=family, seed=1, config_overrides=overrides)
    diff = mx.abs(prompt_logits(default) - prompt_logits(changed)).max().item()
    assert diff > 1.0, f"{case} makes no difference to the output"


def test_deepseek_v3_correction_bias_changes_the_selection(root):
    path = write_tiny_model(root / "bias", model_type="deepseek_v3", seed=1)
    model, tok = load(str(path))
    gates = [l.mlp.gate for l in model.layers[1:]]
    assert all(mx.abs(g.e_score_correction_bias).max().item() > 0.05 for g in gates)
    x = mx.random.normal((1, 64, 64), key=mx.random.key(0))
    with_bias = [g(x)[0] for g in gates]
    for g in gates:
        g.e_score_correction_bias = mx.zeros_like(g.e_score_correction_bias)
    without = [g(x)[0] for g in gates]
    changed = sum((mx.sort(a, axis=-1) != mx.sort(b, axis=-1)).any(axis=-1).sum().item()
                  for a, b in zip(with_bias, without))
    assert changed > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_router_holds_dense_and_shared_experts_but_no_routed_expert(root, family):
    path = write_tiny_model(root / f"dense-{family}", model_type=family, layout="hf", seed=1)
    ref_model, _ = load(str(path))
    adapter = get_adapter(Checkpoint(path).config)
    model, _, _ = load_dense(Checkpoint(path))
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert not [k for k in names if "switch_mlp" in k or f".{adapter.block_attr}.experts." in k]
    ref = dict(tree_flatten(ref_model.parameters()))
    routed = sum(v.size for k, v in ref.items() if "switch_mlp" in k)
    assert routed > 0
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == sum(v.size for v in ref.values()) - routed
    shared = {k for k in ref if "shared_expert" in k}
    assert shared <= set(names)
    assert bool(shared) == (family in ("qwen2_moe", "deepseek_v2", "deepseek_v3"))
    # the adapter agrees with mlx-lm on which layers are MoE, and how wide
    moe = [i for i, l in enumerate(ref_model.layers) if "switch_mlp" in getattr(l, adapter.block_attr)]
    assert adapter.moe_layers == moe
    assert adapter.num_experts == 8 and adapter.hidden_size == 64
    assert adapter.top_k == DEFAULT_CONFIGS[family]["num_experts_per_tok"]
    if family.startswith("deepseek"):
        assert moe == [1, 2, 3]  # first_k_dense_replace=1


@pytest.mark.parametrize("family", FAMILIES)
def test_the_adapter_builds_the_mask_mlx_lm_gives_the_family_layers(root, family, monkeypatch):
    # a node's stage spans build their own masks: DeepSeek V3's attention takes
    # only an array (it mx.where()s the mask), the others mlx-lm's "causal"
    path = write_tiny_model(root / f"mask-{family}", model_type=family, seed=1)
    model, tok = load(str(path))
    adapter = get_adapter(Checkpoint(path).config)
    seen = []
    layer_class = type(model.layers[0])
    decoder_layer = layer_class.__call__
    monkeypatch.setattr(layer_class, "__call__", lambda self, x, mask=None, cache=None:
                        seen.append(mask) or decoder_layer(self, x, mask, cache))
    tokens = mx.array([tok.encode(PROMPT)])
    for cache in (None, make_prompt_cache(model)):
        seen.clear()
        model(tokens, cache=cache)
        want = seen[0]
        got = adapter.attention_mask(mx.zeros((1, tokens.shape[1], adapter.hidden_size)), cache and KVCache())
        assert type(got) is type(want)
        assert got == want if isinstance(want, str) else mx.array_equal(got, want).item()
    assert isinstance(want, str) == (family != "deepseek_v3")


UNSUPPORTED = {
    "llama": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2},
    "phimoe": {"model_type": "phimoe", "num_local_experts": 16, "num_experts_per_tok": 2},
}


@pytest.mark.parametrize("model_type", list(UNSUPPORTED))
def test_node_and_router_refuse_an_unsupported_architecture_naming_it(tmp_path, model_type):
    (tmp_path / "config.json").write_text(__import__("json").dumps(UNSUPPORTED[model_type]))
    for start in (lambda: Node(NodeConfig(model=tmp_path, port=0)),
                  lambda: Router(RouterConfig(model=tmp_path, port=0, peers=["127.0.0.1:1"]))):
        with pytest.raises(ModelError) as err:
            start()
        message = str(err.value)
        assert f"model_type {model_type!r} is not supported" in message
        assert all(family in message for family in SUPPORTED)


def test_node_cli_refuses_an_unsupported_moe_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "phimoe"}')
    out = cli("node", "--model", str(tmp_path), "--port", "0")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    (line,) = [l for l in out.stderr.splitlines() if l.startswith("expertmesh node: error:")]
    assert "'phimoe' is not supported" in line and "deepseek_v3" in line


def test_a_config_without_routed_experts_is_refused(root):
    path = write_tiny_model(root / "no-moe", model_type="deepseek_v2", seed=1,
                            config_overrides={"first_k_dense_replace": 4})
    with pytest.raises(ModelError, match="deepseek_v2 config has no MoE layer"):
        Node(NodeConfig(model=path, port=0))


@pytest.mark.parametrize("family", FAMILIES)
def test_remote_blocks_compute_exactly_the_mlx_lm_blocks_given_the_same_experts(root, family):
    path = write_tiny_model(root / f"block-{family}", model_type=family, seed=5)
    ref_model, _ = load(str(path))
    model, _, adapter = load_dense(Checkpoint(path))

    def local_experts(layer, x, inds, scores):  # what the nodes return, computed here
        switch = getattr(ref_model.layers[layer], adapter.block_attr).switch_mlp
        return (switch(x, inds) * scores[..., None]).sum(axis=-2).astype(x.dtype)

    adapter.attach(model, local_experts)
    for shape in (2, 5, 64), (3, 1, 64):  # a prefill, and a decode step (its gating compiled)
        x = mx.random.normal(shape, key=mx.random.key(1))
        for layer in adapter.moe_layers:
            want = getattr(ref_model.layers[layer], adapter.block_attr)(x)
            got = getattr(model.layers[layer], adapter.block_attr)(x)
            assert mx.array_equal(got, want).item(), f"{family} layer {layer}, x {shape}"
