"""The H200 benchmark: the mesh where compute is as fast as a Mac's.

    python3 benchmarks/device.py --out results/device-YYYYMMDD.json [--layers 12 | --model DIR] [--quick] [--stages ...]

Qwen3-30B-A3B's widths, 4-bit, ``--layers`` MoE layers; 2 node processes and a
router process on the one GPU under CUDA's Multi-Process Service (``--no-mps``
leaves it off). Writes ``make bench``'s keys, ``growth_gap_s[_expert]`` and an
expert-mode ``breakdown``, an auto-mode one (``spans``), rewriting the JSON after every stage (a failed stage
records its error). benchmarks/README.md has the results and how to send it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


@contextlib.contextmanager
def mps(enabled: bool, results: dict):
    """CUDA's Multi-Process Service for this process and its children, when
    the machine has it: GPU work of several processes then shares the GPU
    without a context switch at each hand-off."""
    control = shutil.which("nvidia-cuda-mps-control")
    if not enabled or control is None:
        results["mps"] = False
        yield
        return
    root = Path(tempfile.mkdtemp(prefix="expertmesh-mps-"))
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(root / "log")}
    for d in env.values():
        Path(d).mkdir()
    os.environ.update(env)
    started = subprocess.run([control, "-d"], capture_output=True, text=True).returncode == 0
    results["mps"] = started
    try:
        yield
    finally:
        if started:  # the daemon ends once this process, its last client, has exited
            quit_ = subprocess.Popen([control], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, text=True)
            quit_.stdin.write("quit\n")
            quit_.stdin.close()
        for k in env:
            os.environ.pop(k, None)


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cached_model(root: Path, layers: int, scale: bool) -> Path:
    """The bench checkpoint (``scale``: at Qwen3-30B-A3B's widths), written
    once per ``root`` (a later run on the same machine reuses it)."""
    import run

    root = root / ("scale" if scale else "tiny")
    done = root / f"bench-{layers}.done"
    if not done.exists():
        run.bench_model(root, layers, scale=scale)
        done.touch()
    return root / f"bench-{layers}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where the JSON goes")
    parser.add_argument("--layers", type=int, default=12, help="MoE layers (default 12; Qwen3-30B-A3B has 48)")
    parser.add_argument("--quick", action="store_true", help="one timed round per figure (a smoke run)")
    parser.add_argument("--tiny", action="store_true", help="make bench's 64-wide model: a smoke run off the GPU")
    parser.add_argument("--no-mps", action="store_true", help="leave CUDA's Multi-Process Service off")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "expertmesh-device",
                        help="where the checkpoint is written, and found by a later run")
    parser.add_argument("--model", type=Path, default=None,
                        help="a checkpoint to run instead of writing one (e.g. fullsize.py write DIR --layers 12)")
    parser.add_argument("--stages", nargs="+", default=["hop", "breakdown", "spans", "auto", "expert", "pipeline"],
                        choices=["hop", "breakdown", "spans", "spans_prebuild", "chain", "prefill", "auto",
                                 "expert", "pipeline"],
                        help="what to measure, in this order (results are written after each)")
    args = parser.parse_args()
    repeats, tokens = (1, 32) if args.quick else (3, 64)
    results: dict = {"command": " ".join(["benchmarks/device.py", *sys.argv[1:]]), "layers": args.layers,
                     "scale": not args.tiny, "nodes": 2, "cpus": os.cpu_count(), "gpu": gpu_name(),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "errors": {},
               "pinned": os.environ.get("EXPERTMESH_PINNED", "1") != "0",  # expertmesh.hostcopy's switch
               "prelaunch": os.environ.get("EXPERTMESH_PRELAUNCH", "1") != "0"}  # the nodes' --prelaunch default
    with mps(not args.no_mps, results):
        import mlx.core as mx  # after MPS is up: this process's CUDA context joins it

        import run

        results["device"] = str(mx.default_device())
        results["mlx"] = mx.__version__
        logs = Path(tempfile.mkdtemp(prefix="expertmesh-device-"))

        results["stage_seconds"] = {}  # each stage's, for planning a call within the device's minutes

        def stage(name: str, fn) -> None:
            run.step(name)
            t0 = time.perf_counter()
            try:
                results.update(fn() or {})
            except Exception as e:  # noqa: BLE001 recorded; the other stages still run
                traceback.print_exc()
                results["errors"][name] = f"{type(e).__name__}: {e}"
            results["stage_seconds"][name] = round(time.perf_counter() - t0, 1)
            results["seconds"] = round(time.perf_counter() - run._T0, 1)
            run.add_ratios(results)
            run.write(results, args.out, table=False)

        args.model_dir.mkdir(parents=True, exist_ok=True)
        model = args.model or cached_model(args.model_dir, args.layers, not args.tiny)
        results["model"] = str(model)
        if args.model:
            import json

            results["layers"] = json.loads((model / "config.json").read_text())["num_hidden_layers"]
        made: dict = {}  # what several stages share, made by the first that needs it

        def long_prompt() -> tuple[str, int]:
            if "prompt" not in made:
                from mlx_lm.utils import load_tokenizer

                text = run.long_prompt(model, 512)
                made["prompt"] = text, len(load_tokenizer(model).encode(text))
            return made["prompt"]

        def local():
            if "local" not in made:
                made["local"] = run.local_generate(model)
            return made["local"]

        def pipeline() -> dict:
            made.pop("local", None)  # its model's memory: the ring pipeline's ranks load their own
            return {"decode_tps_pipeline": run.pipeline_tps(model, tokens, warm=1, rounds=repeats)}

        stages = {
            "hop": lambda: _hop(logs, 300 if args.quick else 900),
            "breakdown": lambda: _breakdown(model, tokens, repeats, logs),
            "spans": lambda: {"spans": _spans(model, tokens, repeats, logs),
                              "spans_8": _spans(model, tokens, repeats, logs, streams=8)},
            # the same with nodes that build nothing ahead, beside the default: an A/B in one run
            "spans_prebuild": lambda: {"spans_ab": {
                key: _spans(model, tokens, repeats, logs, streams=n, node_args=("--no-prebuild",) if off else ())
                for key, n, off in (("on", 1, False), ("off", 1, True), ("off_8", 8, True), ("on_8", 8, False))}},
            # router/chain.py's A/B in one mesh: prompt chunk sizes, chained against relayed spans
            "chain": lambda: {"chain_ab": _chain(model, long_prompt()[0], repeats, logs)},
            "prefill": lambda: _prefill(model, long_prompt()[0], repeats, logs),
            **{mode: (lambda mode=mode: run.compare(mode, model, local(), 2, logs, tokens, *long_prompt(),
                                                    repeats, warm=True)) for mode in run.MODES},
            "pipeline": pipeline,
        }
        for name in dict.fromkeys(args.stages):  # in the order asked for: the first ones fit a call that runs out
            stage(name, stages[name])
        made.clear()
        shutil.rmtree(logs, ignore_errors=True)
    results["seconds"] = round(time.perf_counter() - run._T0, 1)
    run.add_ratios(results)
    run.write(results, args.out)
    return 0


def _hop(root: Path, trials: int) -> dict:
    import hop

    return hop.measure(hop.hop_model(root), trials)


def _breakdown(model: Path, tokens: int, rounds: int, logs: Path) -> dict:
    import breakdown

    r = breakdown.router_breakdown(model, 2, tokens, rounds, logs)
    r.update(breakdown.node_breakdown(model))
    return {"breakdown": r}


def _spans(model: Path, tokens: int, rounds: int, logs: Path, streams: int = 1, node_args=()) -> dict:
    import breakdown

    return breakdown.stage_breakdown(model, 2, tokens, rounds, logs, streams=streams, node_args=tuple(node_args))


def _chain(model: Path, prompt: str, rounds: int, logs: Path) -> dict:
    import chainab

    return chainab.measure(model, logs, prompt, rounds=rounds)


def _prefill(model: Path, prompt: str, rounds: int, logs: Path) -> dict:
    """A 512-token prompt's prefill, piece by piece, in expert and auto mode."""
    import breakdown

    return {"prefill_expert": breakdown.router_breakdown(model, 2, 1, rounds, logs, prompt=prompt),
            "prefill_auto": breakdown.stage_breakdown(model, 2, 1, rounds, logs, prompt=prompt)}


if __name__ == "__main__":
    sys.exit(main())
