"""The ``expertmesh`` command; each subcommand is a module of ``expertmesh.commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import signal
import sys

from . import __version__, commands
from .errors import ExpertmeshError


def _commands() -> dict:
    return {m.name: importlib.import_module(f"{commands.__name__}.{m.name}")
            for m in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name)}


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertmesh", description="Distributed Mixture-of-Experts inference for MLX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"expertmesh {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in _commands().items():
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
    return parser


def _stop_on_sigterm() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status. Run as the program (``argv`` None),
    the process ends here, skipping the interpreter's teardown, where threads
    that used mlx can abort it ("terminate called without an active
    exception", see worker.py) after the command ended well."""
    code = _run(argv)
    if argv is not None:
        return code
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say
            pass
    os._exit(code)


def _run(argv: list[str] | None) -> int:
    args = setup_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    _stop_on_sigterm()
    try:
        _commands()[args.command].run(args)
    except ExpertmeshError as e:
        print(f"expertmesh {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
