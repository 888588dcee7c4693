"""Writing checkpoints in the on-disk layouts mlx-lm and Hugging Face read.

The Hugging Face per-expert names of each family (those each mlx-lm model's
``sanitize`` expects), sharded ``model-*.safetensors`` with their index, and
the ChatML tokenizer files. Used by the built-in models' ``write_variant``
and training, and by the test checkpoints (``expertmesh.testing.tinymodel``).
"""

from __future__ import annotations

import bisect
import itertools
import json
from pathlib import Path
from typing import Any, Callable, Dict, List

import mlx.core as mx

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' "
    "+ message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SAME = {p: p for p in ("gate_proj", "up_proj", "down_proj")}

# Hugging Face names of the per-expert projections, keyed by model_type and
# by the name of the stacked SwitchGLU projection they come from.
HF_EXPERT_NAMES: Dict[str, Dict[str, str]] = {
    "qwen3_moe": _SAME,
    "qwen2_moe": _SAME,
    "mixtral": {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"},
    "deepseek_v2": _SAME,
    "deepseek_v3": _SAME,
    "olmoe": _SAME,
}


def _deepseek_v3_kv_b_proj(weights: Dict[str, mx.array], config: dict) -> Dict[str, mx.array]:
    """Undo mlx-lm's split of ``kv_b_proj`` into ``embed_q``/``unembed_out``."""
    out = {}
    for k, v in weights.items():
        if k.endswith(".self_attn.embed_q.weight"):
            prefix = k[: -len("embed_q.weight")]
            wv = weights[prefix + "unembed_out.weight"]
            kv_b = mx.concatenate([v.swapaxes(-1, -2), wv], axis=1)
            out[prefix + "kv_b_proj.weight"] = kv_b.reshape(-1, config["kv_lora_rank"])
        elif not k.endswith(".self_attn.unembed_out.weight"):
            out[k] = v
    return out


# model_type -> fn(weights, config) for the Hugging Face names of non-expert tensors
HF_OTHER_NAMES: Dict[str, Callable[[Dict[str, mx.array], dict], Dict[str, mx.array]]] = {
    "deepseek_v3": _deepseek_v3_kv_b_proj,
}


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON with a final newline."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def save_tokenizer(tok: Any, path: Path, max_length: int) -> None:
    """A ``tokenizers.Tokenizer`` as ``tokenizer.json``, with a ``tokenizer_config.json``
    (ChatML template) and ``special_tokens_map.json``."""
    tok.save(str(path / "tokenizer.json"))
    specials = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    write_json(path / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "clean_up_tokenization_spaces": False,
        "model_max_length": max_length, "chat_template": CHAT_TEMPLATE, **specials})
    write_json(path / "special_tokens_map.json", specials)


def to_hf(weights: Dict[str, mx.array], model_type: str, config: dict) -> Dict[str, mx.array]:
    """mlx-lm's stacked ``switch_mlp`` weights under Hugging Face per-expert names.

    Raises:
        ValueError: a family without Hugging Face names here.
    """
    names = HF_EXPERT_NAMES.get(model_type)
    if names is None:
        raise ValueError(f"No Hugging Face expert names for {model_type}.")
    if model_type in HF_OTHER_NAMES:
        weights = HF_OTHER_NAMES[model_type](weights, config)
    out = {}
    for k, v in weights.items():
        parent, sep, rest = k.partition(".switch_mlp.")
        if not sep:
            out[k] = v
            continue
        proj, param = rest.split(".", 1)
        for e in range(v.shape[0]):
            out[f"{parent}.experts.{e}.{names[proj]}.{param}"] = v[e]
    return out


def shard_names(weights: Dict[str, mx.array], num_shards: int) -> List[List[str]]:
    """The sorted tensor names cut into ``num_shards`` runs of about equal bytes.

    Raises:
        ValueError: ``num_shards`` outside ``[1, len(weights)]``.
    """
    names = sorted(weights)
    if not 1 <= num_shards <= len(names):
        raise ValueError(f"num_shards must be in [1, {len(names)}]: {num_shards}")
    before = list(itertools.accumulate((weights[n].nbytes for n in names), initial=0))
    bounds = [0]
    for s in range(1, num_shards):
        b = bisect.bisect_left(before, before[-1] * s / num_shards, hi=len(names))
        bounds.append(min(max(b, bounds[-1] + 1), len(names) - (num_shards - s)))
    bounds.append(len(names))
    return [names[a:b] for a, b in zip(bounds, bounds[1:])]


def write_shards(path: Path, weights: Dict[str, mx.array], num_shards: int, fmt: str) -> None:
    """``model-*-of-*.safetensors`` (metadata ``format``: ``fmt``) and their
    ``model.safetensors.index.json``; stale ``model*.safetensors`` are removed.

    Raises:
        ValueError: ``num_shards`` out of range (nothing written).
    """
    shards = shard_names(weights, num_shards)
    for stale in path.glob("model*.safetensors"):
        stale.unlink()
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        mx.save_safetensors(str(path / fname), {k: weights[k] for k in names}, metadata={"format": fmt})
        weight_map.update((k, fname) for k in names)
    write_json(path / "model.safetensors.index.json", {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": dict(sorted(weight_map.items()))})
