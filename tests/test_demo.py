"""`make demo`'s program: runs end to end and never leaves processes behind."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from expertmesh.builtin import model_dir, vocabulary
from expertmesh.testing import netns


def processes_in_session(sid: int) -> list[str]:
    """The command lines of the processes left in session ``sid`` (the demo's, and its children's)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                session = int((proc / "stat").read_text().rpartition(")")[2].split()[3])
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError, IndexError):
                continue
            if session == sid:
                found.append(cmdline)
    return found


def namespaces_of(demo: subprocess.Popen) -> list[str]:
    if netns.unavailable():
        return []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line for line in listed.splitlines() if f"expertmesh-demo-{demo.pid}" in line]


def start_demo(home: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "EXPERTMESH_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "expertmesh.demo", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def test_demo_generates_through_two_nodes_and_stops_them(tmp_path):
    demo = start_demo(tmp_path)
    out, err = demo.communicate(timeout=300)
    assert demo.returncode == 0, err
    assert "router on 127.0.0.1:" in out
    if why := netns.unavailable():  # then the demo says why it cannot use mDNS
        assert f"no network namespace for mDNS here ({why})" in out and "static --peer list" in out
    else:
        assert f"over mDNS (loopback of network namespace expertmesh-demo-{demo.pid})" in out
    assert "48 tokens at" in out
    assert "node-a" in out and "node-b" in out
    for node in ("node-a", "node-b"):  # each holds something, and says how much memory it takes
        line = next(l for l in out.splitlines() if l.startswith(f"{node} ("))
        assert "nothing" not in line and not line.endswith(" 0.00 MB"), line
    assert "stopped the router and the nodes" in out
    assert f"model: {model_dir()} (a small qwen3_moe trained on CPython's standard library)" in out
    text = out.split("\n---\n")[1]  # greedy: it reads like the corpus, as tests/test_builtin.py checks
    words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)
    assert len(words) >= 5 and sum(w in vocabulary() for w in words) >= 0.7 * len(words), text
    assert processes_in_session(demo.pid) == []
    assert namespaces_of(demo) == []


def test_ctrl_c_during_the_demo_leaves_no_process(tmp_path):
    demo = start_demo(tmp_path, "--max-tokens", "400")
    for line in demo.stdout:
        if line.startswith("prompt:"):
            break
    os.killpg(demo.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, err = demo.communicate(timeout=60)
    assert demo.returncode in (1, 130), err
    assert "Traceback" not in err
    assert processes_in_session(demo.pid) == []
    assert namespaces_of(demo) == []
