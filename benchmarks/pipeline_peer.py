"""mlx-lm's own pipeline parallelism, the peer we compare with.

Run under ``mlx.launch --backend ring -n 2 benchmarks/pipeline_peer.py MODEL TOKENS [WARM [ROUNDS]]``;
rank 0 prints one JSON line with decode tokens/s: the median of ``ROUNDS``
timed generations (default 1) after ``WARM`` untimed ones (default 0), all in
the same processes, as the mesh is warmed before it is timed.
"""

import json
import statistics
import sys

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.utils import sharded_load


def main() -> None:
    model_path, max_tokens = sys.argv[1], int(sys.argv[2])
    warm = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    group = mx.distributed.init(backend="ring", strict=True)
    model, tokenizer = sharded_load(model_path, pipeline_group=group)
    tps, last = [], None
    for _ in range(warm + rounds):
        for last in stream_generate(model, tokenizer, "Once upon a time", max_tokens=max_tokens):
            pass
        # the last step was issued ahead on every rank: let it finish everywhere
        mx.eval(mx.distributed.all_sum(mx.ones(1), group=group))
        tps.append(last.generation_tps)
    if group.rank() == 0:
        print(json.dumps({"decode_tps": statistics.median(tps[warm:]), "tokens": last.generation_tokens,
                          "ranks": group.size(), "warm": warm, "rounds": rounds}), flush=True)


if __name__ == "__main__":
    main()
