"""mlx-lm's own pipeline parallelism, the peer we compare with.

Run under ``mlx.launch --backend ring -n 2 benchmarks/pipeline_peer.py MODEL TOKENS``;
rank 0 prints one JSON line with decode tokens/s.
"""

import json
import sys

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.utils import sharded_load


def main() -> None:
    model_path, max_tokens = sys.argv[1], int(sys.argv[2])
    group = mx.distributed.init(backend="ring", strict=True)
    model, tokenizer = sharded_load(model_path, pipeline_group=group)
    last = None
    for last in stream_generate(model, tokenizer, "Once upon a time", max_tokens=max_tokens):
        pass
    # the last step was issued ahead on every rank: let it finish everywhere
    mx.eval(mx.distributed.all_sum(mx.ones(1), group=group))
    if group.rank() == 0:
        print(json.dumps({"decode_tps": last.generation_tps, "tokens": last.generation_tokens,
                          "ranks": group.size()}), flush=True)


if __name__ == "__main__":
    main()
