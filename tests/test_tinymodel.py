import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import generate, load
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import make_prompt_cache
from transformers import AutoTokenizer

from expertmesh.testing.tinymodel import (
    DEFAULT_CONFIGS,
    SPECIAL_TOKENS,
    default_model_dir,
    ensure_demo_model,
    write_tiny_model,
    write_tokenizer,
)

MAX_TOKENS = 64

VARIANTS = {
    "mlx-fp32": {},
    "mlx-fp32-hot-experts": {"hot_experts": [0, 1]},  # skewed routing: greedy stays tie-free
    "hf-fp32": {"layout": "hf"},
    "mlx-4bit-gs64": {"quantize": {"bits": 4, "group_size": 64}},
    "mlx-8bit-gs32": {"quantize": {"bits": 8, "group_size": 32}},
    "mlx-sparse-step2": {
        "config_overrides": {"decoder_sparse_step": 2, "mlp_only_layers": [1]}
    },
    "mixtral-hf-fp32": {"model_type": "mixtral", "layout": "hf"},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: write_tiny_model(root / name, **kw) for name, kw in VARIANTS.items()}


@pytest.fixture(scope="module")
def loaded(checkpoints):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load(str(checkpoints[name]))
        return cache[name]

    return get


def weight_map(path):
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


def load_tensors(path):
    tensors = {}
    for shard in path.glob("model-*.safetensors"):
        tensors.update(mx.load(str(shard)))
    return tensors


def chat_prompt(tokenizer):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about the experts."}],
        add_generation_prompt=True,
    )


