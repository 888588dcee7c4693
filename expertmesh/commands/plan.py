"""expertmesh plan: size a mesh for a checkpoint, from its headers alone."""

from pathlib import Path

from ..errors import ExpertmeshError

HELP = "print where the experts would go and the memory each node needs, without loading weights"

EPILOG = """\
Reads config.json and the safetensors headers only, so a directory holding
config.json, model.safetensors.index.json and each shard's first bytes (its
header) is enough: size a cluster before downloading the weights."""


def add_arguments(p) -> None:
    p.epilog = EPILOG
    p.add_argument("--model", required=True, type=Path, help="checkpoint directory (headers suffice)")
    p.add_argument("--node", action="append", default=[], metavar="NAME:GB",
                   help="a node and the memory it gives experts, in GB (repeat for each)")
    p.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="copies of each expert, where memory allows (default 1)")
    p.add_argument("--stats", type=Path, default=None, metavar="FILE",
                   help="place by the expert popularity in FILE (expertmesh calibrate --out, or stats --json)")


def parse_node(spec: str):
    from ..placement import NodeBudget

    name, _, gb = spec.rpartition(":")
    try:
        memory = float(gb)
    except ValueError:
        memory = -1.0
    if not name or not memory > 0:
        raise ExpertmeshError(f"--node {spec!r}: expected NAME:GB with GB > 0, e.g. mini-a:12")
    return NodeBudget(name, int(memory * 1e9))


def run(args) -> None:
    from ..checkpoint import Checkpoint
    from ..models import get_adapter
    from ..placement import balanced, contiguous, describe, expected_balance, size
    from ..popularity import read_load
    from ..ranges import per_layer

    nodes = [parse_node(spec) for spec in args.node]
    if not nodes:
        raise ExpertmeshError("no nodes given: pass --node NAME:GB for each node")
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise ExpertmeshError(f"node names must differ: {', '.join(names)}")
    if args.replicas < 1:
        raise ExpertmeshError("--replicas must be at least 1")
    if args.stats is not None and args.replicas != 1:
        raise ExpertmeshError("--stats plans the copies itself: leave --replicas out")
    checkpoint = Checkpoint(args.model)
    adapter = get_adapter(checkpoint.config)
    tensors = checkpoint.tensors
    expert_bytes = {l: adapter.expert_bytes(tensors, l) for l in adapter.moe_layers}
    experts_total = adapter.num_experts * sum(expert_bytes.values())
    dense = sum(t.nbytes for name, t in tensors.items() if not adapter.is_expert_weight(name))
    placement = contiguous(nodes, adapter.num_experts, expert_bytes, args.replicas)
    if args.stats is not None:
        load = read_load(args.stats, adapter.moe_layers, adapter.num_experts)
        even = balanced(nodes, adapter.num_experts, expert_bytes, load)
        balance = (f"balance ratio expected on the traffic in {args.stats}: {expected_balance(even, load):.3f} "
                   f"(contiguous ranges: {expected_balance(placement, load):.3f})")
        placement = even

    print(f"model {checkpoint.model_id} ({adapter.model_type}): {len(adapter.moe_layers)} MoE layers x "
          f"{adapter.num_experts} routed experts, top-{adapter.top_k}")
    sizes = sorted(set(expert_bytes.values()))
    each = f"{sizes[0] / 1e6:.2f}" + (f"-{sizes[-1] / 1e6:.2f}" if len(sizes) > 1 else "")
    print(f"routed experts {size(experts_total)} ({each} MB each); dense part on the router {size(dense)}")
    print(f"{'NODE':<16} {'BUDGET':>10} {'EXPERTS':>8} {'REPLICAS':>8} {'MEMORY':>10}  EXPERTS PER LAYER")
    for n in nodes:
        held = placement.experts_of(n.name)
        count = sum(len(e) for e in held.values())
        print(f"{n.name:<16} {size(n.memory_bytes):>10} {count:>8} {placement.replicas_of(n.name):>8} "
              f"{size(placement.bytes_of(n.name, expert_bytes)):>10}  {per_layer(held)}")
    print(f"{'router (dense)':<16} {'':>10} {'':>8} {'':>8} {size(dense):>10}")
    if args.stats is not None:
        print(balance)
    if placement.short:
        print(f"memory allows fewer than {args.replicas} copies of {describe(placement.short)}")
