"""Expert popularity files: a ``RouterStats`` message as JSON (what
``expertmesh stats --json`` prints and ``expertmesh calibrate`` writes), read
back as token-slots per expert per MoE layer for ``placement.balanced``."""

from __future__ import annotations

import json
from pathlib import Path

from google.protobuf import json_format

from .errors import ExpertmeshError
from .placement import Load
from .v1 import expertmesh_pb2 as pb


def write_stats(stats: pb.RouterStats, path: Path) -> None:
    """Write ``stats`` as JSON.

    Raises:
        ExpertmeshError: the file cannot be written.
    """
    try:
        path.write_text(json.dumps(json_format.MessageToDict(stats, preserving_proto_field_name=True), indent=1) + "\n")
    except OSError as e:
        raise ExpertmeshError(f"cannot write {path}: {e}") from None


def read_load(path: Path, moe_layers: list[int], num_experts: int) -> Load:
    """Layer -> token-slots per expert, from a stats file of this model's shape.

    Raises:
        ExpertmeshError: the file is missing, not a stats file, holds no
            traffic, or its layers or expert count differ from the model's.
    """
    try:
        stats = json_format.Parse(path.read_text(), pb.RouterStats())
    except OSError as e:
        raise ExpertmeshError(f"cannot read {path}: {e}") from None
    except json_format.ParseError as e:
        raise ExpertmeshError(f"{path} is not a stats file (expertmesh stats --json or calibrate --out): {e}") from None
    layers = [l.layer for l in stats.layers]
    if stats.num_experts != num_experts or sorted(layers) != sorted(moe_layers):
        raise ExpertmeshError(
            f"{path} counts {stats.num_experts} experts in MoE layers {layers}; the model has {num_experts} "
            f"in {moe_layers}: record the stats with this checkpoint")
    if any(len(l.expert_tokens) != num_experts for l in stats.layers):
        raise ExpertmeshError(f"{path}: every layer must count {num_experts} experts")
    if not any(sum(l.expert_tokens) for l in stats.layers):
        raise ExpertmeshError(f"{path} records no traffic: calibrate with some prompts first")
    return {l.layer: [float(t) for t in l.expert_tokens] for l in stats.layers}
