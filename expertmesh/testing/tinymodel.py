"""Write tiny random-weight MoE checkpoints in the real on-disk layouts.

The checkpoints load with ``mlx_lm.load`` and decode greedily without ties, so
tests and demos can compare outputs token for token without any model hub.
"""

import argparse
import contextlib
import copy
import importlib
import io
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.convert import mixed_quant_predicate_builder
from mlx_lm.utils import quantize_model, save_config
from tokenizers import Tokenizer

from expertmesh.builtin.train import train_tokenizer
from expertmesh.layouts import SPECIAL_TOKENS, save_tokenizer, to_hf, write_shards
from expertmesh.testing import families

logger = logging.getLogger(__name__)

TOKENIZER_VOCAB_SIZE = 480
LOGIT_STD = 200.0
ATTENTION_SHARPNESS = 16.0  # factor on the attention scores of mlx-lm's initialisation
EMBED_SCALE = 2.0  # factor on the embeddings: the current token shows in the last hidden state
SUCCESSOR_BIAS = 1.3  # pull of each token's successor, in head-row norms (see _randomise)
HOT_BOOST = 6.0  # gate logit added to hot experts: they win for nearly every token

CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture of experts routes every
token to a few small networks, and only those networks run.

Once upon a time there was a little model that lived on a laptop. It wanted to
talk to other machines, so it sent its hidden states over the network and
waited for the experts to answer.

Hello! How are you today? I am fine, thank you. What would you like to know
about the world, about science, or about the history of computers?

The router looks at each token and picks the two experts with the highest
scores. Their outputs are weighted by the normalized scores and added together
before the next layer reads them.

