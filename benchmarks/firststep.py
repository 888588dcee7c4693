"""A stage span's first decode step: how many kernels MLX compiles for it,
and how long it takes, with each layer's expert-id offset added inside the
compiled MoE step (as before) and on the host (as now). Each variant runs in
a process of its own with an empty kernel cache (MLX keeps compiled kernels
under the temp directory).

    python benchmarks/firststep.py MODEL [--layers N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import json, sys, time
from pathlib import Path
import mlx.core as mx
from expertmesh.nodes import routing
if sys.argv[3] == "inside":  # the offset inside the compiled step, as before
    def _run(self, x):
        y = self.block(x)
        return y, self.block.switch_mlp.indices.value.reshape(-1).astype(mx.int32) + self.offset.value
    routing.CountedBlock._run = _run
from expertmesh.checkpoint import Checkpoint
from expertmesh.nodes.stages import StageStore
from expertmesh.nodes.store import ExpertStore
stages = StageStore(ExpertStore(Checkpoint(Path(sys.argv[1]))))
t = time.perf_counter()
stages.assign([(0, int(sys.argv[2]))])
r = {"load_s": time.perf_counter() - t}
H = stages.adapter.hidden_size
for name, T in (("prefill_s", 8), ("first_step_s", 1), ("second_step_s", 1)):
    x = mx.zeros((1, T, H), mx.bfloat16)
    mx.eval(x)
    t = time.perf_counter()
    stages.forward(0, x, [7], [])
    r[name] = time.perf_counter() - t
    print(sys.argv[3], name, round(r[name], 3), file=sys.stderr, flush=True)  # a run cut short shows how far it got
stages.close()
print(json.dumps(r))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--layers", type=int, default=None, help="the span's layers (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    layers = args.layers or json.loads((args.model / "config.json").read_text())["num_hidden_layers"]
    out = {"layers": layers}
    for variant in ("host", "inside"):  # the fast one first: a run cut short still has it
        with tempfile.TemporaryDirectory() as cache:
            run = subprocess.run([sys.executable, "-c", _CHILD, str(args.model), str(layers), variant],
                                 stdout=subprocess.PIPE, text=True, timeout=550, env={**os.environ, "TMPDIR": cache})
            if run.returncode:
                out[f"error_{variant}"] = f"exit status {run.returncode}"
                continue
            r = json.loads(run.stdout.strip().splitlines()[-1])
            r["kernels"] = sum(1 for p in Path(cache).rglob("*") if p.is_file())
        for k, v in r.items():
            out[f"{variant}_{k}"] = v
        print(variant, r, flush=True)
        if args.json:  # after each variant
            args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
