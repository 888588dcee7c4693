"""A node's ExpertStore reads exactly its experts, in any layout, as mlx-lm would."""

import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load

from expertmesh.checkpoint import Checkpoint
from expertmesh.nodes.store import DECODE_TOKENS, ExpertStore
from expertmesh.testing.tinymodel import DEFAULT_CONFIGS, write_tiny_model

from safetensors_files import write_checkpoint

FAMILIES = list(DEFAULT_CONFIGS)
QUANT = {
    "4bit-gs32": {"bits": 4, "group_size": 32},
    "4bit-gs64": {"bits": 4, "group_size": 64},
    "8bit-gs32": {"bits": 8, "group_size": 32},
    "8bit-gs64": {"bits": 8, "group_size": 64},
    "mixed_3_6": {"bits": 4, "group_size": 64, "recipe": "mixed_3_6"},
}
HELD = [1, 2, 5]  # two runs of the stacked tensors: rows 1-2 and row 5


def stored(path, layers=(1, 3)) -> ExpertStore:
    store = ExpertStore(Checkpoint(path))
    store.assign({l: HELD for l in layers})
    return store


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_and_mlx_layouts_of_the_same_weights_load_identical_arrays(tmp_path, family):
    hf = stored(write_tiny_model(tmp_path / "hf", model_type=family, layout="hf", seed=3))
    mlx = stored(write_tiny_model(tmp_path / "mlx", model_type=family, layout="mlx", seed=3))
    assert hf.held() == mlx.held() == {1: HELD, 3: HELD}
    assert hf.nbytes == mlx.nbytes > 0
    for layer in (1, 3):
        a = tree_flatten(hf.layers[layer].mlp.parameters())
        b = tree_flatten(mlx.layers[layer].mlp.parameters())
        assert [k for k, _ in a] == [k for k, _ in b]
        for (k, x), (_, y) in zip(a, b):
            assert x.shape[0] == len(HELD) and x.dtype == y.dtype, k
            assert mx.array_equal(x, y).item(), f"{family} layer {layer} {k}"


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_experts_compute_what_mlx_lm_computes(tmp_path, family, quant):
    path = write_tiny_model(tmp_path, model_type=family, quantize=QUANT[quant], seed=4)
    model, _ = load(str(path))
    store = stored(path)
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((5, 64)).astype(np.float32))
    ids = rng.choice(HELD, size=(5, 2)).astype(np.int32)
    ids[0, 1] = ids[0, 0] = HELD[0]  # repeated ids and slots for other nodes too
    ids[1, 1] = -1
    weights = rng.random((5, 2)).astype(np.float32)
    for layer in (1, 3):
        reference = getattr(model.layers[layer], store.adapter.block_attr).switch_mlp
        for proj in ("gate_proj", "up_proj", "down_proj"):  # per-layer bits honoured
            mlp = store.layers[layer].mlp  # gate and up may be one fused projection
            mine = getattr(mlp, "gate_up", None) if proj != "down_proj" and "gate_up" in mlp else getattr(mlp, proj)
            theirs = getattr(reference, proj)
            assert (getattr(mine, "bits", None), getattr(mine, "group_size", None)) == (
                getattr(theirs, "bits", None), getattr(theirs, "group_size", None)), f"layer {layer} {proj}"
        y = reference(x, mx.array(np.maximum(ids, 0)))  # [T, k, H], every expert
        want = (y * mx.array(np.where(ids >= 0, weights, 0))[..., None]).sum(axis=-2)
        got = store.forward(layer, x, ids, weights)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    if quant == "mixed_3_6":  # down_proj of layer 3 is 6-bit, of layer 1 3-bit
        assert store.layers[3].mlp.down_proj.bits == 6 and store.layers[1].mlp.down_proj.bits == 3


