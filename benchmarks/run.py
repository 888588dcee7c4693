"""``make bench``: the hot path and end-to-end throughput, as ratios measured
side by side in one run. Writes benchmarks/results/latest.json and prints a table.

    python benchmarks/run.py [--quick] [--nodes 2] [--layers N] [--scale] [--modes auto expert] [--no-spec] [--no-balance]

The mesh is measured in the router's default mode (``auto``: the cost model
picks spans of whole layers or spread experts) and in ``expert`` mode (every
MoE layer a round trip to the nodes); each mode's trials alternate with
local mlx-lm's, so each ratio compares two things measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import hop  # noqa: E402

from expertmesh import Client, builtin  # noqa: E402
from expertmesh.router import RouterConfig  # noqa: E402
from expertmesh.router.stats import hot_experts  # noqa: E402
from expertmesh.testing.process import Process  # noqa: E402
from expertmesh.testing.tinymodel import write_tiny_model  # noqa: E402
from expertmesh.v1 import expertmesh_pb2 as pb  # noqa: E402

PROMPT = "Once upon a time"
SPEC_PROMPT = "def __init__(self, "  # the built-in model's corpus is Python source
# lines of Python for the balance stage (the first five are tests/test_builtin.py's)
BALANCE_PROMPTS = ["class Point:\n    def __repr__(self):\n        return ", "    def __len__(self):\n        return ",
                   "def __init__(self, ", "class Error(Exception):\n    \"\"\"", "if __name__ == '__main__':\n",
                   "import os\nimport sys\n\ndef main(", "    for key, value in self.items():\n        ",
                   "    try:\n        return self._cache[key]\n    except KeyError:\n        "]

# The mesh's figures (decode_tps_mesh, decode_ratio, ...) are taken in the
# router's default mode, the one `expertmesh router` runs; every other mode's
# carry its name (decode_tps_mesh_expert, decode_ratio_expert, ...).
DEFAULT_MODE = RouterConfig.mode  # "auto"
MODES = (DEFAULT_MODE, "expert")


# Qwen3-30B-A3B's widths (its vocabulary and layer count aside)
SCALE = dict(hidden_size=2048, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
             num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144)


def bench_model(root: Path, layers: int, scale: bool) -> Path:
    return write_tiny_model(
        root / f"bench-{layers}", seed=0, quantize={"bits": 4, "group_size": 64} if scale else None,
        config_overrides=dict(num_hidden_layers=layers, max_position_embeddings=2048, **(SCALE if scale else {})))


def long_prompt(model: Path, tokens: int) -> str:
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(model)
    words, text = "the router looks at each token and picks two experts".split(), ""
    i = 0
    while len(tok.encode(text)) < tokens:
        text += words[i % len(words)] + " "
        i += 1
    return text


_T0 = time.perf_counter()


def step(what: str) -> None:
    """A progress line on stderr: where a long run is, and since when."""
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {what}", file=sys.stderr, flush=True)


class Mesh:
    """Node processes and a router process on loopback."""

    def __init__(self, model: Path, nodes: int, logs: Path, mode: str = "expert", draft: Path | None = None,
                 memory_gb: float = 4):
        self.procs = [Process(["node", "--model", str(model), "--name", f"bench{i}", "--memory-gb", f"{memory_gb:g}",
                               "--no-discovery"],
                              logs / f"node{i}.log") for i in range(nodes)]
        peers = [p.address(timeout=300) for p in self.procs]
        router = Process(["router", "--model", str(model), "--port", "0", "--no-discovery", "--mode", mode,
                          *(["--draft-model", str(draft)] if draft else []),
                          *[a for peer in peers for a in ("--peer", peer)]], logs / f"router-{mode}.log")
        self.procs.append(router)
        self.address = router.address(timeout=300)

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def local_generate(model: Path):
    """The checkpoint in mlx-lm, in this process (the reference), as
    ``generate(prompt, max_tokens=N)`` like ``Client.generate``."""
    from mlx_lm import load
    from mlx_lm.generate import stream_generate

    return partial(stream_generate, *load(str(model)))


def trial(generate, max_tokens: int, prompt_512: str, tokens_512: int) -> tuple[float, float]:
    """(decode tok/s, prefill tok/s of the long prompt) through ``generate``:
    mlx-lm's ``stream_generate`` or the mesh's ``Client.generate``."""
    *_, last = generate(PROMPT, max_tokens=max_tokens)
    t = time.perf_counter()
    next(iter(generate(prompt_512, max_tokens=1)))
    return last.generation_tps, tokens_512 / (time.perf_counter() - t)


def compare(mode: str, model: Path, local, nodes: int, root: Path, tokens: int, prompt_512: str,
            tokens_512: int, repeats: int, warm: bool = False) -> dict:
    """One mode's mesh against local mlx-lm, trials alternating (local, mesh)
    so that both see the same load; then 1 vs 8 concurrent streams, alternating.
    ``warm``: every batch size is run once before any is timed (1 and 8 streams,
    and a batch growing from 1 to 8 and shrinking back, twice: the second
    pass's longest inter-token gap is ``growth_gap_s``, the first's
    ``growth_gap_cold_s``)."""
    x = "" if mode == DEFAULT_MODE else f"_{mode}"
    step(f"{mode} mode: starting {nodes} nodes and a router")
    mesh = Mesh(model, nodes, root, mode=mode)
    step(f"{mode} mode: decode and prefill, alternating with local mlx-lm; then 1 vs 8 streams")
    trials: dict[str, list[float]] = {k: [] for k in ("dl", "pl", "dm", "pm", "b1", "b8")}
    gaps = {}
    try:
        with Client(mesh.address) as c:
            plan = plan_text(c.cluster())
            for _ in range(repeats + 1):  # the first round warms both up: compiles, caches
                for key, generate in (("l", local), ("m", c.generate)):
                    d, p = trial(generate, tokens, prompt_512, tokens_512)
                    trials["d" + key].append(d)
                    trials["p" + key].append(p)
        trials = {k: v[1:] for k, v in trials.items()}
        if warm:
            step(f"{mode} mode: warming every batch size; a batch growing 1 -> 8 -> 1, twice")
            concurrent_tps(mesh.address, 8, tokens)
            concurrent_tps(mesh.address, 1, tokens)
            gaps = {f"growth_gap_cold_s{x}": growth_gap(mesh.address, 8), f"growth_gap_s{x}": growth_gap(mesh.address, 8)}
        for _ in range(repeats):
            trials["b1"].append(concurrent_tps(mesh.address, 1, tokens))
            trials["b8"].append(concurrent_tps(mesh.address, 8, tokens))
    finally:
        mesh.close()
    m = {k: statistics.median(v) for k, v in trials.items()}
    return {f"plan{x}": plan, f"decode_tps_local{x}": m["dl"], f"prefill_tps_local{x}": m["pl"],
            f"decode_tps_mesh{x}": m["dm"], f"prefill_tps_mesh{x}": m["pm"],
            f"batch_tps_1{x}": m["b1"], f"batch_tps_8{x}": m["b8"], **gaps}


def plan_text(cluster) -> str:
    """What each node runs: its spans of whole layers, or how many experts it holds."""
    parts = []
    for n in cluster.nodes:
        if n.stages:
            parts.append(f"{n.name}: layers " + ", ".join(f"{a}-{b - 1}" for a, b in n.stages))
        else:
            parts.append(f"{n.name}: {sum(len(e) for e in n.experts.values())} experts")
    return "; ".join(parts)


def concurrent_tps(address: str, streams: int, max_tokens: int) -> float:
    counts = [0] * streams

    def one(i):
        with Client(address) as c:
            for _ in c.generate(f"{PROMPT} {i}", max_tokens=max_tokens):
                counts[i] += 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(counts) / (time.perf_counter() - t)


def growth_gap(address: str, streams: int, stagger: int = 3) -> float:
    """The longest gap (s) between two tokens of any stream while a batch grows
    from 1 to ``streams`` (each stream starts once the previous one has
    ``stagger`` tokens) and shrinks back as they finish in turn."""
    tokens = stagger * streams + 16
    started = [threading.Event() for _ in range(streams + 1)]
    gaps = [0.0] * streams
    started[0].set()

    def one(i):
        started[i].wait(300)
        with Client(address) as c:
            last = None
            for n, _ in enumerate(c.generate(f"{PROMPT} {i}", max_tokens=tokens), 1):
                now = time.perf_counter()
                if last is not None:
                    gaps[i] = max(gaps[i], now - last)
                last = now
                if n == stagger:
                    started[i + 1].set()
        started[i + 1].set()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return max(gaps)


def speculative_runs(nodes: int, logs: Path, max_tokens: int, repeats: int) -> dict:
    """Greedy decode in expert mode on the built-in trained model (``expertmesh.builtin``):
    without a draft model, with the checkpoint itself as the draft (run wholly on
    the router: every guess is accepted), and with its trained one-layer draft."""
    model = builtin.model_dir()
    out, tokens = {}, {}
    for name, draft in (("", None), ("_draft_same", model), ("_draft_trained", builtin.draft_dir())):
        mesh = Mesh(model, nodes, logs, draft=draft)
        try:
            decode, trips = [], []
            with Client(mesh.address) as c:
                for _ in range(repeats + 1):  # the first warms up
                    c.stats(reset=True)
                    pieces = list(c.generate(SPEC_PROMPT, max_tokens=max_tokens))
                    decode.append(pieces[-1].generation_tps)
                    trips.append(c.stats().round_trips / pieces[-1].generation_tokens)
                    tokens[name] = [p.token for p in pieces]
        finally:
            mesh.close()
        out[f"decode_tps{name or '_nodraft'}"] = statistics.median(decode[1:])
        out[f"round_trips_per_token{name}"] = statistics.median(trips[1:])
    for name in ("same", "trained"):
        out[f"spec_speedup_{name}"] = out[f"decode_tps_draft_{name}"] / out["decode_tps_nodraft"]
        out[f"spec_identical_{name}"] = tokens[f"_draft_{name}"] == tokens[""]
    out["spec_acceptance_trained"] = acceptance(model, builtin.draft_dir(), max_tokens)
    return out


def balance_runs(logs: Path, max_tokens: int, nodes: int = 3) -> dict:
    """Expert mode on the built-in trained model over ``nodes`` node processes:
    greedy from ``BALANCE_PROMPTS`` on contiguous expert ranges, the balance ratio
    and hot experts the router saw (``Client.stats``, what ``expertmesh stats``
    prints), ``Client.rebalance()`` (``expertmesh rebalance``), then the same
    prompts again on counters reset after it."""
    mesh = Mesh(builtin.model_dir(), nodes, logs)
    try:
        with Client(mesh.address) as c:
            def run() -> dict[str, list[int]]:
                return {p: [x.token for x in c.generate(p, max_tokens=max_tokens)] for p in BALANCE_PROMPTS}

            before_tokens, before = run(), c.stats()
            progress = list(c.rebalance())
            c.stats(reset=True)
            after_tokens, after = run(), c.stats()
    finally:
        mesh.close()
    if progress[-1].phase != pb.REBALANCE_DONE:
        raise RuntimeError(f"rebalance did not finish: {progress[-1]}")
    return {"balance_before_trained": before.balance_ratio, "balance_after_trained": after.balance_ratio,
            "hot_experts_trained": [f"{l}:{e} {share:.0%}" for l, e, share in hot_experts(before, 3)],
            "rebalance_moves_trained": len(progress[0].moves),
            "rebalance_tokens_identical": after_tokens == before_tokens}


def acceptance(model: Path, draft: Path, max_tokens: int, num_draft_tokens: int = 3) -> float:
    """Accepted / proposed draft tokens of mlx-lm's ``speculative_generate_step``
    (what the router runs), greedy on ``SPEC_PROMPT``, in this process."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import speculative_generate_step

    target, tok = load(str(model))
    small, _ = load(str(draft))
    flags = [f for _, _, f in speculative_generate_step(mx.array(tok.encode(SPEC_PROMPT)), target, small,
                                                       num_draft_tokens=num_draft_tokens, max_tokens=max_tokens)]
    passes = flags.count(False)  # each pass through the model ends with one token of its own
    return sum(flags) / (passes * num_draft_tokens)


