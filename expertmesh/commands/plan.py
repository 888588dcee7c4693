"""expertmesh plan: size a mesh for a checkpoint, from its headers alone."""

from pathlib import Path

from ..errors import ExpertmeshError

HELP = "print where the layers and experts would go, the memory each node needs and the predicted speed"

EPILOG = """\
Reads config.json and the safetensors headers only, so a directory holding
config.json, model.safetensors.index.json and each shard's first bytes (its
header) is enough: size a cluster before downloading the weights.

--mode chooses per layer between routed experts spread across the nodes
(expert) and whole layers on one node (pipeline stages); auto picks what the
cost model predicts fastest. The prediction needs each node's round-trip time
and per-layer decode time: a running router measures them; here they are
--rtt-us and --layer-us (defaults: 200 us, and 600 / 1000 us per layer at
batch 1 / 8), the same for every node."""


def add_arguments(p) -> None:
    p.epilog = EPILOG
    p.add_argument("--model", required=True, help="checkpoint directory (headers suffice), or Hugging Face repo "
                   "ORG/NAME[@REVISION]: its headers are read by range requests, and it prints what each will fetch")
    p.add_argument("--node", action="append", default=[], metavar="NAME:GB",
                   help="a node and the memory it gives experts, in GB (repeat for each)")
    p.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="copies of each expert, where memory allows (default 1)")
    p.add_argument("--stats", type=Path, default=None, metavar="FILE",
                   help="place experts by the popularity in FILE (expertmesh calibrate --out, or stats --json)")
    p.add_argument("--mode", choices=("expert", "pipeline", "auto"), default="auto",
                   help="experts spread, whole-layer pipeline stages, or the faster one (default auto)")
    p.add_argument("--rtt-us", type=float, default=None, help="data-plane round trip to a node, in us (default 200)")
    p.add_argument("--layer-us", type=float, nargs="+", default=None, metavar=("BATCH1", "BATCH8"),
                   help="one layer's decode step on a node, in us, at batch 1 [and 8] (default 600 1000)")


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
    from .. import costmodel
    from ..placement import contiguous, describe, expected_balance, size
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
    load = read_load(args.stats, adapter.moe_layers, adapter.num_experts) if args.stats is not None else None
    plan = costmodel.choose(args.mode, _costs(args, nodes), adapter, tensors, args.replicas, load)
    placement = plan.placement

    print(f"model {checkpoint.model_id} ({adapter.model_type}): {len(adapter.moe_layers)} MoE layers x "
          f"{adapter.num_experts} routed experts, top-{adapter.top_k}")
    sizes = sorted(set(expert_bytes.values()))
    each = f"{sizes[0] / 1e6:.2f}" + (f"-{sizes[-1] / 1e6:.2f}" if len(sizes) > 1 else "")
    print(f"routed experts {size(experts_total)} ({each} MB each); dense part on the router {size(dense)}")
    print(f"{'NODE':<16} {'BUDGET':>10} {'EXPERTS':>8} {'REPLICAS':>8} {'MEMORY':>10}  EXPERTS PER LAYER")
    for n in nodes:
        held = placement.experts_of(n.name)
        count = sum(len(e) for e in held.values())
        stages = plan.stages.get(n.name, [])
        used = placement.bytes_of(n.name, expert_bytes) + adapter.span_bytes(tensors, stages)
        where = ", ".join([f"whole layers {a}-{b - 1}" for a, b in stages] + ([per_layer(held)] if count else []))
        print(f"{n.name:<16} {size(n.memory_bytes):>10} {count:>8} {placement.replicas_of(n.name):>8} "
              f"{size(used):>10}  {where}")
    staged = sum(adapter.span_bytes(tensors, s) for s in plan.stages.values())
    router = dense - staged + experts_on(plan, adapter, expert_bytes)
    print(f"{'router (dense)':<16} {'':>10} {'':>8} {'':>8} {size(router):>10}")
    if getattr(checkpoint.files, "repo_id", None):
        print(fetch_line(checkpoint, adapter, plan, nodes))
    for line in plan.describe(adapter.args.num_hidden_layers):
        print(line)
    if load is not None and not placement.owners:
        print(f"every layer is a pipeline stage: the popularity in {args.stats} has no experts to place")
    elif load is not None:
        spread = {l: expert_bytes[l] for l in placement.owners}
        print(f"balance ratio expected on the traffic in {args.stats}: {expected_balance(placement, load):.3f} "
              f"(contiguous ranges: {expected_balance(contiguous(nodes, adapter.num_experts, spread), load):.3f})")
    if placement.short:
        print(f"memory allows fewer than {args.replicas} copies of {describe(placement.short)}")


def fetch_line(checkpoint, adapter, plan, nodes) -> str:
    """What each node, and the router, would download of a repo: the bytes of
    its share that neither the Hugging Face cache nor expertmesh's holds."""
    from ..nodes.store import ExpertStore
    from ..placement import size

    store, tensors, files = ExpertStore(checkpoint, adapter), checkpoint.tensors, checkpoint.files
    each = []
    for n in nodes:
        reads = [r for layer, experts in plan.placement.experts_of(n.name).items() if experts
                 for r in store.reads(layer, sorted(experts))]
        reads += [(t, None) for t in tensors for a, b in plan.stages.get(n.name, [])
                  if any(t.startswith(f"model.layers.{l}.") for l in range(a, b))]
        each.append(f"{n.name} {size(files.to_fetch(checkpoint.ranges(reads)))}")
    dense = files.to_fetch(checkpoint.ranges((t, None) for t in tensors if not adapter.is_expert_weight(t)))
    return f"to fetch from {files.repo_id}: " + ", ".join(each + [f"router {size(dense)}"])


def experts_on(plan, adapter, expert_bytes) -> int:
    """Expert bytes inside stage spans: counted in ``staged`` but never on the router."""
    return sum(adapter.num_experts * expert_bytes[l] for s in plan.stages.values() for a, b in s
               for l in range(a, b) if l in expert_bytes)


def _costs(args, nodes):
    from ..costmodel import DEFAULT_LAYER_S, DEFAULT_RTT_S, NodeCost

    layer = dict(DEFAULT_LAYER_S)
    if args.layer_us:
        if len(args.layer_us) > 2 or min(args.layer_us) <= 0:
            raise ExpertmeshError("--layer-us takes one or two times in us, both > 0: BATCH1 [BATCH8]")
        layer = {1: args.layer_us[0] * 1e-6, 8: args.layer_us[-1] * 1e-6}
    if args.rtt_us is not None and args.rtt_us < 0:
        raise ExpertmeshError("--rtt-us must be >= 0")
    rtt = DEFAULT_RTT_S if args.rtt_us is None else args.rtt_us * 1e-6
    return [NodeCost(n.name, n.memory_bytes, rtt, dict(layer)) for n in nodes]
