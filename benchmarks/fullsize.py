"""A full-size run: Qwen3-30B-A3B's whole shape (48 layers, ~17 GB at 4 bits,
random weights) served by 2 node processes, against local mlx-lm.

    python benchmarks/fullsize.py write DIR [--layers 48] [--small]
    python benchmarks/fullsize.py bench DIR --out OUT.json [--tokens 32] [--repeats 1] [--memory-gb 12] [--no-mps]

``write`` builds the checkpoint with mlx-lm's own pieces (``qwen3_moe.Model``,
``quantize_model`` with the model's predicate: 4-bit, the gate 8-bit;
``save_model``: 5 GB shards and an index, as mlx-community ships), its weights
lazy random arrays evaluated shard by shard as they are saved. The tokenizer is
the test suite's small one; the head's rows of every other id are zero, so
greedy decoding always emits a printable token and never stops early.
``--small``: the same at small widths (a smoke run off the GPU).

``bench``: local mlx-lm's load time (weights evaluated, first token), then
for each router mode 2 nodes and a router (load time until the first token,
each node's memory) and decode / prefill tok/s, trials alternating with local
mlx-lm; under CUDA MPS where the machine has it. The JSON is rewritten after
each mode.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import device  # noqa: E402  (imports no mlx: MPS must be up before this process's CUDA context)

# Qwen3-30B-A3B's config.json, as mlx-lm's ModelArgs reads it
CONFIG = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=2048,
              num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
              moe_intermediate_size=768, intermediate_size=6144, num_experts=128, num_experts_per_tok=8,
              decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, vocab_size=151936,
              rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=40960,
              tie_word_embeddings=False, hidden_act="silu", torch_dtype="bfloat16")
SMALL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             moe_intermediate_size=128, intermediate_size=512, num_experts=16, num_experts_per_tok=4)
GROUP_SIZE, BITS = 64, 4


def write_checkpoint(out: Path, layers: int | None = None, small: bool = False) -> dict:
    """Write the random-weight checkpoint to ``out``; returns its config.

    Weights are made in bfloat16 (as mlx-community's checkpoints are) and stay
    lazy until ``save_model`` evaluates each shard as it writes it, so the
    peak memory is about a shard plus a few tensors in float32, not the
    model in float32. Shards left in ``out`` by an earlier write are removed.
    """
    import mlx.core as mx
    from mlx_lm.models import qwen3_moe
    from mlx_lm.utils import quantize_model, save_config, save_model

    from expertmesh.layouts import SPECIAL_TOKENS
    from expertmesh.testing.tinymodel import _printable_ids, write_tokenizer

    for stale in out.glob("model*.safetensors*"):
        stale.unlink()
    write_tokenizer(out)
    allowed = _printable_ids(out)  # no special token among them: no EOS, no <|im_start|>
    config = {**CONFIG, **(SMALL if small else {}), "bos_token_id": SPECIAL_TOKENS.index("<|endoftext|>"),
              "eos_token_id": SPECIAL_TOKENS.index("<|im_end|>")}
    config["num_hidden_layers"] = layers or config["num_hidden_layers"]
    mx.random.seed(0)
    model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    with contextlib.redirect_stdout(io.StringIO()):  # its "[INFO] Quantized ..." line
        model, config = quantize_model(model, config, GROUP_SIZE, BITS)
    # A zero row's scales and biases dequantize to a zero row: its logit is
    # exactly 0, below the top random logit of the printable ids.
    head = model.lm_head
    keep = mx.zeros((config["vocab_size"], 1), dtype=head.scales.dtype)
    keep[mx.array(allowed)] = 1
    head.scales, head.biases = head.scales * keep, head.biases * keep
    save_model(out, model, donate_model=True)
    save_config(config, config_path=out / "config.json")
    return config


def checkpoint_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.glob("*.safetensors"))


def gpu_memory(pids: dict[str, int]) -> dict[str, float | None] | None:
    """GB of GPU memory each named process holds, and the GPU's total in use
    (``"gpu"``), from nvidia-smi; None without it (a process it does not
    list, e.g. from another pid namespace or behind MPS's server: None)."""
    def query(*args: str) -> list[str] | None:
        try:
            out = subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.splitlines() if out.returncode == 0 else None

    if (apps := query("--query-compute-apps=pid,used_memory")) is None:
        return None
    used: dict[int, float] = {}
    for line in apps:
        with contextlib.suppress(ValueError):
            pid, mib = line.split(",")
            used[int(pid)] = float(mib) * 2**20 / 1e9
    total = query("--query-gpu=memory.used")
    return {**{name: used.get(pid) for name, pid in pids.items()},
            "gpu": float(total[0]) * 2**20 / 1e9 if total else None}


def rss_gb(pid: int) -> float | None:
    """GB of host memory process ``pid`` has resident (Linux's /proc), or None."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e9
    return None


def counted(generate: Callable, seen: list[int]) -> Callable:
    """``generate`` that records how many tokens each generation it ran to the end produced."""
    def run_(prompt: str, max_tokens: int) -> Iterator:
        last = None
        for last in generate(prompt, max_tokens=max_tokens):
            yield last
        seen.append(last.generation_tokens if last is not None else 0)
    return run_


def serve(mode: str, model: Path, local: Callable, args: argparse.Namespace, logs: Path, prompt_512: str,
          tokens_512: int) -> dict:
    """One router mode on 2 nodes: load time, memory, then decode and prefill
    trials alternating with local mlx-lm (one warm-up round, ``args.repeats`` timed)."""
    import run

    from expertmesh import Client

    x = "" if mode == run.DEFAULT_MODE else f"_{mode}"
    run.step(f"{mode} mode: starting 2 nodes and a router")
    t = time.perf_counter()
    mesh = run.Mesh(model, 2, logs, mode=mode, memory_gb=args.memory_gb)
    r: dict = {}
    try:
        with Client(mesh.address) as c:
            r[f"ready_s_mesh{x}"] = time.perf_counter() - t  # the router listening, its nodes loaded
            next(iter(c.generate(run.PROMPT, max_tokens=1)))
            r[f"load_s_mesh{x}"] = time.perf_counter() - t
            cluster = c.cluster()
            r[f"plan{x}"] = run.plan_text(cluster)
            r[f"node_memory_gb{x}"] = {n.name: n.memory_used_bytes / 1e9 for n in cluster.nodes}
            r[f"node_budget_gb{x}"] = {n.name: n.memory_budget_bytes / 1e9 for n in cluster.nodes}
            names = [*(f"node{i}" for i in range(len(mesh.procs) - 1)), "router"]
            pids = {"local": os.getpid(), **{n: p.proc.pid for n, p in zip(names, mesh.procs)}}
            r[f"gpu_memory_gb{x}"] = gpu_memory(pids)
            r[f"rss_gb{x}"] = {name: rss_gb(pid) for name, pid in pids.items()}
            run.step(f"{mode} mode: loaded in {r[f'load_s_mesh{x}']:.1f}s; decode and prefill, alternating")
            trials: dict[str, list[float]] = {k: [] for k in ("dl", "pl", "dm", "pm")}
            seen: dict[str, list[int]] = {"l": [], "m": []}
            for _ in range(args.repeats + 1):  # the first round warms both up
                for key, generate in (("l", local), ("m", c.generate)):
                    d, p = run.trial(counted(generate, seen[key]), args.tokens, prompt_512, tokens_512)
                    trials["d" + key].append(d)
                    trials["p" + key].append(p)
    finally:
        mesh.close()
    m = {k: statistics.median(v[1:]) for k, v in trials.items()}
    r.update({f"decode_tps_local{x}": m["dl"], f"prefill_tps_local{x}": m["pl"], f"decode_tps_mesh{x}": m["dm"],
              f"prefill_tps_mesh{x}": m["pm"], f"decode_ratio{x}": m["dm"] / m["dl"],
              f"prefill_ratio{x}": m["pm"] / m["pl"],
              f"decode_tokens_local{x}": min(seen["l"]), f"decode_tokens_mesh{x}": min(seen["m"])})
    return r


def bench(args: argparse.Namespace) -> int:
    model: Path = args.model
    config = json.loads((model / "config.json").read_text())
    results: dict = {"command": " ".join(["benchmarks/fullsize.py", *sys.argv[1:]]),
                     "layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"],
                     "num_experts": config["num_experts"], "checkpoint_gb": checkpoint_bytes(model) / 1e9,
                     "nodes": 2, "tokens": args.tokens, "repeats": args.repeats, "memory_gb": args.memory_gb,
                     "gpu": device.gpu_name(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    with device.mps(not args.no_mps, results):
        import mlx.core as mx  # after MPS is up: this process's CUDA context joins it

        import run
        from mlx_lm.utils import load_tokenizer

        results["device"], results["mlx"] = str(mx.default_device()), mx.__version__
        prompt_512 = run.long_prompt(model, 512)
        tokens_512 = len(load_tokenizer(model).encode(prompt_512))
        run.step(f"local mlx-lm: loading {results['checkpoint_gb']:.1f} GB")
        t = time.perf_counter()
        local = run.local_generate(model)
        next(iter(local(run.PROMPT, max_tokens=1)))
        results["load_s_local"] = time.perf_counter() - t
        results["memory_gb_local"] = mx.get_active_memory() / 1e9
        run.step(f"local mlx-lm: loaded in {results['load_s_local']:.1f}s")
        run.write(results, args.out, table=False)
        logs = Path(tempfile.mkdtemp(prefix="expertmesh-fullsize-"))
        for mode in args.modes:
            results.update(serve(mode, model, local, args, logs, prompt_512, tokens_512))
            run.write(results, args.out, table=False)
    results["seconds"] = round(time.perf_counter() - run._T0, 1)
    run.write(results, args.out)
    short = [k for k, v in results.items() if k.startswith("decode_tokens") and v < args.tokens]
    if short:
        print(f"warning: fewer than {args.tokens} tokens decoded in {', '.join(short)}", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the random-weight checkpoint")
    w.add_argument("model", type=Path, metavar="DIR")
    w.add_argument("--layers", type=int, default=None, help="layers (default 48; 4 with --small)")
    w.add_argument("--small", action="store_true", help="small widths: a smoke run off the GPU")
    b = sub.add_parser("bench", help="serve it with 2 nodes against local mlx-lm")
    b.add_argument("model", type=Path, metavar="DIR")
    b.add_argument("--out", type=Path, required=True, help="where the JSON goes")
    b.add_argument("--tokens", type=int, default=32, help="tokens per decode trial")
    b.add_argument("--repeats", type=int, default=1, help="timed rounds after the warm-up round")
    b.add_argument("--memory-gb", type=float, default=12, help="each node's memory budget for experts")
    b.add_argument("--modes", nargs="+", choices=("auto", "expert"), default=["auto", "expert"])
    b.add_argument("--no-mps", action="store_true", help="leave CUDA's Multi-Process Service off")
    args = parser.parse_args()
    if args.command == "bench":
        return bench(args)
    import mlx.core as mx

    t = time.perf_counter()
    config = write_checkpoint(args.model, args.layers, args.small)
    print(f"wrote {args.model}: {config['num_hidden_layers']} layers, {checkpoint_bytes(args.model):,} bytes "
          f"in {len(list(args.model.glob('*.safetensors')))} shards, {time.perf_counter() - t:.1f}s, "
          f"peak memory {mx.get_peak_memory() / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
