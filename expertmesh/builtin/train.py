"""Train the built-in models: a small ``qwen3_moe`` and its draft, on CPython's standard library.

``python -m expertmesh.builtin.train OUT_DIR`` writes ``OUT_DIR/stdlib-moe``
(the MoE) and ``OUT_DIR/stdlib-draft`` (a one-layer dense ``qwen3`` with the same
tokenizer), each in the MLX layout with a ChatML chat template, a
``provenance.json`` (corpus, seed, steps, tokens seen, losses) and the
model's ``vocabulary.txt`` (the corpus's word and identifier tokens).

The corpus is :data:`CORPUS_FILES`, in that order, from the Debian package
``libpython3.11-stdlib`` 3.11.2-6+deb12u6 (``/usr/lib/python3.11``; CPython
3.11.2, Python Software Foundation License Version 2). Its SHA-256 is
checked, so a rerun on the same corpus with the same seed writes the same
bytes (MLX's CPU backend; the tokenizer is trained with ``tokenizers``) given
the same BLAS. The shipped models were trained on 2 shared cores in 21 minutes
with OpenBLAS (Debian's ``libopenblas0-pthread``) in place of the reference BLAS
that mlx's Linux wheel bundles, 12x slower at matrix products::

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \\
        nice python -m expertmesh.builtin.train OUT_DIR
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import qwen3, qwen3_moe
from mlx_lm.utils import save_config, save_model
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from . import DRAFT_NAME, MODEL_NAME
from ..layouts import SPECIAL_TOKENS, save_tokenizer, write_json

logger = logging.getLogger(__name__)

CORPUS_DIR = Path("/usr/lib/python3.11")
CORPUS_PROVENANCE = ("Debian package libpython3.11-stdlib 3.11.2-6+deb12u6 (/usr/lib/python3.11): "
                     "CPython 3.11.2 standard library, Python Software Foundation License Version 2")
# the top-level modules, sorted; not Debian's own files (_sysconfigdata*, sitecustomize,
# _distutils_system_mod) nor this.py (rot13 text) and __hello__.py
CORPUS_FILES = tuple("""
__future__ _aix_support _bootsubprocess _collections_abc _compat_pickle _compression _markupbase
_osx_support _py_abc _pydecimal _pyio _sitebuiltins _strptime _threading_local _weakrefset abc aifc
antigravity argparse ast asynchat asyncore base64 bdb bisect bz2 cProfile calendar cgi cgitb chunk cmd
code codecs codeop colorsys compileall configparser contextlib contextvars copy copyreg crypt csv
dataclasses datetime decimal difflib dis doctest enum filecmp fileinput fnmatch fractions ftplib
functools genericpath getopt getpass gettext glob graphlib gzip hashlib heapq hmac imaplib imghdr imp
inspect io ipaddress keyword linecache locale lzma mailbox mailcap mimetypes modulefinder netrc nntplib
ntpath nturl2path numbers opcode operator optparse os pathlib pdb pickle pickletools pipes pkgutil
platform plistlib poplib posixpath pprint profile pstats pty py_compile pyclbr pydoc queue quopri random
reprlib rlcompleter runpy sched secrets selectors shelve shlex shutil signal site smtpd smtplib sndhdr
socket socketserver sre_compile sre_constants sre_parse ssl stat statistics string stringprep struct
subprocess sunau symtable sysconfig tabnanny tarfile telnetlib tempfile textwrap threading timeit token
tokenize trace traceback tracemalloc tty turtle types typing uu uuid warnings wave weakref webbrowser
xdrlib zipapp zipfile zipimport
""".split())
CORPUS_SHA256 = "7f0f50b4f418f3530b09fb254623d49252518ad9bfcd56d44eebdfea18087241"
VALIDATION_EVERY = 16  # every 16th file (from the 8th) is held out for validation
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

MODEL_CONFIG = {
    "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
    "hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 32, "intermediate_size": 512, "moe_intermediate_size": 128, "num_experts": 16,
    "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 1024,
    "tie_word_embeddings": False, "hidden_act": "silu",
}
DRAFT_CONFIG = {
    "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
    "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
    "head_dim": 32, "intermediate_size": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "max_position_embeddings": 1024, "tie_word_embeddings": True, "hidden_act": "silu",
}


@dataclass
class TrainConfig:
    """How one model is trained; recorded in its ``provenance.json``."""

    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 128
    learning_rate: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    eval_batches: int = 16


def corpus_texts(corpus_dir: Path = CORPUS_DIR, files=CORPUS_FILES, check: bool = True) -> list[str]:
    """The corpus files' texts, in order.

    Raises:
        ValueError: ``check`` and the files are not the recorded corpus.
    """
    texts = [(Path(corpus_dir) / f"{name}.py").read_text(encoding="utf-8") for name in files]
    digest = corpus_sha256(texts)
    if check and digest != CORPUS_SHA256:
        raise ValueError(f"{corpus_dir} is not the recorded corpus (sha256 {digest}, expected "
                         f"{CORPUS_SHA256}): {CORPUS_PROVENANCE}")
    return texts


def corpus_sha256(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()


def split(texts: list[str]) -> tuple[list[str], list[str]]:
    """(training, validation) texts: every ``VALIDATION_EVERY``-th file is held out."""
    val = [t for i, t in enumerate(texts) if i % VALIDATION_EVERY == VALIDATION_EVERY // 2]
    train = [t for i, t in enumerate(texts) if i % VALIDATION_EVERY != VALIDATION_EVERY // 2]
    return train, val


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer (ChatML special tokens first) trained on ``texts``."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    """All texts' token ids, each file followed by ``<|endoftext|>``."""
    eot = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.array(ids, dtype=np.int32)


