"""What a newcomer meets: the README's first mesh, run line by line, and the
mistakes one makes on the way, each answered by a line that says what to do."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pexpect
import pytest

from expertmesh import Client, InvalidRequestError
from expertmesh.testing.process import Process

from conftest import REPO, cli, running_nodes, running_router
from test_cli import one_line_error

SERVERS = ("expertmesh node", "expertmesh router")  # lines that keep running


def readme_lines() -> list[str]:
    """The commands of the README's "first mesh by hand" block, the install line aside."""
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- first-mesh:", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return [l.split("  #")[0].strip() for l in block.splitlines() if l.strip() and not l.startswith("make install")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_in(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if m := re.search(pattern, log.read_text(), re.M):
            return m
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in {log}:\n{log.read_text()}")


def test_the_readme_first_mesh_runs_as_written(tmp_path):
    ports = {p: str(free_port()) for p in ("50061", "50062", "50050")}  # the README's, free ones here
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # as after `activate`
    servers, results = [], {}
    try:
        for line in readme_lines():
            for readme, free in ports.items():
                line = line.replace(readme, free)
            if line.startswith(SERVERS):
                log = tmp_path / f"server{len(servers)}.log"
                proc = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=REPO, env=env, text=True,
                                        stdout=log.open("w"), stderr=subprocess.STDOUT)
                servers.append((proc, log))
                port = re.search(r"--port (\d+)", line).group(1)
                wait_in(log, rf"^expertmesh (node \w+|router) listening on 127\.0\.0\.1:{port} ", proc)
            else:
                out = subprocess.run(["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True,
                                     timeout=120)
                assert out.returncode == 0, (line, out.stderr)
                results[line.split()[1]] = out
        assert results["--version"].stdout.strip() == "expertmesh 0.1.0"
        router_log = servers[-1][1].read_text()
        assert re.search(r"^expertmesh router listening on \S+ \(2 nodes: a, b; model stdlib-moe\)$", router_log, re.M)
        assert router_log.count("predicted decode") == 1  # the plan, printed once (not logged too)
        loaded = re.findall(r"loading ([ab]) layers [\d, -]+: done \((\d+\.\d) MB\)", router_log)  # no terminal
        assert sorted(n for n, _ in loaded) == ["a", "b"] and all(float(mb) > 0 for _, mb in loaded)
        assert "loading a: " not in router_log  # no empty expert assignment shown
        generated = results["generate"]
        assert generated.stdout.strip() and "[16 tokens, " in generated.stderr
        assert re.search(r"^a\b.*ready", results["cluster"].stdout, re.M)
        assert re.search(r"^b\b.*ready", results["cluster"].stdout, re.M)
        assert int(re.match(r"(\d+) tokens processed", results["stats"].stdout).group(1)) > 16
        long = cli("generate", "--router", f"127.0.0.1:{ports['50050']}", "word " * 1200)
        assert "the model's context is 1024" in one_line_error(long, "generate")
        assert "Token indices sequence length" not in servers[-1][1].read_text()
    finally:
        for proc, log in reversed(servers):  # the router first, then the nodes
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 130 and "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def mesh(tiny):
    with running_nodes(tiny, 2) as nodes, running_router(tiny, [n.address for n in nodes], http_port=0) as router:
        yield router, nodes


def test_wrong_addresses_and_paths_say_what_to_do(mesh, tiny):
    router, nodes = mesh
    node = nodes[0].address
    out = cli("generate", "--router", node, "Hello")
    assert f"router {node} is not an expertmesh router" in one_line_error(out, "generate")
    assert "is it a node?" in out.stderr
    out = cli("router", "--model", str(tiny), "--port", "0", "--peer", f"127.0.0.1:{router.port}")
    line = one_line_error(out, "router")
    assert f"127.0.0.1:{router.port} is not an expertmesh node" in line and "is it a router?" in line
    out = cli("generate", "--router", "localhost", "Hello")
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "expertmesh generate: error: argument --router: 'localhost' has no port: give HOST:PORT, e.g. "
        "localhost:50050 (the address `expertmesh router` prints)")
    out = cli("node", "--model", str(tiny / "config.json"))
    assert f"{tiny / 'config.json'} is a file: give the checkpoint's directory ({tiny})" in one_line_error(out, "node")
    with pytest.raises(InvalidRequestError, match="is not HOST:PORT"):
        Client("localhost")


def test_a_router_without_nodes_or_tokenizer_stops_before_loading(tiny, tmp_path):
    out = cli("router", "--model", str(tiny), "--no-discovery")
    assert "no nodes given: pass --peer HOST:PORT" in one_line_error(out, "router")
    assert "dense model" not in out.stderr  # refused before loading the model
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for f in tiny.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, bare / f.name)
    out = cli("router", "--model", str(bare), "--peer", "127.0.0.1:1")
    assert f"{bare} has no usable tokenizer" in one_line_error(out, "router")


def test_a_router_that_dies_under_a_generate_says_so(tiny, tmp_path):
    with running_nodes(tiny, 1) as nodes:
        router = Process(["router", "--model", str(tiny), "--port", "0", "--mode", "expert",
                          "--peer", nodes[0].address], tmp_path / "router.log")
        try:
            address = router.address(timeout=120)
            gen = subprocess.Popen([sys.executable, "-m", "expertmesh.cli", "generate", "--router", address, "Hi",
                                    "--max-tokens", "480"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert gen.stdout.read(1)  # generating
            router.proc.kill()
            _, err = gen.communicate(timeout=60)
            line = one_line_error(subprocess.CompletedProcess([], gen.returncode, "", err), "generate")
            assert f"router {address} went away after" in line and "try again once it is back" in line
        finally:
            router.proc.kill()
            router.proc.wait(timeout=30)


def test_first_tps_max_tokens_past_the_context_and_version(mesh):
    router, _ = mesh
    with Client(f"127.0.0.1:{router.port}") as client:
        pieces = list(client.generate("Hello", max_tokens=8))
        assert pieces[0].generation_tps == 0 and 0 < pieces[-1].generation_tps < 100_000
        with pytest.raises(InvalidRequestError, match=r"max_tokens is 600, but the prompt's \d+ tokens leave room "
                                                      r"for \d+ in the model's context of 512: ask for at most"):
            list(client.generate("Hello", max_tokens=600))
    api = openai.OpenAI(base_url=router.http.url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model="any", prompt="Hello", max_tokens=600)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
    assert api.completions.create(model="any", prompt="Hello", max_tokens=8).usage.completion_tokens == 8
    out = subprocess.run([sys.executable, "-m", "expertmesh.testing.tinymodel", "--help"], capture_output=True, text=True)
    assert out.stdout.startswith("usage: python -m expertmesh.testing.tinymodel ")


def test_chat_says_an_unknown_command_is_unknown(mesh):
    from test_chat_command import spawn_chat

    router, _ = mesh
    child = spawn_chat(router, max_tokens=4)
    try:
        child.expect_exact(">>> ")
        child.sendline("/help")
        child.expect_exact("[unknown command /help: /reset starts over")
        child.expect_exact(">>> ")
        assert "tokens, " not in child.before  # nothing went to the model
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
