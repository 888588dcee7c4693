"""RouterConfig: what a router is told (the CLI fills it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..security import Security
from .batching import MAX_BATCH, MAX_WAITING
from .link import REQUEST_LIMIT_S
from .validation import validate


@dataclass
class RouterConfig:
    model: Path                                    # checkpoint directory
    peers: list[str] = field(default_factory=list)  # node addresses, HOST:PORT
    host: str = "127.0.0.1"                        # address to listen on
    port: int = 50050                              # 0 picks a free port
    rpc_timeout: float = 10.0                      # GetInfo and other control calls
    assign_timeout: float = 600.0                  # a node loading its experts
    forward_timeout: float = 10.0                  # a node's silence on a request; then it counts as down
    request_limit: float = REQUEST_LIMIT_S         # a node still "working" on one request after this hangs
    replicas: int = 1                              # copies of every expert, where memory allows
    default_max_tokens: int = 256
    max_batch: int = MAX_BATCH                     # generations decoded together, one forward pass per step
    max_waiting: int = MAX_WAITING                 # generations queued beyond those; more get RESOURCE_EXHAUSTED
    http_port: int | None = None                   # OpenAI-compatible HTTP API; None: off, 0: a free port
    discovery: bool = False                        # find nodes over mDNS too (the CLI's default)
    interfaces: list[str] = field(default_factory=list)  # names or IPs for mDNS; [] = every non-loopback one
    expect: int | None = None                      # wait for this many nodes before planning
    settle: float = 3.0                            # without expect: plan once none new came for this long
    discovery_timeout: float = 60.0                # give up waiting for nodes after this long
    mode: str = "auto"                             # expert | pipeline | auto: see costmodel
    draft_model: Path | None = None                # a small model sharing the tokenizer: speculative decoding
    num_draft_tokens: int = 3                      # tokens the draft proposes per forward pass through the mesh
    metrics_port: int | None = None                # Prometheus /metrics; None: off, 0: a free port
    security: Security = field(default_factory=Security)  # cluster token and TLS files, both directions
    placement_stats: Path | None = None            # place experts by this popularity (stats JSON), not contiguously
    rebalance_threshold: float | None = None       # rebalance when the live balance ratio falls below; None: off
    rebalance_interval: float = 30.0               # seconds between automatic checks
    rebalance_min_tokens: int = 256                # tokens through the model since the last change before acting
    takeover: bool = False                         # take nodes that serve another router (it then stops using them)
    compile: bool = True                           # mx.compile decode steps (off: for A/B measurements)
    prefill_chunk: int | None = None               # a prompt's tokens a row per chunk pipelined through consecutive
                                                   # spans; 0: none; None: 128 where they run on other hosts (chain.py)

    def __post_init__(self) -> None:
        validate(self)  # InvalidRequestError naming the field
