"""`expertmesh plan` sizes a mesh from checkpoint headers, before any download."""

import re

import mlx.core as mx
import pytest

from expertmesh.cli import main
from expertmesh.placement import size
from expertmesh.testing.tinymodel import write_tiny_model

from conftest import cli
from safetensors_files import headers_only, write_checkpoint


def plan(capsys, model, *nodes, replicas=1):
    assert main(["plan", "--model", str(model), "--mode", "expert", *[a for n in nodes for a in ("--node", n)],
                 "--replicas", str(replicas)]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("family,kw", [("deepseek_v3", dict(layout="hf")),
                                       ("mixtral", dict(quantize={"bits": 4, "group_size": 32}))])
def test_plan_from_headers_alone_equals_the_plan_from_the_full_checkpoint(tmp_path, capsys, family, kw):
    full = write_tiny_model(tmp_path / "full" / "tiny", model_type=family, seed=1, **kw)
    bare = headers_only(full, tmp_path / "bare" / "tiny")
    assert sum(f.stat().st_size for f in bare.glob("*.safetensors")) < 20_000
    nodes = ["mini-a:0.01", "mini-b:0.006"]
    out = plan(capsys, bare, *nodes)
    assert out == plan(capsys, full, *nodes)
    weights = {k: v for f in full.glob("*.safetensors") for k, v in mx.load(str(f)).items()}
    experts = sum(v.nbytes for k, v in weights.items() if ".experts." in k or ".switch_mlp." in k)
    dense = sum(v.nbytes for v in weights.values()) - experts
    layers = 3 if family == "deepseek_v3" else 4  # first_k_dense_replace=1
    assert f"{layers} MoE layers x 8 routed experts, top-2" in out
    assert f"routed experts {size(experts)}" in out and f"dense part on the router {size(dense)}" in out
    rows = {line.split()[0]: line for line in out.splitlines()[3:]}
    assert rows["mini-a"].split()[3:] == [f"{5 * layers}", "0", *size(experts * 5 // 8).split(), "0-4", "(every", "layer)"]
    assert rows["mini-b"].split()[3:] == [f"{3 * layers}", "0", *size(experts * 3 // 8).split(), "5-7", "(every", "layer)"]
    assert rows["router"].split()[-2:] == size(dense).split()


def qwen3_30b_a3b_4bit():
    """Tensor shapes of mlx-community/Qwen3-30B-A3B-4bit (norms left out)."""
    H, I, E, V = 2048, 768, 128, 151936

    def q4(name, out, inp, bits=4):
        return {f"{name}.weight": ("U32", (*out, inp * bits // 32)),
                f"{name}.scales": ("BF16", (*out, inp // 64)), f"{name}.biases": ("BF16", (*out, inp // 64))}

    tensors = {**q4("model.embed_tokens", (V,), H), **q4("lm_head", (V,), H)}
    for l in range(48):
        p = f"model.layers.{l}"
        for name, out, inp in (("q_proj", 4096, H), ("k_proj", 512, H), ("v_proj", 512, H), ("o_proj", H, 4096)):
            tensors.update(q4(f"{p}.self_attn.{name}", (out,), inp))
        tensors.update(q4(f"{p}.mlp.gate", (E,), H, bits=8))
        for name, out, inp in (("gate_proj", I, H), ("up_proj", I, H), ("down_proj", H, I)):
            tensors.update(q4(f"{p}.mlp.switch_mlp.{name}", (E, out), inp))
    config = {"model_type": "qwen3_moe", "hidden_size": H, "num_hidden_layers": 48, "intermediate_size": 6144,
              "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": E,
              "num_experts_per_tok": 8, "moe_intermediate_size": I, "decoder_sparse_step": 1,
              "mlp_only_layers": [], "norm_topk_prob": True, "rms_norm_eps": 1e-6, "vocab_size": V,
              "rope_theta": 1e6, "max_position_embeddings": 40960, "tie_word_embeddings": False,
              "quantization": {"group_size": 64, "bits": 4}}
    return config, tensors


def test_plan_sizes_qwen3_30b_a3b_from_a_config_only_directory(tmp_path, capsys):
    config, tensors = qwen3_30b_a3b_4bit()
    total = write_checkpoint(tmp_path / "Qwen3-30B-A3B-4bit", config, tensors, shards=4, data=False)
    out = plan(capsys, tmp_path / "Qwen3-30B-A3B-4bit", "mini-a:12", "mini-b:6")
    expert = 3 * (768 * 2048 // 2 + 2 * 2 * 768 * 2048 // 64)  # 4-bit weights, bf16 scales and biases
    assert expert == 2_654_208
    assert "Qwen3-30B-A3B-4bit (qwen3_moe): 48 MoE layers x 128 routed experts, top-8" in out
    assert f"routed experts 16.31 GB (2.65 MB each); dense part on the router {size(total - 48 * 128 * expert)}" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[3:]}
    assert rows["mini-a"][1:] == ["12.00", "GB", str(85 * 48), "0", *size(85 * 48 * expert).split(), "0-84", "(every", "layer)"]
    assert rows["mini-b"][1:] == ["6.00", "GB", str(43 * 48), "0", *size(43 * 48 * expert).split(), "85-127", "(every", "layer)"]


def test_plan_with_replicas_copies_what_fits_and_names_the_rest(tmp_path, capsys):
    config, tensors = qwen3_30b_a3b_4bit()
    write_checkpoint(tmp_path / "m", config, tensors, data=False)
    out = plan(capsys, tmp_path / "m", "mini-a:20", "mini-b:12", replicas=2)
    expert = 2_654_208
    rows = {line.split()[0]: line.split() for line in out.splitlines()[3:]}
    # mini-a holds its 80 primaries per layer and copies of all 48 of mini-b's (128 * 48 in all);
    # mini-b has room for 4521 experts: its 48 * 48 primaries and 2217 copies of mini-a's
    assert rows["mini-a"][3:5] == [str(128 * 48), str(48 * 48)]
    assert rows["mini-b"][3:5] == [str(4521), str(4521 - 48 * 48)]
    assert int(rows["mini-b"][3]) * expert <= 12e9 < (int(rows["mini-b"][3]) + 1) * expert
    short = out.splitlines()[-1]  # 2217 = 27 layers x 80 + 57: copies stop at layer 27 expert 57
    assert short.startswith("memory allows fewer than 2 copies of layer 27 experts 57-79; layer 28 experts 0-79; ")
    assert short.endswith("; layer 47 experts 0-79")


def one_line_error(result):
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = [l for l in result.stderr.splitlines() if l.startswith("expertmesh plan: error:")]
    return line


def test_experts_that_do_not_fit_and_bad_node_specs_are_one_line(tmp_path):
    config, tensors = qwen3_30b_a3b_4bit()
    model = tmp_path / "m"
    write_checkpoint(model, config, tensors, data=False)
    line = one_line_error(cli("plan", "--model", str(model), "--node", "a:8", "--node", "b:8"))
    assert "the routed experts need 16.31 GB but the nodes offer 16.00 GB (a: 8.00 GB, b: 8.00 GB)" in line
    line = one_line_error(cli("plan", "--model", str(model), "--node", "a:twelve"))
    assert "expected NAME:GB" in line


def zipf_stats(path, layers, experts, seed=0):
    """A stats file where each layer's experts are Zipf-popular, in a random order."""
    import numpy as np

    from expertmesh.popularity import write_stats
    from expertmesh.v1 import expertmesh_pb2 as pb

    rng = np.random.default_rng(seed)
    stats = pb.RouterStats(num_experts=experts, top_k=8)
    for l in range(layers):
        stats.layers.add(layer=l, expert_tokens=rng.permutation(10_000 // np.arange(1, experts + 1)).tolist())
    write_stats(stats, path)
    return path


def test_plan_with_stats_evens_the_expected_load_within_the_budgets(tmp_path, capsys):
    config, tensors = qwen3_30b_a3b_4bit()
    write_checkpoint(tmp_path / "m", config, tensors, data=False)
    stats = zipf_stats(tmp_path / "stats.json", 48, 128)
    assert main(["plan", "--model", str(tmp_path / "m"), "--node", "a:6", "--node", "b:6", "--node", "c:6",
                 "--mode", "expert", "--stats", str(stats)]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("balance ratio expected"))
    planned, contiguous = (float(x) for x in re.findall(r"\d\.\d+", line))
    assert planned > 0.99 and contiguous < 0.8, line
    rows = {l.split()[0]: l.split() for l in out.splitlines()[3:6]}
    assert all(float(rows[n][5]) <= 6.0 for n in "abc")  # GB used
    assert sum(int(rows[n][4]) for n in "abc") > 0  # hot experts copied into the spare memory


def test_stats_files_that_do_not_fit_the_model_are_one_line(tmp_path):
    config, tensors = qwen3_30b_a3b_4bit()
    model = tmp_path / "m"
    write_checkpoint(model, config, tensors, data=False)
    other = zipf_stats(tmp_path / "other.json", 4, 8)
    line = one_line_error(cli("plan", "--model", str(model), "--node", "a:20", "--stats", str(other)))
    assert "counts 8 experts in MoE layers [0, 1, 2, 3]; the model has 128 in [0, 1, 2" in line
    (tmp_path / "bad.json").write_text("{not json")
    line = one_line_error(cli("plan", "--model", str(model), "--node", "a:20", "--stats", str(tmp_path / "bad.json")))
    assert "is not a stats file" in line
    line = one_line_error(cli("plan", "--model", str(model), "--node", "a:20", "--stats", str(other), "--replicas", "2"))
    assert "--stats plans the copies itself" in line
