"""``make demo``: a local mesh on the built-in model, found over mDNS.

On the model that ships with the package (a small qwen3_moe trained on
CPython's standard library: ``expertmesh.builtin``), starts two node processes and a router,
generates text through the Python client, prints the cluster, and stops
everything — also on Ctrl-C or an error.

The router finds the nodes over mDNS on loopback inside a network namespace
of its own (multicast switched on for its ``lo``), so nothing is announced
on this machine's network. Where no namespace can be made (not root, no
``ip``, not Linux) the demo says so and gives the router ``--peer`` addresses.

It drives the CLI with the same harness as the tests (``expertmesh.testing``:
child processes and network namespaces), so what the demo shows is what they check.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from .client import Client
from .errors import ExpertmeshError
from .testing import netns
from .testing.process import Process


def run(prompt: str, max_tokens: int, nodes: int, namespace: str | None) -> None:
    """The demo; with ``namespace``, we run inside it and use mDNS on its loopback.

    Raises:
        KeyboardInterrupt: on Ctrl-C or SIGTERM, once every process is stopped.
    """
    from .builtin import model_dir

    model = model_dir()
    print(f"model: {model} (a small qwen3_moe trained on CPython's standard library)")
    procs: list[Process] = []
    interrupted = threading.Event()

    def interrupt(signum, frame):
        # No KeyboardInterrupt inside a gRPC call (closing its channel could then hang):
        # stopping the children ends whatever we wait for.
        interrupted.set()
        for p in procs:
            p.proc.terminate()

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    with tempfile.TemporaryDirectory(prefix="expertmesh-demo-") as logs:
        try:
            address = _start_mesh(model, nodes, namespace, Path(logs), procs, interrupted)
            _generate(address, prompt, max_tokens)
        except ExpertmeshError:
            if interrupted.is_set():
                raise KeyboardInterrupt from None
            raise
        finally:
            for p in reversed(procs):
                p.stop()
    if interrupted.is_set():
        raise KeyboardInterrupt
    print("\nstopped the router and the nodes.")


def _start_mesh(model: Path, nodes: int, namespace: str | None, logs: Path, procs: list[Process],
                interrupted: threading.Event) -> str:
    """Start the nodes and the router (into ``procs``); returns the router's address."""
    mdns = ["--discovery", "--interface", "lo"] if namespace else ["--no-discovery"]

    def start(args: list[str], name: str) -> Process:
        procs.append(Process(args, logs / f"{name}.log"))
        if interrupted.is_set():  # it may have come before this process was in `procs`
            raise KeyboardInterrupt
        return procs[-1]

    for name in [f"node-{chr(ord('a') + i)}" for i in range(nodes)]:
        start(["node", "--model", str(model), "--port", "0", "--name", name, "--memory-gb", "1", *mdns], name)
    addresses = [p.address(timeout=120) for p in procs]
    print(f"nodes on loopback: {', '.join(addresses)}")
    if namespace:
        router_args = ["--expect", str(nodes)]
        print(f"discovery: the router finds them over mDNS (loopback of network namespace {namespace})")
    else:
        router_args = [a for address in addresses for a in ("--peer", address)]
        print("discovery: static --peer list")
    router = start(["router", "--model", str(model), "--port", "0", *mdns, *router_args], "router")
    address = router.address(timeout=120)
    print(f"router on {address}\n")
    return address


def _generate(address: str, prompt: str, max_tokens: int) -> None:
    with Client(address) as client:
        print(f"prompt: {prompt!r}\n---")
        last = None
        for piece in client.generate(prompt, max_tokens=max_tokens):
            print(piece.text, end="", flush=True)
            last = piece
        print(f"\n---\n{last.generation_tokens} tokens at {last.generation_tps:.1f} tok/s\n")
        for node in client.cluster().nodes:
            work = [f"whole layer {a}" if b == a + 1 else f"whole layers {a}-{b - 1}" for a, b in node.stages]
            held = [e for e in node.experts.values() if e]
            if held:
                work.append(f"experts {held[0][0]}-{held[0][-1]} of every MoE layer"
                            f"{' left to expert mode' if node.stages else ''}")
            print(f"{node.name} ({node.address}, {node.state}): {', '.join(work) or 'nothing'}, "
                  f"{node.memory_used_bytes / 1e6:.2f} MB")


def in_namespace(argv: list[str]) -> int:
    """Run this demo again inside a fresh network namespace; remove the namespace after."""
    ns = netns.Namespace(f"expertmesh-demo-{os.getpid()}")
    try:
        ns.ip("link", "set", "lo", "multicast", "on")
        child = subprocess.Popen([*ns.prefix, sys.executable, "-m", "expertmesh.demo",
                                  "--in-namespace", ns.name, *argv])
        # Ctrl-C reaches the child too (one process group): it stops its processes; we wait for it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: child.terminate())
        code = child.wait()
        return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention
    finally:
        ns.delete()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="expertmesh.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="class Point:\n    def __repr__(self):\n        return ")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--in-namespace", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt
    try:
        if args.in_namespace is None:
            why = netns.unavailable()
            if not why:
                try:
                    return in_namespace(argv)
                except OSError as e:
                    why = str(e)
            print(f"no network namespace for mDNS here ({why}): the nodes go to the router as --peer addresses")
        run(args.prompt, args.max_tokens, args.nodes, args.in_namespace)
    except ExpertmeshError as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; everything stopped.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
