"""Latency histograms and the Prometheus endpoint (``--metrics-port``) of
routers and nodes.

Components count in plain Python/numpy as they work; a scrape turns a
snapshot of those counts into metric families (``collect``), so the hot path
never touches prometheus_client and each component has its own registry.
"""

from __future__ import annotations

import bisect
import logging
import os
import socket
import sys
import threading
from typing import Callable, Iterable
from wsgiref.simple_server import make_server

from .errors import ExpertmeshError, UnavailableError
from .security import Security, bearer
from .v1 import expertmesh_pb2 as pb

logger = logging.getLogger(__name__)

# seconds: a loopback round trip is ~50 µs, a slow layer on a loaded node seconds
LATENCY_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Counts per bucket of ``bounds`` (upper bounds, plus one for the rest); not thread-safe."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def to_message(self) -> pb.Histogram:
        return pb.Histogram(bounds=self.bounds, counts=self.counts, sum=self.sum, count=self.count)


def quantile(h: pb.Histogram, q: float) -> float:
    """The upper bound of the bucket of ``h`` holding the ``q`` quantile (0 when empty)."""
    if not h.count:
        return 0.0
    rank, seen = q * h.count, 0
    for bound, n in zip(list(h.bounds) + [float("inf")], h.counts):
        seen += n
        if seen >= rank:
            return bound
    return float("inf")


def histogram_family(name: str, doc: str, labels: list[str], series: Iterable[tuple[list[str], pb.Histogram]]):
    """A Prometheus histogram family from ``Histogram`` messages, one per label set."""
    from prometheus_client.core import HistogramMetricFamily

    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, h in series:
        cumulative, buckets = 0, []
        for bound, n in zip(list(h.bounds) + [float("inf")], h.counts):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        family.add_metric(values, buckets, h.sum)
    return family


