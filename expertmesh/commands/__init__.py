"""One module per ``expertmesh`` subcommand.

Each module has ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args)``; ``expertmesh.cli`` finds them by name, so adding a command
is adding a module.
"""

import argparse
import os


def discovery_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """``--discovery/--no-discovery`` and ``--interface``, shared by node and router.

    Discovery is on unless ``--no-discovery`` or ``EXPERTMESH_DISCOVERY=off``.
    """
    p.add_argument("--discovery", action=argparse.BooleanOptionalAction,
                   default=os.environ.get("EXPERTMESH_DISCOVERY", "on") != "off",
                   help=f"{what} (default: on, unless EXPERTMESH_DISCOVERY=off)")
    interface_argument(p)


def interface_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interface", action="append", default=[], metavar="NAME_OR_IP",
                   help="network interface for mDNS, e.g. en0 or bridge0 (repeat for more; "
                        "default: every non-loopback interface)")