Numbers like 1, 2, 3, 10, 42, 100 and 2024 appear in text too, as do names such
as Alice, Bob, Carol and Dave, who send messages to each other in examples.
""".split("\n\n")

DEFAULT_CONFIGS = families.DEFAULT_CONFIGS  # re-exported: the families the tests cover


def write_tokenizer(path: Union[str, Path]) -> int:
    """Train a small byte-level BPE tokenizer and write it in Hugging Face format.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` (with a ChatML chat
    template) and ``special_tokens_map.json``.

    Args:
        path: Directory to write into; created if missing.

    Returns:
        The number of tokens in the vocabulary.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(CORPUS, TOKENIZER_VOCAB_SIZE)
    save_tokenizer(tok, path, families.SHARED["max_position_embeddings"])
    return tok.get_vocab_size()


def _printable_ids(path: Path) -> list:
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    ids = range(len(SPECIAL_TOKENS), tok.get_vocab_size())
    return [i for i in ids if (t := tok.decode([i])).isascii() and t.isprintable()]


def _randomise(model: nn.Module, config: dict, allowed: list, logit_std: float):
    """Random weights whose greedy text varies, and never meets a near-tie.

    Plain random weights decode into a loop of a few tokens (every hidden
    state shares one direction). On top of mlx-lm's initialisation: perturbed
    norms (and DeepSeek's gates and correction biases drawn), so nothing
    ties; sharper attention (``ATTENTION_SHARPNESS``), so the next token
    depends on the earlier ones a head picks; embeddings scaled up
    (``EMBED_SCALE``) and a head that leans each token towards its successor
    on one random cycle (``SUCCESSOR_BIAS``) and is blind to the shared
    direction, so the text walks the cycle about half the time and the
    layers choose the other steps; printable tokens only, and logits spread
    by about ``logit_std``. A tied head keeps plain random rows (they are
    the input embeddings too).
    """
    for _, m in model.named_modules():
        if isinstance(m, nn.RMSNorm):
            m.weight = 1.0 + 0.1 * mx.random.normal(m.weight.shape)
        # DeepSeek's MoEGate starts at zero: every score would tie
        if "weight" in m and not isinstance(m, nn.RMSNorm) and not mx.any(m.weight).item():
            m.weight = mx.random.normal(m.weight.shape) * m.weight.shape[-1] ** -0.5
        # DeepSeek-V3 selects with a correction bias, but weights without it
        if "e_score_correction_bias" in m:
            m.e_score_correction_bias = 0.1 * mx.random.normal(m.e_score_correction_bias.shape)
    for layer in model.model.layers:
        families.sharpen(layer.self_attn, ATTENTION_SHARPNESS)
    tied = config.get("tie_word_embeddings", False)
    if not tied:
        model.model.embed_tokens.weight = model.model.embed_tokens.weight * EMBED_SCALE
        model.lm_head.weight = _vary(model, allowed)
    # The top logit of a few hundred random logits is positive with
    # overwhelming probability, so the zero rows never win the argmax.
    head = model.model.embed_tokens if tied else model.lm_head
    keep = mx.zeros((head.weight.shape[0], 1))
    keep[mx.array(allowed)] = 1.0
    head.weight = head.weight * keep
    # Scaling the final norm (not the head) leaves tied input embeddings alone.
    rms = mx.sqrt(mx.sum(head.weight**2) / (len(allowed) * head.weight.shape[1]))
    scale = logit_std / (rms * math.sqrt(head.weight.shape[1]))
    model.model.norm.weight = model.model.norm.weight * scale


def _vary(model: nn.Module, allowed: list) -> mx.array:
    """The untied head, blind to the hidden states' shared direction and
    leaning every printable token towards its successor on a random cycle."""
    head = model.lm_head.weight
    ids = mx.array(allowed)
    sample = ids[mx.random.randint(0, len(allowed), (4, 128))]
    mean = model.model(sample).reshape(-1, head.shape[1]).mean(axis=0)
    u = mean / mx.linalg.norm(mean)
    head = head - (head @ u)[:, None] * u
    row = mx.linalg.norm(head[ids], axis=-1).mean()
    cycle = ids[mx.random.permutation(len(allowed))]
    embed = model.model.embed_tokens.weight[cycle]
    lean = embed / mx.linalg.norm(embed, axis=-1, keepdims=True)
    head[mx.roll(cycle, -1)] = head[mx.roll(cycle, -1)] + SUCCESSOR_BIAS * row * lean
    return head


def _skew(model: nn.Module, hot: list, boost: float = HOT_BOOST):
    """Make the ``hot`` experts win the gate for (almost) every token, in every MoE layer.

    A constant direction ``c`` is added to every embedding row, so every
    hidden state carries it; the hot experts' gate rows point along ``c`` (as
    the MoE input norm scales it), which raises their logits by about
    ``boost``. The head is made blind to ``c``, so the text still depends on
    the prompt.
    """
    embed = model.model.embed_tokens
    c = mx.random.normal((embed.weight.shape[-1],))
    c = 1.5 * mx.sqrt(mx.mean(mx.sum(embed.weight**2, axis=-1))) * c / mx.linalg.norm(c)
    embed.weight = embed.weight + c
    rows = mx.array(hot)
    for layer in model.model.layers:
        gate = getattr(getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None), "gate", None)
        if gate is None or "weight" not in gate:
            continue
        u = c * layer.post_attention_layernorm.weight
        w = gate.weight
        w[rows] = w[rows] + boost / math.sqrt(w.shape[-1]) * u / mx.linalg.norm(u)
        gate.weight = w
    u = c * model.model.norm.weight
    u = u / mx.linalg.norm(u)
    model.lm_head.weight = model.lm_head.weight - (model.lm_head.weight @ u)[:, None] * u


def write_tiny_model(
    path: Union[str, Path],
    *,
    model_type: str = "qwen3_moe",
    layout: str = "mlx",
    quantize: Optional[Dict[str, int]] = None,
    seed: int = 0,
    num_shards: int = 3,
    config_overrides: Optional[Dict[str, Any]] = None,
    logit_std: float = LOGIT_STD,
    hot_experts: Sequence[int] = (),
) -> Path:
    """Write a tiny random-weight checkpoint that ``mlx_lm.load`` can read.

    Args:
        path: Output directory; created if missing. Files are overwritten and
            stale ``model*.safetensors`` shards removed.
        model_type: An mlx-lm model family with an entry in ``DEFAULT_CONFIGS``.
        layout: ``"mlx"`` for stacked ``switch_mlp`` experts ``[E, out, in]``
            (mlx-community layout) or ``"hf"`` for per-expert tensors.
        quantize: ``None`` or ``{"bits": b, "group_size": g}``, optionally
            with ``"recipe"``: one of mlx-lm's mixed recipes (``"mixed_3_6"``
            ...), which records per-layer bits in the config as
            ``mlx_lm.convert`` does; quantizes with
            ``mlx_lm.utils.quantize_model`` (mlx layout only).
        seed: Seed for all weights (reseeds mlx's global PRNG); the same
            seed writes the same bytes.
        num_shards: Number of ``model-*.safetensors`` files.
        config_overrides: Merged into the default config before building.
        logit_std: Spread of the logits. The default is large, so greedy
            decoding never meets a near-tie; real models' logits are tens.
        hot_experts: Experts that win the gate for nearly every token in
            every MoE layer (skewed routing, for balancing tests); with top-k
            routing each takes about 1/k of the token-slots. Untied heads only.

    Returns:
        The checkpoint directory.

    Raises:
        ValueError: On an unknown model type or layout, quantizing an ``hf``
            layout, a ``num_shards`` out of range, or hot experts with a tied head.
    """
    if model_type not in DEFAULT_CONFIGS:
        raise ValueError(f"Model type {model_type} not supported.")
    if layout not in ("mlx", "hf"):
        raise ValueError(f"Unknown layout {layout!r}, expected 'mlx' or 'hf'.")
    if quantize is not None and layout != "mlx":
        raise ValueError("Quantized checkpoints are written in the mlx layout only.")
    path = Path(path)
    n_tokens = write_tokenizer(path)
    allowed = _printable_ids(path)
    config = copy.deepcopy(DEFAULT_CONFIGS[model_type])
    config.update(
        vocab_size=-(-n_tokens // 64) * 64,
        bos_token_id=SPECIAL_TOKENS.index("<|endoftext|>"),
        eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
    )
    config.update(copy.deepcopy(config_overrides or {}))

    arch = importlib.import_module(f"mlx_lm.models.{model_type}")
    mx.random.seed(seed)
    model = arch.Model(arch.ModelArgs.from_dict(config))
    _randomise(model, config, allowed, logit_std)
    if hot_experts:
        if config.get("tie_word_embeddings"):
            raise ValueError("hot_experts needs an untied head (tie_word_embeddings false).")
        _skew(model, list(hot_experts))
    if quantize is not None:
        predicate = None
        if quantize.get("recipe"):
            predicate = mixed_quant_predicate_builder(
                quantize["recipe"], model, quantize["group_size"]
            )
        with contextlib.redirect_stdout(io.StringIO()):
            model, config = quantize_model(
                model, config, quantize["group_size"], quantize["bits"],
                quant_predicate=predicate,
            )
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    if layout == "hf":
        weights = to_hf(weights, model_type, config)
    write_shards(path, weights, num_shards, "pt" if layout == "hf" else "mlx")
    save_config(config, config_path=path / "config.json")
    logger.info("Wrote %s %s checkpoint to %s", model_type, layout, path)
    return path


def default_model_dir() -> Path:
    """The demo model directory: ``$EXPERTMESH_HOME/models/tiny-qwen3-moe``.

    ``EXPERTMESH_HOME`` defaults to ``~/.cache/expertmesh``.
    """
    home = os.environ.get("EXPERTMESH_HOME") or Path.home() / ".cache/expertmesh"
    return Path(home) / "models" / "tiny-qwen3-moe"


def ensure_demo_model(path: Optional[Union[str, Path]] = None) -> Path:
    """Write the float32 mlx-layout tiny model unless ``config.json`` exists.

    Args:
        path: Checkpoint directory; defaults to :func:`default_model_dir`.

    Returns:
        The checkpoint directory.
    """
    path = Path(path) if path is not None else default_model_dir()
    if not (path / "config.json").exists():
        write_tiny_model(path)
    return path


def setup_arg_parser():
    parser = argparse.ArgumentParser(prog="python -m expertmesh.testing.tinymodel",
                                     description="Write a tiny random MoE checkpoint.")
    parser.add_argument("out_dir", type=Path, help="Checkpoint directory.")
    parser.add_argument("--model-type", default="qwen3_moe", choices=[*DEFAULT_CONFIGS])
    parser.add_argument("--layout", default="mlx", choices=["mlx", "hf"])
    parser.add_argument("--bits", type=int, help="Quantize to this many bits.")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--recipe", help="mlx-lm mixed quantization recipe, e.g. mixed_3_6")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-shards", type=int, default=3)
    parser.add_argument("--hot-experts", type=int, nargs="*", default=[], metavar="E",
                        help="experts that take nearly every token (skewed routing)")
    return parser


def main():
    args = setup_arg_parser().parse_args()
    logging.basicConfig(level=logging.INFO)
    quantize = {"bits": args.bits, "group_size": args.group_size, "recipe": args.recipe}
    path = write_tiny_model(
        args.out_dir,
        model_type=args.model_type,
        layout=args.layout,
        quantize=quantize if args.bits or args.recipe else None,
        seed=args.seed,
        num_shards=args.num_shards,
        hot_experts=args.hot_experts,
    )
    print(path)


if __name__ == "__main__":
    main()
