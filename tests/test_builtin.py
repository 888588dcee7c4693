"""The built-in trained model: training reruns to the same bytes, its text reads
like its corpus, the mesh computes what mlx-lm computes on it in every mode,
its routing is skewed on real prompts, and its draft guesses well."""

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.generate import stream_generate

from expertmesh import Client
from expertmesh.cli import main
from expertmesh.testing import greedy as greedy_check
from expertmesh.builtin import draft_dir, model_dir, train, vocabulary, write_variant
from expertmesh.v1 import expertmesh_pb2 as pb

from conftest import running_nodes, running_router

# A trained model has near-ties between logits, and the mesh sums expert
# partials in another order than mlx-lm (and runs attention on the nodes in
# pipeline mode), so logits agree only to float32 rounding: a greedy token of
# the mesh may differ from mlx-lm's only where mlx-lm's top-two margin is
# below this tolerance.
TOL = 1e-3
PROMPTS = ["class Point:\n    def __repr__(self):\n        return ", "    def __len__(self):\n        return ",
           "def __init__(self, ", "class Error(Exception):\n    \"\"\"", "if __name__ == '__main__':\n"]
TOKENS = 64
SKEWED_BALANCE = 0.8  # mean/max node load on 3 nodes with contiguous experts

needs_corpus = pytest.mark.skipif(not train.CORPUS_DIR.is_dir(), reason=f"no {train.CORPUS_DIR} here")


@pytest.fixture(scope="module")
def reference():
    return load(str(model_dir()))


def greedy(reference, prompt: str, n: int = TOKENS) -> list[int]:
    model, tok = reference
    return [r.token for r in stream_generate(model, tok, prompt, max_tokens=n)]


def not_greedy(reference, prompt: str, tokens: list[int]) -> list[tuple[int, float]]:
    """(position, shortfall) where ``tokens`` is not mlx-lm's greedy choice, to within ``TOL``."""
    return greedy_check.not_greedy(reference, prompt, tokens, TOL)


@needs_corpus
def test_a_rerun_of_the_training_gives_the_same_bytes():
    texts = train.corpus_texts(files=train.CORPUS_FILES[:4], check=False)
    runs = []
    for _ in range(2):
        tok = train.train_tokenizer(texts, 300)
        config = train.model_config({**train.MODEL_CONFIG, "hidden_size": 32, "num_hidden_layers": 2,
                                     "num_experts": 4, "moe_intermediate_size": 32, "head_dim": 8}, tok)
        model = train.build(config, seed=3)
        cfg = train.TrainConfig(steps=4, batch_size=2, seq_len=32, warmup=2, seed=3)
        losses = train.train(model, train.encode(tok, texts), cfg, log_every=0)
        runs.append((tok.to_str(), losses, {k: np.array(v) for k, v in tree_flatten(model.parameters())}))
    (tok_a, losses_a, weights_a), (tok_b, losses_b, weights_b) = runs
    assert tok_a == tok_b and losses_a == losses_b
    assert weights_a.keys() == weights_b.keys()
    assert all(weights_a[k].tobytes() == weights_b[k].tobytes() for k in weights_a)
    assert losses_a[-1] < losses_a[0]  # it did train


@needs_corpus
def test_the_shipped_tokenizer_and_vocabulary_come_from_the_recorded_corpus():
    texts = train.corpus_texts()  # raises unless it is the recorded corpus
    tok = train.train_tokenizer(train.split(texts)[0], train.VOCAB_SIZE)
    assert json.loads(tok.to_str()) == json.loads((model_dir() / "tokenizer.json").read_text())
    assert set(train.vocabulary(texts)) == vocabulary()


