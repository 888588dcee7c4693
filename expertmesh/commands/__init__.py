"""One module per ``expertmesh`` subcommand.

Each module has ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args)``; ``expertmesh.cli`` finds them by name, so adding a command
is adding a module. The flags several commands share (sampling, security,
discovery) are defined here once.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_sampling_arguments(p) -> None:
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens per reply; more than the context leaves is refused (default: the router's, "
                        "256, cut to what the context leaves)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before TEXT (repeat for more)")


def sampling_options(args):
    """The ``GenerationOptions`` the sampling flags ask for.

    Raises:
        InvalidRequestError: a value out of range.
    """
    from ..options import GenerationOptions

    return GenerationOptions(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                             seed=args.seed, stop=tuple(args.stop)).validate()


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 for any free one."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return int(text)


def at_least_one(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def positive(text: str) -> float:
    """An argparse type: a number above zero."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number above 0")
    return value


def discovery_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """``--discovery/--no-discovery`` and ``--interface``, shared by node and router."""
    p.add_argument("--discovery", action=argparse.BooleanOptionalAction, default=True,
                   help=f"{what} (default: on)")
    interface_argument(p)


def compile_argument(p: argparse.ArgumentParser) -> None:
    """``--compile/--no-compile``, shared by node and router."""
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="compile decode steps with mx.compile (default: on; off for A/B measurements)")


def interface_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interface", action="append", default=[], metavar="NAME_OR_IP",
                   help="network interface for mDNS, e.g. en0 or bridge0 (repeat for more; "
                        "default: every non-loopback interface)")


def metrics_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a free port; default off)")
def security_arguments(p: argparse.ArgumentParser) -> None:
    """``--token`` (default ``EXPERTMESH_TOKEN``, read when the parser is built: a secret
    is better kept out of the command line) and the three ``--tls-*`` files."""
    p.add_argument("--token", default=os.environ.get("EXPERTMESH_TOKEN"), metavar="TOKEN",
                   help="the cluster token every node, router and client shares (default: $EXPERTMESH_TOKEN)")
    p.add_argument("--tls-cert", type=Path, default=None, metavar="PEM", help="this process's certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="its private key")
    p.add_argument("--tls-ca", type=Path, default=None, metavar="PEM", help="the CA that signed the mesh's certificates")


def router_address(text: str) -> str:
    """An argparse type: the router's ``HOST:PORT`` (gRPC would dial port 443 without one)."""
    host, sep, number = text.rpartition(":")
    if not sep or not host or host.endswith(":") or not number.isdigit() or not 0 < int(number) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} has no port: give HOST:PORT, e.g. {text.rstrip(':')}:50050 "
                                         "(the address `expertmesh router` prints)")
    return text


def router_arguments(p: argparse.ArgumentParser) -> None:
    """``--router`` and the security flags: what a client command needs to reach a router."""
    p.add_argument("--router", default="127.0.0.1:50050", metavar="HOST:PORT", type=router_address,
                   help="the router's address (default 127.0.0.1:50050)")
    security_arguments(p)


def connect(args):
    """A ``Client`` of ``--router`` with the security flags.

    Raises:
        AuthError: a malformed token, or TLS files missing or unreadable.
    """
    from ..client import Client

    return Client(args.router, token=args.token or "", tls_cert=args.tls_cert, tls_key=args.tls_key,
                  tls_ca=args.tls_ca)