def pipeline_tps(model: Path, max_tokens: int, warm: int = 0, rounds: int = 1) -> float | None:
    """mlx-lm's ring pipeline of 2 ranks on this host: decode tok/s, the median
    of ``rounds`` after ``warm`` untimed generations in the same processes."""
    launcher = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]
    out = subprocess.run([*launcher, "--backend", "ring", "-n", "2", "--python", sys.executable,
                          "--hosts", "127.0.0.1", str(HERE / "pipeline_peer.py"), str(model), str(max_tokens),
                          str(warm), str(rounds)],
                         capture_output=True, text=True, timeout=600)
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)["decode_tps"]
    print(f"pipeline peer failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}", file=sys.stderr)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer trials (a smoke run)")
    parser.add_argument("--nodes", type=int, default=2, help="node processes in the mesh")
    parser.add_argument("--layers", type=int, default=None, help="MoE layers (default 24; 2 with --scale)")
    parser.add_argument("--scale", action="store_true",
                        help="Qwen3-30B-A3B widths: hidden 2048, 128 experts, top-8, 4-bit (fewer layers)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="router modes to measure (default: both)")
    parser.add_argument("--no-spec", action="store_true", help="skip the speculative-decoding runs")
    parser.add_argument("--no-balance", action="store_true", help="skip the trained model's rebalance run")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "latest.json")
    args = parser.parse_args()
    trials, repeats, tokens = (300, 1, 32) if args.quick else (2000, 5, 64)
    args.layers = args.layers or (2 if args.scale else 24)
    results: dict = {"nodes": args.nodes, "layers": args.layers, "scale": args.scale, "cpus": os.cpu_count()}
    root = Path(tempfile.mkdtemp(prefix="expertmesh-bench-"))
    try:
        step("hop: one MoE-layer round trip vs. the TCP floor")
        hop_model = hop.hop_model(root)
        h = hop.measure(hop_model, trials)
        results.update(h)
        model = bench_model(root, args.layers, args.scale)
        prompt_512 = long_prompt(model, 512)
        from mlx_lm.utils import load_tokenizer
        tokens_512 = len(load_tokenizer(model).encode(prompt_512))
        step(f"bench model written ({args.layers} layers); loading it in mlx-lm")
        local = local_generate(model)
        for mode in MODES:
            if mode in args.modes:
                results.update(compare(mode, model, local, args.nodes, root, tokens, prompt_512, tokens_512,
                                       repeats))
        del local
        if not args.no_spec:
            step("speculative decoding")
            results.update(speculative_runs(args.nodes, root, tokens, repeats))
        if not args.no_balance:
            step("routing balance on the trained model: 3 nodes, rebalance, the same prompts again")
            results.update(balance_runs(root, 24))
        step("mlx-lm's ring pipeline (mlx.launch)")
        runs = [t for t in (pipeline_tps(model, tokens) for _ in range(repeats)) if t]
        results["decode_tps_pipeline"] = statistics.median(runs) if runs else None
    finally:
        shutil.rmtree(root, ignore_errors=True)
    add_ratios(results)
    write(results, args.out)
    return 0


def add_ratios(r: dict) -> None:
    """Each measured mode's ratios, from the figures measured side by side."""
    for mode in MODES:
        x = "" if mode == DEFAULT_MODE else f"_{mode}"
        if f"decode_tps_mesh{x}" not in r:
            continue
        r[f"decode_ratio{x}"] = r[f"decode_tps_mesh{x}"] / r[f"decode_tps_local{x}"]
        r[f"prefill_ratio{x}"] = r[f"prefill_tps_mesh{x}"] / r[f"prefill_tps_local{x}"]
        r[f"batch_gain{x}"] = r[f"batch_tps_8{x}"] / r[f"batch_tps_1{x}"]
        pipeline = r.get("decode_tps_pipeline")
        r[f"peer_ratio{x}"] = r[f"decode_tps_mesh{x}"] / pipeline if pipeline else None


def write(r: dict, out: Path, table: bool = True) -> None:
    """``r`` as JSON at ``out``, and (``table``) as a table on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    if not table:
        return
    print(f"{'figure':<34} value")
    for k, v in r.items():
        print(f"{k:<34} {v:.3f}" if isinstance(v, float) else f"{k:<34} {v}")
    print(f"written to {out}")


if __name__ == "__main__":
    sys.exit(main())
