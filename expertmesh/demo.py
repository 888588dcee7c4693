"""``make demo``: a local mesh on the built-in tiny model.

Builds the tiny model if missing, starts two node processes and a router on
loopback (``--peer``; mDNS discovery is not wired up yet), generates text
through the Python client, prints the cluster, and stops everything — also
on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import queue
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from .client import Client
from .errors import ExpertmeshError
from .tinymodel import ensure_demo_model

_LISTENING = re.compile(r"listening on (\S+)")


class Process:
    """A child expertmesh process whose address we learn from its stdout."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "expertmesh.cli", *args],
            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
        self._lines: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def address(self, timeout: float) -> str:
        try:
            while (line := self._lines.get(timeout=timeout)) is not None:
                if m := _LISTENING.search(line):
                    return m.group(1)
        except queue.Empty:
            raise ExpertmeshError(f"no address after {timeout:g}s; see {self.log}") from None
        tail = self.log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise ExpertmeshError(f"process exited early: {tail[0]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run(prompt: str, max_tokens: int, nodes: int) -> None:
    model = ensure_demo_model()
    print(f"model: {model} (tiny random-weight qwen3_moe)")
    procs: list[Process] = []
    with tempfile.TemporaryDirectory(prefix="expertmesh-demo-") as logs:
        try:
            peers = []
            for i in range(nodes):
                name = f"node-{chr(ord('a') + i)}"
                procs.append(Process(["node", "--model", str(model), "--port", "0", "--name", name,
                                      "--memory-gb", "1"], Path(logs) / f"{name}.log"))
            for p in procs:
                peers.append(p.address(timeout=120))
            print(f"nodes on loopback: {', '.join(peers)} (static --peer list)")
            router = Process(["router", "--model", str(model), "--port", "0",
                              *[a for peer in peers for a in ("--peer", peer)]], Path(logs) / "router.log")
            procs.append(router)
            address = router.address(timeout=120)
            print(f"router on {address}\n")
            with Client(address) as client:
                print(f"prompt: {prompt!r}\n---")
                last = None
                for piece in client.generate(prompt, max_tokens=max_tokens):
                    print(piece.text, end="", flush=True)
                    last = piece
                print(f"\n---\n{last.generation_tokens} tokens at {last.generation_tps:.1f} tok/s "
                      "(random weights: the text is gibberish, the plumbing is real)\n")
                for node in client.cluster().nodes:
                    layers = sorted(node.experts)
                    print(f"{node.name} ({node.address}, {node.state}): experts "
                          f"{node.experts[layers[0]][0]}-{node.experts[layers[0]][-1]} of every MoE layer, "
                          f"{node.memory_used_bytes / 1e6:.2f} MB")
        finally:
            for p in reversed(procs):
                p.stop()
    print("\nstopped the router and the nodes.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="expertmesh.demo", description=__doc__)
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        run(args.prompt, args.max_tokens, args.nodes)
    except ExpertmeshError as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; everything stopped.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