def model_config(base: dict, tok: Tokenizer) -> dict:
    eot, eos = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    return {**base, "vocab_size": tok.get_vocab_size(), "bos_token_id": eot, "eos_token_id": [eos, eot],
            "torch_dtype": "float32"}


def build(config: dict, seed: int) -> nn.Module:
    """mlx-lm's own model class for ``config``, initialised from ``seed``."""
    arch = {"qwen3_moe": qwen3_moe, "qwen3": qwen3}[config["model_type"]]
    mx.random.seed(seed)
    model = arch.Model(arch.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


def _loss(model: nn.Module, x: mx.array, y: mx.array) -> mx.array:
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def windows(tokens: np.ndarray, rng: np.random.Generator, batch: int, seq_len: int) -> tuple[mx.array, mx.array]:
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch)
    w = np.stack([tokens[s:s + seq_len + 1] for s in starts])
    return mx.array(w[:, :-1]), mx.array(w[:, 1:])


def evaluate(model: nn.Module, tokens: np.ndarray, cfg: TrainConfig) -> float:
    """Mean loss over ``cfg.eval_batches`` fixed windows of ``tokens``."""
    rng = np.random.default_rng(cfg.seed + 1)
    losses = [_loss(model, *windows(tokens, rng, cfg.batch_size, cfg.seq_len)).item()
              for _ in range(cfg.eval_batches)]
    return float(np.mean(losses))


