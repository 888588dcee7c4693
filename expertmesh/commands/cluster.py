"""expertmesh cluster: show the nodes and what they hold."""

from . import connect, router_arguments

HELP = "show the nodes and what they hold"


def add_arguments(p) -> None:
    router_arguments(p)


def run(args) -> None:
    from ..placement import size
    from ..ranges import per_layer

    with connect(args) as client:
        c = client.cluster()
    print(f"model {c.model_id} (config {c.config_hash}): {len(c.moe_layers)} MoE layers x {c.num_experts} experts")
    print(f"{'NODE':<16} {'ADDRESS':<22} {'STATE':<8} {'MEMORY (used / budget)':<22} EXPERTS PER LAYER")
    for n in c.nodes:
        spans = [f"whole layers {a}-{b - 1}" for a, b in n.stages]
        held = ", ".join(spans + [per_layer(n.experts)] if n.experts or not spans else spans)
        memory = f"{size(n.memory_used_bytes)} / {size(n.memory_budget_bytes)}"
        print(f"{n.name:<16} {n.address:<22} {n.state:<8} {memory:<22} {held}")
        if n.error:
            print(f"{'':<16} error: {n.error}")