def test_decode_sized_requests_run_compiled_and_give_the_rows_a_prefill_gives(tmp_path):
    """Requests of up to DECODE_TOKENS tokens run a compiled step with their
    pairs padded; longer ones run as they are. Both give the same bits."""
    store = stored(write_tiny_model(tmp_path, seed=4), layers=(1,))
    rng = np.random.default_rng(1)
    T = DECODE_TOKENS + 8
    x = mx.array(rng.standard_normal((T, 64)).astype(np.float32)).astype(mx.bfloat16)
    ids = rng.choice(HELD + [-1], size=(T, 2)).astype(np.int32)
    weights = rng.random((T, 2)).astype(np.float32)
    whole = store.forward(1, x, ids, weights)
    for rows in (slice(0, 1), slice(1, 4), slice(4, 4 + DECODE_TOKENS)):  # 1, 3 and 16 tokens
        part = store.forward(1, x[rows], ids[rows], weights[rows])
        assert mx.array_equal(part, whole[rows]).item(), rows


# --- memory: a node never materialises experts it does not hold -------------

H, I, LAYERS, EXPERTS = 512, 384, 4, 24  # 2.4 MB a float32 expert, 226 MB in all


def write_big_checkpoint(path, layout: str) -> int:
    """qwen3_moe float32 experts only, stacked (mlx-community) or per expert
    (HF), in shards with an index, random bytes. Returns the experts' bytes."""
    config = {**DEFAULT_CONFIGS["qwen3_moe"], "hidden_size": H, "moe_intermediate_size": I,
              "num_hidden_layers": LAYERS, "num_experts": EXPERTS, "vocab_size": 512}
    shapes = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    if layout == "mlx":
        tensors = {f"model.layers.{l}.mlp.switch_mlp.{p}.weight": ("F32", (EXPERTS, *shape))
                   for l in range(LAYERS) for p, shape in shapes.items()}
    else:
        tensors = {f"model.layers.{l}.mlp.experts.{e}.{p}.weight": ("F32", shape)
                   for l in range(LAYERS) for e in range(EXPERTS) for p, shape in shapes.items()}
    return write_checkpoint(path, config, tensors, shards=3)


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb * 1024


@pytest.mark.parametrize("layout", ["mlx", "hf"])
def test_node_holding_a_quarter_of_the_experts_peaks_below_40_percent_of_them(tmp_path, layout):
    import grpc

    from expertmesh.testing.process import Process
    from expertmesh.serving import layer_experts
    from expertmesh.v1 import expertmesh_pb2 as pb
    from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

    model = tmp_path / "big"
    expert_bytes = write_big_checkpoint(model, layout)
    assert expert_bytes >= 200e6
    node = Process(["node", "--model", str(model), "--port", "0", "--memory-gb", "1"], tmp_path / "node.log")
    try:
        with grpc.insecure_channel(node.address(timeout=120)) as channel:
            stub = pb_grpc.ExpertServiceStub(channel)
            config = stub.GetInfo(pb.GetInfoRequest(), timeout=10).config_hash
            overhead = peak_rss(node.proc.pid)  # the same process before Assign

            def assign(experts):
                list(stub.Assign(pb.AssignRequest(config_hash=config, experts=layer_experts(
                    {l: experts for l in range(LAYERS)})), timeout=120))
                return peak_rss(node.proc.pid) - overhead

            quarter = assign(list(range(EXPERTS // 4)))
            assert stub.GetInfo(pb.GetInfoRequest(), timeout=10).memory_used_bytes == expert_bytes // 4
            assert quarter < 0.40 * expert_bytes, (quarter, expert_bytes)
            # the measurement can see the difference: holding all of them shows
            assert assign(list(range(EXPERTS))) > 0.9 * expert_bytes
    finally:
        node.stop()
        shutil.rmtree(model)
    print(f"\n{layout} layout: experts {expert_bytes / 1e6:.0f} MB, node overhead {overhead / 1e6:.0f} MB, "
          f"peak above it holding 1/4: {quarter / 1e6:.0f} MB ({quarter / expert_bytes:.0%})")