def greedy_with_gaps(model, prompt):
    cache = make_prompt_cache(model)
    x = mx.array(prompt)[None]
    tokens, gaps = [], []
    for _ in range(MAX_TOKENS):
        logits = model(x, cache=cache)[0, -1]
        top2 = mx.sort(logits)[-2:]
        token = mx.argmax(logits).item()
        tokens.append(token)
        gaps.append((top2[1] - top2[0]).item())
        x = mx.array([[token]])
    return tokens, gaps


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_runs_full_max_tokens(loaded, variant):
    model, tokenizer = loaded(variant)
    prompt = chat_prompt(tokenizer)
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS))
    assert len(responses) == MAX_TOKENS
    assert responses[-1].generation_tokens == MAX_TOKENS
    assert responses[-1].finish_reason == "length"
    text = generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS, verbose=False)
    assert text == "".join(r.text for r in responses)
    assert text.isascii() and text.isprintable()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_steps_are_well_separated_and_never_special(loaded, variant):
    model, tokenizer = loaded(variant)
    prompt = chat_prompt(tokenizer)
    tokens, gaps = greedy_with_gaps(model, prompt)
    assert min(gaps) > 0.01, gaps
    assert sum(g > 0.05 for g in gaps) >= MAX_TOKENS - 1
    assert all(len(SPECIAL_TOKENS) <= t < len(tokenizer.get_vocab()) for t in tokens)
    responses = stream_generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS)
    assert tokens == [r.token for r in responses]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_index_maps_every_tensor_to_a_nonempty_shard(checkpoints, variant):
    path = checkpoints[variant]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(path.glob("model-*.safetensors"))
    expected = [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [s.name for s in shards] == expected
    stored = {}
    for shard in shards:
        tensors = mx.load(str(shard))
        assert tensors, f"{shard.name} is empty"
        stored.update((k, shard.name) for k in tensors)
    assert index["weight_map"] == stored
    total = sum(v.nbytes for s in shards for v in mx.load(str(s)).values())
    assert index["metadata"]["total_size"] == total


def test_hf_layout_has_per_expert_tensors(checkpoints):
    tensors = load_tensors(checkpoints["hf-fp32"])
    assert not any("switch_mlp" in k for k in tensors)
    for e in range(8):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            expert = tensors[f"model.layers.3.mlp.experts.{e}.{proj}.weight"]
            assert expert.shape == (64, 64)
    mixtral = weight_map(checkpoints["mixtral-hf-fp32"])
    assert {"w1", "w2", "w3"} == {
        k.split(".")[-2] for k in mixtral if ".block_sparse_moe.experts." in k
    }


def test_mlx_layout_stacks_experts(checkpoints):
    tensors = load_tensors(checkpoints["mlx-fp32"])
    assert not any(".experts." in k for k in tensors)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        stacked = tensors[f"model.layers.0.mlp.switch_mlp.{proj}.weight"]
        assert stacked.shape == (8, 64, 64) and stacked.dtype == mx.float32


def test_hf_and_mlx_layouts_load_to_identical_parameters(loaded):
    mlx_params = tree_flatten(loaded("mlx-fp32")[0].parameters())
    hf_params = tree_flatten(loaded("hf-fp32")[0].parameters())
    assert [k for k, _ in mlx_params] == [k for k, _ in hf_params]
    for (k, a), (_, b) in zip(mlx_params, hf_params):
        assert a.dtype == mx.float32 and a.shape == b.shape, k
        assert mx.array_equal(a, b).item(), k


def test_same_seed_writes_identical_bytes(checkpoints, tmp_path):
    again = write_tiny_model(tmp_path / "again", quantize={"bits": 4, "group_size": 64})
    reference = checkpoints["mlx-4bit-gs64"]
    files = sorted(p.name for p in reference.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert (reference / name).read_bytes() == (again / name).read_bytes(), name


def test_rewriting_with_fewer_shards_removes_stale_shards(tmp_path):
    write_tiny_model(tmp_path, num_shards=3)
    write_tiny_model(tmp_path, num_shards=2)
    assert len(list(tmp_path.glob("model*.safetensors"))) == 2
    load(str(tmp_path))


def test_different_seed_writes_different_weights(checkpoints, tmp_path):
    other = write_tiny_model(tmp_path / "other", seed=1, num_shards=1)
    a = mx.load(str(checkpoints["mlx-fp32"] / "model-00001-of-00003.safetensors"))
    b = mx.load(str(other / "model-00001-of-00001.safetensors"))
    k = "model.embed_tokens.weight"
    assert not mx.array_equal(a[k], b[k]).item()


def test_quantized_config_records_mixed_bits_like_mlx_lm(checkpoints):
    config = json.loads((checkpoints["mlx-4bit-gs64"] / "config.json").read_text())
    q = config["quantization"]
    assert config["quantization_config"] == q
    assert (q["bits"], q["group_size"]) == (4, 64)
    assert q["model.layers.0.mlp.gate"] == {"group_size": 64, "bits": 8}
    q8 = json.loads((checkpoints["mlx-8bit-gs32"] / "config.json").read_text())
    assert (q8["quantization"]["bits"], q8["quantization"]["group_size"]) == (8, 32)


def test_config_matches_tokenizer_and_defaults(checkpoints, loaded):
    config = json.loads((checkpoints["mlx-fp32"] / "config.json").read_text())
    tokenizer = loaded("mlx-fp32")[1]
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert config["torch_dtype"] == "float32"
    assert config["vocab_size"] % 64 == 0
    n_tokens = len(tokenizer.get_vocab())
    assert config["vocab_size"] - 64 < n_tokens <= config["vocab_size"]
    assert config["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert config["bos_token_id"] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.eos_token_ids == {config["eos_token_id"]}
    sparse = json.loads((checkpoints["mlx-sparse-step2"] / "config.json").read_text())
    assert (sparse["decoder_sparse_step"], sparse["mlp_only_layers"]) == (2, [1])


def test_sparse_step_builds_dense_and_moe_layers(loaded):
    layers = loaded("mlx-sparse-step2")[0].model.layers
    assert [hasattr(l.mlp, "switch_mlp") for l in layers] == [False, False, False, True]


def test_chat_template_renders_chatml(loaded):
    tokenizer = loaded("mlx-fp32")[1]
    messages = [{"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi\nassistant\n"


def test_tokenizer_round_trips_text(tmp_path):
    assert 400 <= write_tokenizer(tmp_path) <= 512
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello, Alice! The router picks 2 experts; ünïcödé too."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"


def test_hf_layout_refuses_quantization(tmp_path):
    with pytest.raises(ValueError, match="mlx layout"):
        write_tiny_model(tmp_path, layout="hf", quantize={"bits": 4, "group_size": 64})


def test_hot_experts_need_an_untied_head(tmp_path):
    with pytest.raises(ValueError, match="untied head"):
        write_tiny_model(tmp_path, hot_experts=[0], config_overrides={"tie_word_embeddings": True})


def test_ensure_demo_model_writes_once_under_expertmesh_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTMESH_HOME", str(tmp_path))
    assert default_model_dir() == tmp_path / "models" / "tiny-qwen3-moe"
    path = ensure_demo_model()
    assert path == default_model_dir()
    config = path / "config.json"
    mtime = config.stat().st_mtime_ns
    assert ensure_demo_model() == path
    assert config.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("model_type", list(DEFAULT_CONFIGS))
def test_every_family_writes_hf_names_that_mlx_lm_loads_to_the_mlx_layout(tmp_path, model_type):
    hf = write_tiny_model(tmp_path / "hf", model_type=model_type, layout="hf")
    names = set(weight_map(hf))
    assert not any("switch_mlp" in k or "embed_q" in k or "unembed_out" in k for k in names)
    assert any(".experts.7." in k for k in names)
    if model_type == "deepseek_v3":
        assert "model.layers.0.self_attn.kv_b_proj.weight" in names
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    mlx_params = tree_flatten(load(str(write_tiny_model(tmp_path / "mlx", model_type=model_type)))[0].parameters())
    hf_params = dict(tree_flatten(load(str(hf))[0].parameters()))
    assert [k for k, _ in mlx_params] == list(hf_params)
    for k, v in mlx_params:
        assert mx.array_equal(v, hf_params[k]).item(), k