def test_the_checkpoints_ship_small_with_a_chat_template_and_their_provenance(reference):
    files = [f for d in (model_dir(), draft_dir()) for f in d.iterdir()]
    assert sum(f.stat().st_size for f in files) <= 20e6 and max(f.stat().st_size for f in files) <= 16e6
    _, tok = reference
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    record = json.loads((model_dir() / "provenance.json").read_text())
    assert record["corpus"]["sha256"] == train.CORPUS_SHA256 and record["tokens_seen"] > 500_000
    assert record["validation_loss"] < 5.5  # from 8.3 untrained (ln 4096); see README "The built-in model"
    config = json.loads((model_dir() / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and 8 <= config["num_experts"] <= 32


def active_parameters(path) -> float:
    """Parameters one token runs through: all but the unchosen experts."""
    model, _ = load(str(path))
    params = dict(tree_flatten(model.parameters()))
    config = json.loads((path / "config.json").read_text())
    experts = sum(v.size for k, v in params.items() if "switch_mlp" in k)
    share = config.get("num_experts_per_tok", 1) / config.get("num_experts", 1)
    return sum(v.size for v in params.values()) - experts * (1 - share)


def test_the_draft_shares_the_tokenizer_with_a_quarter_of_the_active_parameters():
    assert (draft_dir() / "tokenizer.json").read_text() == (model_dir() / "tokenizer.json").read_text()
    assert active_parameters(draft_dir()) * 4 <= active_parameters(model_dir())


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_greedy_text_reads_like_its_corpus(reference, prompt):
    tokens = greedy(reference, prompt)
    text = reference[1].decode(tokens)
    words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)
    known = vocabulary()
    assert len(words) >= 10, text
    assert sum(w in known for w in words) >= 0.7 * len(words), text
    assert len(set(tokens)) >= 20, text


@pytest.mark.parametrize("mode", ["expert", "pipeline", "auto"])
def test_the_mesh_decodes_mlx_lm_s_greedy_tokens_in_every_mode(reference, mode, host_copies):
    model = model_dir()
    with running_nodes(model, 2) as nodes, running_router(model, [n.address for n in nodes], mode=mode) as router:
        with Client(f"127.0.0.1:{router.port}") as client:
            got = {p: [x.token for x in client.generate(p, max_tokens=TOKENS)] for p in PROMPTS[:3]}
        if mode == "expert":  # the logits themselves, on one forward pass
            ids = mx.array([reference[1].encode(PROMPTS[1])])

            def forward():
                logits = router.model(ids)
                mx.eval(logits)
                return logits

            logits = router.worker.run(forward)
            assert mx.abs(logits - reference[0](ids)).max().item() < TOL
    for prompt, tokens in got.items():
        # every token is mlx-lm's argmax to within TOL: where the mesh's first differs
        # from mlx-lm's own greedy token, mlx-lm's top two were within TOL there
        assert len(tokens) == TOKENS
        assert not_greedy(reference, prompt, tokens) == [], (mode, prompt)


def test_hf_and_quantized_variants_are_written_from_it(reference, tmp_path):
    hf = write_variant(tmp_path / "hf", layout="hf")
    assert any(".experts.0.gate_proj." in k for k in json.loads((hf / "model.safetensors.index.json").read_text())
               ["weight_map"])
    ids = mx.array([reference[1].encode(PROMPTS[0])])
    assert mx.array_equal(load(str(hf))[0](ids), reference[0](ids))
    q4 = write_variant(tmp_path / "q4", bits=4)
    assert json.loads((q4 / "config.json").read_text())["quantization"]["bits"] == 4
    assert sum(f.stat().st_size for f in q4.glob("*.safetensors")) < 0.3 * sum(
        f.stat().st_size for f in model_dir().glob("*.safetensors"))
    assert len(greedy(load(str(q4)), PROMPTS[0], 8)) == 8


def shares(stats) -> list[float]:
    """Each expert's share of its layer's token-slots, over every MoE layer."""
    return [t / sum(layer.expert_tokens) for layer in stats.layers for t in layer.expert_tokens]


def test_routing_on_real_prompts_is_skewed_and_rebalancing_evens_it_with_the_same_tokens(reference, tmp_path,
                                                                                          capsys):
    model = model_dir()
    with running_nodes(model, 3) as nodes, running_router(model, [n.address for n in nodes]) as router:
        address = f"127.0.0.1:{router.port}"
        with Client(address) as client:
            expected = {p: [x.token for x in client.generate(p, max_tokens=24)] for p in PROMPTS}
            before = client.stats()
            # 16 experts, top-2: an even split gives each 1/16 of its layer's slots
            assert max(shares(before)) > 2 / 16 and min(shares(before)) < 0.5 / 16
            assert before.balance_ratio < SKEWED_BALANCE
            # calibrate sees the same skew, and a plan from its file spreads it
            (tmp_path / "prompts.txt").write_text("\n".join(p.replace("\n", " ") for p in PROMPTS) + "\n")
            assert main(["calibrate", "--router", address, "--prompts", str(tmp_path / "prompts.txt"),
                         "--out", str(tmp_path / "stats.json"), "--max-tokens", "24"]) == 0
            assert float(capsys.readouterr().out.split("balance ratio ")[1].split()[0]) < SKEWED_BALANCE
            assert main(["plan", "--model", str(model), "--node", "a:1", "--node", "b:1", "--node", "c:1",
                         "--mode", "expert", "--stats", str(tmp_path / "stats.json")]) == 0
            plan = re.search(r"balance ratio expected on the traffic in .*: ([\d.]+) \(contiguous ranges: ([\d.]+)\)",
                             capsys.readouterr().out)
            assert float(plan[1]) > float(plan[2]) + 0.1, plan[0]
            progress = list(client.rebalance())
            assert progress[-1].phase == pb.REBALANCE_DONE, progress[-1]
            assert progress[0].balance_planned > progress[0].balance_before + 0.1
            client.stats(reset=True)
            assert {p: [x.token for x in client.generate(p, max_tokens=24)] for p in PROMPTS} == expected
            assert client.stats().balance_ratio > before.balance_ratio + 0.1
    assert all(not_greedy(reference, p, t) == [] for p, t in expected.items())


def test_the_trained_draft_keeps_greedy_output_in_fewer_round_trips(reference):
    model = model_dir()
    with running_nodes(model, 2) as nodes:
        got, trips = {}, {}
        for name, draft in (("none", None), ("trained", draft_dir())):
            with running_router(model, [n.address for n in nodes], draft_model=draft) as router, \
                    Client(f"127.0.0.1:{router.port}") as client:
                got[name] = [[x.token for x in client.generate(p, max_tokens=TOKENS)] for p in PROMPTS[:2]]
                trips[name] = client.stats().round_trips / (2 * TOKENS)
    assert got["trained"] == got["none"]
    assert all(not_greedy(reference, p, t) == [] for p, t in zip(PROMPTS, got["none"]))
    assert trips["trained"] < 0.75 * trips["none"], trips