def resident_bytes() -> int:
    """This process's resident memory (Linux: now; elsewhere: its peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class MetricsServer:
    """``/metrics`` over HTTP for one component.

    With a cluster token a scrape must send ``Authorization: Bearer <token>``
    (Prometheus: ``authorization: {credentials: ...}``), and with TLS files it
    is HTTPS with client certificates, like every other port of the mesh.

    Args:
        host: address to listen on.
        port: 0 picks a free port (see ``.port``).
        collect: returns the metric families of one scrape.
        security: the component's token and TLS files.

    Raises:
        ExpertmeshError: prometheus_client is not installed.
        UnavailableError: the port cannot be bound.
    """

    def __init__(self, host: str, port: int, collect: Callable[[], Iterable], security: Security = Security()):
        try:
            from prometheus_client import CollectorRegistry, make_wsgi_app
            from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler
        except ImportError:
            raise ExpertmeshError("--metrics-port needs prometheus_client: pip install prometheus-client") from None

        class _TimedHandler(_SilentHandler):
            timeout = 10  # seconds a scraper may take to handshake and send its request

        class _Collector:
            def collect(self):
                try:
                    yield from collect()
                except Exception:  # a scrape must not take the component down
                    logger.exception("metrics: collecting failed")

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector())
        metrics = make_wsgi_app(registry)

        def app(environ, start_response):
            refused = security.token_error(bearer(environ.get("HTTP_AUTHORIZATION")))
            if refused:
                start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                    ("WWW-Authenticate", "Bearer")])
                return [refused.encode() + b"\n"]
            return metrics(environ, start_response)

        def handle_error(server, request, client_address):  # e.g. a TLS handshake without a certificate
            logger.debug("metrics: connection from %s failed", client_address[0], exc_info=True)

        server_class = type("MetricsWSGIServer", (ThreadingWSGIServer,), {
            "handle_error": handle_error, **({"address_family": socket.AF_INET6} if ":" in host else {})})
        try:
            self._server = make_server(host, port, app, server_class, handler_class=_TimedHandler)
        except OSError as e:
            raise UnavailableError(f"cannot serve metrics on {host}:{port}: {e}") from None
        if security.tls:  # the handshake runs in the request's thread, not in accept(): a silent peer blocks no one
            self._server.socket = security.server_ssl_context().wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False)
        self.scheme = "https" if security.tls else "http"
        self.host, self.port = host, self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# more (layer, expert) series than this and expert load is exported per layer and node only
MAX_EXPERT_SERIES = 4096


def router_families(s: pb.RouterStats) -> list:
    """The router's metrics from one ``RouterStats`` snapshot."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def per_node(name, doc, field):
        family = CounterMetricFamily(name, doc, labels=["node"])
        for n in s.nodes:
            family.add_metric([n.name], getattr(n, field))
        return family

    requests = CounterMetricFamily("expertmesh_router_requests", "generation requests accepted", labels=["kind"])
    for kind, count in sorted(s.requests.items()):
        requests.add_metric([kind], count)
    layer_nodes = CounterMetricFamily("expertmesh_router_layer_node_tokens",
                                      "token-slots routed to a node in one MoE layer", labels=["layer", "node"])
    for l in s.layers:
        for n, count in zip(s.nodes, l.node_tokens):
            layer_nodes.add_metric([str(l.layer), n.name], count)
    families = [
        requests,
        CounterMetricFamily("expertmesh_router_tokens_generated", "tokens generated", value=s.tokens_generated),
        CounterMetricFamily("expertmesh_router_tokens_processed", "tokens through the model", value=s.tokens_processed),
        histogram_family("expertmesh_router_ttft_seconds", "request accepted until its first token", [],
                         [([], s.ttft_seconds)]),
        per_node("expertmesh_router_node_tokens", "token-slots routed to a node", "tokens"),
        per_node("expertmesh_router_node_requests", "Forward requests sent to a node", "requests"),
        per_node("expertmesh_router_node_sent_bytes", "request bytes sent to a node", "bytes_sent"),
        per_node("expertmesh_router_node_received_bytes", "response bytes received from a node", "bytes_received"),
        histogram_family("expertmesh_router_node_rtt_seconds", "one MoE layer's request to a node until its reply",
                         ["node"], [([n.name], n.rtt_seconds) for n in s.nodes]),
        layer_nodes,
        GaugeMetricFamily("expertmesh_router_balance_ratio", "mean/max node load per layer, averaged",
                          value=s.balance_ratio),
        GaugeMetricFamily("expertmesh_process_resident_bytes", "resident memory of the process",
                          value=resident_bytes()),
    ]
    if len(s.layers) * s.num_experts <= MAX_EXPERT_SERIES:
        experts = CounterMetricFamily("expertmesh_router_expert_tokens", "token-slots routed to an expert",
                                      labels=["layer", "expert"])
        for l in s.layers:
            for e, count in enumerate(l.expert_tokens):
                experts.add_metric([str(l.layer), str(e)], count)
        families.append(experts)
    return families


def node_families(stats: pb.NodeStats, compute: pb.Histogram, info: pb.NodeInfo) -> list:
    """A node's metrics from its counters, compute-time histogram and info."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    steps = CounterMetricFamily("expertmesh_node_prelaunch_steps", "stage decode steps set running before their "
                                "request (CUDA), by outcome", labels=["outcome"])
    for outcome in ("answered", "gave_up", "let_go"):
        steps.add_metric([outcome], getattr(stats, f"prelaunch_{outcome}"))
    return [
        CounterMetricFamily("expertmesh_node_forward_requests", "Forward requests served",
                            value=stats.forward_requests),
        CounterMetricFamily("expertmesh_node_forward_tokens", "tokens in Forward requests", value=stats.forward_tokens),
        CounterMetricFamily("expertmesh_node_received_bytes", "Forward request bytes", value=stats.bytes_received),
        CounterMetricFamily("expertmesh_node_sent_bytes", "Forward response bytes", value=stats.bytes_sent),
        steps,
        histogram_family("expertmesh_node_forward_seconds", "compute time of one Forward request", [],
                         [([], compute)]),
        GaugeMetricFamily("expertmesh_node_experts_held", "routed experts held",
                          value=sum(len(le.experts) for le in info.held)),
        GaugeMetricFamily("expertmesh_node_memory_used_bytes", "bytes of experts held", value=info.memory_used_bytes),
        GaugeMetricFamily("expertmesh_node_memory_budget_bytes", "memory budget for experts",
                          value=info.memory_budget_bytes),
        GaugeMetricFamily("expertmesh_process_resident_bytes", "resident memory of the process",
                          value=resident_bytes()),
    ]
