"""The built-in models, shipped with the package: a small ``qwen3_moe`` trained
on CPython's standard library (``stdlib-moe``) and a one-layer dense draft
with the same tokenizer (``stdlib-draft``).

Both are float32 checkpoints in the MLX layout with a ChatML chat template;
:func:`write_variant` writes the Hugging Face per-expert layout or a
quantized copy of the model on demand. They were trained by
``python -m expertmesh.builtin.train`` (each directory's ``provenance.json``
says on what, how long, and the losses).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from pathlib import Path

from mlx.utils import tree_flatten
from mlx_lm.utils import load_model, quantize_model, save_config, save_model

from ..layouts import to_hf, write_shards

logger = logging.getLogger(__name__)

MODEL_NAME = "stdlib-moe"
DRAFT_NAME = "stdlib-draft"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def model_dir() -> Path:
    """The trained ``qwen3_moe`` checkpoint inside the installed package (read-only)."""
    return Path(__file__).parent / MODEL_NAME


def draft_dir() -> Path:
    """The trained draft checkpoint (dense ``qwen3``, one layer, the model's tokenizer)."""
    return Path(__file__).parent / DRAFT_NAME


def vocabulary() -> set[str]:
    """The word and identifier tokens of the model's training corpus."""
    return set((model_dir() / "vocabulary.txt").read_text().split())


def write_variant(out: str | Path, *, layout: str = "mlx", bits: int | None = None, group_size: int = 64,
                  num_shards: int = 2) -> Path:
    """Write the built-in model in another layout or quantized.

    Args:
        out: Output directory; created if missing, its ``model*.safetensors`` replaced.
        layout: ``"hf"`` for per-expert tensors (``experts.N.gate_proj`` ..., as
            Hugging Face checkpoints have them) or ``"mlx"`` (stacked ``switch_mlp``).
        bits: Quantize with ``mlx_lm.utils.quantize_model`` (mlx layout only).
        group_size: The quantization group size.
        num_shards: Weight files of the ``hf`` layout.

    Returns:
        The checkpoint directory.

    Raises:
        ValueError: An unknown layout, or quantizing the ``hf`` layout.
    """
    if layout not in ("mlx", "hf"):
        raise ValueError(f"Unknown layout {layout!r}, expected 'mlx' or 'hf'.")
    if bits is not None and layout != "mlx":
        raise ValueError("Quantized checkpoints are written in the mlx layout only.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("model*.safetensors"):
        stale.unlink()
    model, config = load_model(model_dir())
    if bits is not None:
        with contextlib.redirect_stdout(io.StringIO()):
            model, config = quantize_model(model, config, group_size, bits)
    if layout == "mlx":
        save_model(out, model)
    else:
        weights = to_hf(dict(tree_flatten(model.parameters())), config["model_type"], config)
        write_shards(out, weights, num_shards, "pt")
    save_config(config, config_path=out / "config.json")
    for name in TOKENIZER_FILES:
        shutil.copyfile(model_dir() / name, out / name)
    logger.info("wrote the built-in model (%s layout%s) to %s", layout, f", {bits}-bit" if bits else "", out)
    return out
