"""Prometheus metrics (--metrics-port) of routers and nodes, scraped over HTTP."""

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from expertmesh import Client

from conftest import running_nodes, running_router


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def test_router_and_node_metrics_rise_after_a_generate(tiny):
    with running_nodes(tiny, 2, metrics_port=0) as nodes, \
            running_router(tiny, [n.address for n in nodes], metrics_port=0) as router:
        router_url, node_urls = router.metrics.url, [n.metrics.url for n in nodes]
        before = scrape(router_url)
        assert total(before, "expertmesh_router_tokens_generated_total") == 0
        with Client(f"127.0.0.1:{router.port}") as client:
            list(client.generate("Hello", max_tokens=4))
        after = scrape(router_url)
        assert after[("expertmesh_router_requests_total", (("kind", "generate"),))] == 1
        assert after[("expertmesh_router_tokens_generated_total", ())] == 4
        assert after[("expertmesh_router_ttft_seconds_count", ())] == 1
        for node in ("n0", "n1"):
            sent = after[("expertmesh_router_node_requests_total", (("node", node),))]
            rtt = after[("expertmesh_router_node_rtt_seconds_count", (("node", node),))]
            assert sent == rtt > 0
            assert after[("expertmesh_router_node_rtt_seconds_bucket", (("le", "+Inf"), ("node", node)))] == rtt
        slots = total(after, "expertmesh_router_expert_tokens_total")
        assert slots == total(after, "expertmesh_router_node_tokens_total") > 0
        assert 0 < after[("expertmesh_router_balance_ratio", ())] <= 1
        assert after[("expertmesh_process_resident_bytes", ())] > 0

        served = [scrape(url) for url in node_urls]
        assert sum(s[("expertmesh_node_forward_requests_total", ())] for s in served) == \
            total(after, "expertmesh_router_node_requests_total")
        for s, node in zip(served, nodes):
            assert s[("expertmesh_node_forward_seconds_count", ())] == s[("expertmesh_node_forward_requests_total", ())]
            assert s[("expertmesh_node_memory_used_bytes", ())] == node.store.nbytes > 0
            assert s[("expertmesh_node_experts_held", ())] == 4 * len(node.store.layers)