def train(model: nn.Module, tokens: np.ndarray, cfg: TrainConfig, log_every: int = 100) -> list[float]:
    """AdamW with warm-up and cosine decay on random windows drawn from ``cfg.seed``.

    Returns:
        The training loss of every step.
    """
    schedule = optim.join_schedules(
        [optim.linear_schedule(cfg.learning_rate / 100, cfg.learning_rate, cfg.warmup),
         optim.cosine_decay(cfg.learning_rate, max(1, cfg.steps - cfg.warmup), cfg.learning_rate / 10)],
        [cfg.warmup])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)
    loss_and_grad = nn.value_and_grad(model, _loss)
    state = [model.state, optimizer.state]

    def step(x, y):
        loss, grads = loss_and_grad(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    rng = np.random.default_rng(cfg.seed)
    losses = []
    start = time.monotonic()
    for i in range(cfg.steps):
        loss = step(*windows(tokens, rng, cfg.batch_size, cfg.seq_len))
        mx.eval(state, loss)
        losses.append(loss.item())
        if log_every and (i + 1) % log_every == 0:
            logger.info("step %d/%d loss %.3f (%.0f tok/s)", i + 1, cfg.steps, np.mean(losses[-log_every:]),
                        (i + 1) * cfg.batch_size * cfg.seq_len / (time.monotonic() - start))
    return losses


VOCAB_SIZE = 4096
MODEL_TRAINING = TrainConfig(steps=750)
DRAFT_TRAINING = TrainConfig(steps=500)


def vocabulary(texts: list[str]) -> list[str]:
    """The corpus's word and identifier tokens (``[A-Za-z_][A-Za-z0-9_]*``), sorted."""
    return sorted({w for t in texts for w in WORD.findall(t)})


def write_checkpoint(model: nn.Module, config: dict, tok: Tokenizer, path: Path, record: dict,
                     words: list[str]) -> None:
    """The model in float32 (the MLX layout; CPU GatherMM needs float32), its tokenizer, vocabulary and provenance."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("model*.safetensors"):
        stale.unlink()
    save_model(path, model)
    save_config(config, config_path=path / "config.json")
    save_tokenizer(tok, path, MODEL_CONFIG["max_position_embeddings"])
    if words:
        (path / "vocabulary.txt").write_text("\n".join(words) + "\n")
    write_json(path / "provenance.json", record)


def train_one(base: dict, cfg: TrainConfig, tok: Tokenizer, train_ids: np.ndarray, val_ids: np.ndarray,
              log_every: int = 50) -> tuple[nn.Module, dict, dict]:
    """Build, train and evaluate one model; returns (model, config, record)."""
    config = model_config(base, tok)
    model = build(config, cfg.seed)
    start = time.monotonic()
    losses = train(model, train_ids, cfg, log_every)
    record = {
        "training": asdict(cfg),
        "parameters": sum(v.size for _, v in tree_flatten(model.parameters())),
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "train_loss_last_100": round(float(np.mean(losses[-100:])), 4),
        "validation_loss": round(evaluate(model, val_ids, cfg), 4),
        "wall_s": round(time.monotonic() - start, 1),
    }
    logger.info("%s: %s", config["model_type"], record)
    return model, config, record


def environment() -> dict:
    """What the bytes depend on besides the seed: MLX's version and the BLAS it runs on."""
    return {"mlx": importlib.metadata.version("mlx"), "tokenizers": importlib.metadata.version("tokenizers"),
            **{k: os.environ[k] for k in ("LD_PRELOAD", "OPENBLAS_NUM_THREADS") if k in os.environ}}


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help=f"writes OUT_DIR/{MODEL_NAME} and OUT_DIR/{DRAFT_NAME}")
    parser.add_argument("--corpus-dir", type=Path, default=CORPUS_DIR)
    parser.add_argument("--steps", type=int, default=MODEL_TRAINING.steps, help="training steps of the MoE")
    parser.add_argument("--draft-steps", type=int, default=DRAFT_TRAINING.steps)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = setup_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    texts = corpus_texts(args.corpus_dir)
    train_texts, val_texts = split(texts)
    tok = train_tokenizer(train_texts, VOCAB_SIZE)
    train_ids, val_ids = encode(tok, train_texts), encode(tok, val_texts)
    words = vocabulary(texts)
    corpus = {"provenance": CORPUS_PROVENANCE, "files": len(CORPUS_FILES), "sha256": CORPUS_SHA256,
              "train_tokens": len(train_ids), "validation_tokens": len(val_ids),
              "validation_files": [f for i, f in enumerate(CORPUS_FILES)
                                   if i % VALIDATION_EVERY == VALIDATION_EVERY // 2]}
    logger.info("corpus: %d training tokens, %d validation tokens", len(train_ids), len(val_ids))
    for name, base, cfg in ((MODEL_NAME, MODEL_CONFIG, MODEL_TRAINING), (DRAFT_NAME, DRAFT_CONFIG, DRAFT_TRAINING)):
        cfg = TrainConfig(**{**asdict(cfg), "steps": args.steps if name == MODEL_NAME else args.draft_steps,
                             "seed": args.seed})
        model, config, record = train_one(base, cfg, tok, train_ids, val_ids)
        record = {"corpus": corpus, "command": "python -m expertmesh.builtin.train OUT_DIR",
                  "environment": environment(), **record}
        write_checkpoint(model, config, tok, args.out_dir / name, record, words if name == MODEL_NAME else [])
    print(args.out_dir)


if __name__ == "__main__":
    main()
