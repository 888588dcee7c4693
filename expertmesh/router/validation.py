"""The checks a ``RouterConfig`` must pass, worded as the CLI's flags are.

``validate(config)`` is meant for ``RouterConfig.__post_init__``; the CLI
calls it before it starts a router.
"""

from __future__ import annotations

from ..options import check, is_port, is_positive
from ..serving import HEARTBEAT_S

MODES = ("expert", "pipeline", "auto")


def validate(config) -> None:
    """Check a ``RouterConfig``'s fields and how they combine.

    Raises:
        InvalidRequestError: naming the field at fault in ``param``.
    """
    check(is_port(config.port), "port", f"--port must be 0-65535, not {config.port!r}")
    check(is_port(config.http_port, optional=True), "http_port",
          f"--http-port must be 0-65535, not {config.http_port!r}")
    check(is_port(config.metrics_port, optional=True), "metrics_port",
          f"--metrics-port must be 0-65535, not {config.metrics_port!r}")
    check(config.mode in MODES, "mode", f"--mode must be one of {', '.join(MODES)}, not {config.mode!r}")
    check(type(config.replicas) is int and config.replicas >= 1, "replicas", "--replicas must be at least 1")
    check(config.expect is None or (type(config.expect) is int and config.expect >= 1), "expect",
          "--expect must be at least 1")
    for name in ("settle", "discovery_timeout", "rebalance_interval"):
        check(is_positive(getattr(config, name)), name, f"{name} must be a number above 0")
    check(not (config.placement_stats is not None and config.replicas != 1), "placement_stats",
          "--placement-stats plans the copies itself: leave --replicas out")
    check(not (config.mode == "pipeline" and (config.replicas != 1 or config.placement_stats is not None)), "mode",
          "--mode pipeline runs whole layers on one node each: --replicas and "
          "--placement-stats only apply to experts spread across nodes (--mode expert or auto)")
    check(config.rebalance_threshold is None or (is_positive(config.rebalance_threshold)
                                                 and config.rebalance_threshold <= 1),
          "rebalance_threshold", "--rebalance-threshold must be in (0, 1]")
    check(type(config.rebalance_min_tokens) is int and config.rebalance_min_tokens >= 0, "rebalance_min_tokens",
          "--rebalance-min-tokens must be 0 or more")
    check(is_positive(config.forward_timeout) and config.forward_timeout >= 2 * HEARTBEAT_S, "forward_timeout",
          f"--forward-timeout must be at least {2 * HEARTBEAT_S:g} s: a node computing a long "
          f"request says so every {HEARTBEAT_S:g} s")
    check(is_positive(config.request_limit) and config.request_limit >= config.forward_timeout, "request_limit",
          "--request-limit must be at least --forward-timeout")
    check(type(config.num_draft_tokens) is int and config.num_draft_tokens >= 1, "num_draft_tokens",
          "--num-draft-tokens must be at least 1")
    check(config.prefill_chunk is None or (type(config.prefill_chunk) is int and config.prefill_chunk >= 0),
          "prefill_chunk", "--prefill-chunk must be 0 (off) or more tokens")
    for name in ("discovery", "takeover", "compile"):
        check(type(getattr(config, name)) is bool, name, f"{name} must be True or False")
