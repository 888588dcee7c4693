"""The CLI as a user runs it: real processes, one clear line on every error."""

import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from expertmesh.testing.certs import write_test_certs
from expertmesh.testing.process import Process
from expertmesh.testing.tinymodel import write_tiny_model

from conftest import cli


@dataclass
class Mesh:
    address: str      # the router
    nodes: list[str]  # the nodes' addresses
    router_log: Path | None = None
    metrics: list[str] | None = None  # /metrics URLs: the router's, then mini0's


@pytest.fixture(scope="module")
def mesh(tiny, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    nodes = [Process(["node", "--model", str(tiny), "--port", "0", "--name", f"mini{i}", "--memory-gb", "1"]
                     + ["--metrics-port", "0"] * (i == 0), logs / f"node{i}.log") for i in range(2)]
    procs = list(nodes)
    try:
        peers = [n.address(timeout=120) for n in nodes]
        node_metrics = nodes[0].wait_for(_METRICS, timeout=30).group(1)
        router = Process(["router", "--model", str(tiny), "--port", "0", "--peer", peers[0], "--peer", peers[1],
                          "--metrics-port", "0", "--replicas", "2", "--mode", "expert"],
                         logs / "router.log")  # experts in `cluster`
        procs.append(router)
        address = router.address(timeout=120)
        yield Mesh(address, peers, router.log, [router.wait_for(_METRICS, timeout=30).group(1), node_metrics])
    finally:
        for p in procs:
            p.stop()


_METRICS = r"Prometheus metrics at (http://\S+/metrics)"


def one_line_error(result, command):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [l for l in result.stderr.splitlines() if l.startswith(f"expertmesh {command}: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_generate_streams_text_and_cluster_shows_the_nodes(mesh):
    address = mesh.address
    out = cli("generate", "--router", address, "Hello", "--max-tokens", "16")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "[16 tokens" in out.stderr
    table = cli("cluster", "--router", address)
    assert table.returncode == 0, table.stderr
    assert "mini0" in table.stdout and "mini1" in table.stdout
    assert table.stdout.count("0-7 (every layer)") == 2  # --replicas 2: both nodes hold every expert
    assert table.stdout.count(" / 1.00 GB") == 2  # each node's memory, used in its own unit / budget
    assert table.stdout.count("ready") == 2


def test_router_logs_each_node_loading_and_both_serve_metrics(mesh):
    log = mesh.router_log.read_text()
    for node in ("mini0", "mini1"):  # stderr is no terminal: a line when it starts, one when it is done
        assert f"loading {node}: " in log and f"loading {node}: done" in log
    assert "\r" not in log  # no progress bar
    for url, name in zip(mesh.metrics, ["expertmesh_router_node_tokens", "expertmesh_node_memory_used_bytes"]):
        with urllib.request.urlopen(url, timeout=10) as r:
            families = {f.name for f in text_string_to_metric_families(r.read().decode())}
        assert name in families


def test_prompt_longer_than_the_context_is_one_line(mesh):
    address = mesh.address
    out = cli("generate", "--router", address, "word " * 600)
    assert "the model's context is 512" in one_line_error(out, "generate")


def test_generate_without_a_router_is_one_line():
    out = cli("generate", "--router", "127.0.0.1:1", "hi")
    assert "cannot reach router 127.0.0.1:1" in one_line_error(out, "generate")


def test_stats_errors_are_one_line(mesh, tmp_path):
    out = cli("stats", "--router", "127.0.0.1:1")
    assert "cannot reach router 127.0.0.1:1" in one_line_error(out, "stats")
    out = cli("stats", "--router", mesh.address, "--plot", str(tmp_path / "no" / "such" / "dir.png"))
    assert "cannot write" in one_line_error(out, "stats")


def test_router_without_reachable_peer_is_one_line(tiny):
    out = cli("router", "--model", str(tiny), "--port", "0", "--peer", "127.0.0.1:1")
    assert "no reachable node" in one_line_error(out, "router")


@pytest.mark.parametrize("flag,value,says", [("--replicas", "0", "'0' is not a whole number of at least 1"),
                                             ("--forward-timeout", "0", "'0' is not a number above 0")])
def test_router_bad_replicas_or_deadline_is_one_line(tiny, flag, value, says):
    out = cli("router", "--model", str(tiny), "--port", "0", "--peer", "127.0.0.1:1", flag, value)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == f"expertmesh router: error: argument {flag}: {says}"


def test_router_deadlines_the_heartbeats_cannot_meet_are_one_line(tiny):
    base = ("router", "--model", str(tiny), "--port", "0", "--peer", "127.0.0.1:1")
    assert "--forward-timeout must be at least 1 s" in one_line_error(cli(*base, "--forward-timeout", "0.5"), "router")
    out = cli(*base, "--forward-timeout", "20", "--request-limit", "5")
    assert "--request-limit must be at least --forward-timeout" in one_line_error(out, "router")


def test_missing_and_unsupported_checkpoints_are_one_line(tmp_path):
    out = cli("node", "--model", str(tmp_path / "nope"))
    assert "does not exist" in one_line_error(out, "node")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    out = cli("router", "--model", str(tmp_path), "--peer", "127.0.0.1:1")
    line = one_line_error(out, "router")
    assert "'llama' is not supported" in line and "qwen3_moe" in line


def test_router_refuses_a_node_with_another_checkpoint(tiny, tmp_path):
    other = write_tiny_model(tmp_path / "other", seed=5, config_overrides={"num_hidden_layers": 2})
    node = Process(["node", "--model", str(other), "--port", "0", "--name", "odd"], tmp_path / "odd.log")
    try:
        out = cli("router", "--model", str(tiny), "--port", "0", "--peer", node.address(timeout=120))
        line = one_line_error(out, "router")
        assert "serves model other" in line and "same checkpoint" in line
    finally:
        node.stop()


@pytest.mark.parametrize("role", ["node", "router"])
def test_ctrl_c_stops_a_process_cleanly(mesh, tiny, tmp_path, role):
    args = ["node", "--model", str(tiny), "--port", "0"]
    own = Process(args, tmp_path / "own-node.log") if role == "router" else None  # mesh's node serves its router
    if own is not None:
        args = ["router", "--model", str(tiny), "--port", "0", "--peer", own.address(timeout=120)]
    p = Process(args, tmp_path / f"{role}.log")
    try:
        p.address(timeout=120)
        p.proc.send_signal(signal.SIGINT)
        assert p.proc.wait(timeout=30) == 130
        assert "Traceback" not in p.log.read_text()
    finally:
        p.stop()
        if own is not None:
            own.stop()



# --- a mesh with a cluster token and mutual TLS -------------------------------------------
TOKEN = "cli-token"


@pytest.fixture(scope="module")
def secure_mesh(tiny, tmp_path_factory):
    logs = tmp_path_factory.mktemp("secure-logs")
    certs = write_test_certs(logs / "certs")
    tls = lambda name: ["--tls-cert", str(certs / f"{name}.pem"), "--tls-key", str(certs / f"{name}-key.pem"),
                        "--tls-ca", str(certs / "ca.pem")]
    with pytest.MonkeyPatch.context() as env:  # the node takes the token from the environment
        env.setenv("EXPERTMESH_TOKEN", TOKEN)
        node = Process(["node", "--model", str(tiny), "--port", "0", "--name", "vault", *tls("node")],
                       logs / "node.log")
    procs = [node]
    try:
        peer = node.address(timeout=120)
        router = Process(["router", "--model", str(tiny), "--port", "0", "--peer", peer, "--token", TOKEN,
                          *tls("router")], logs / "router.log")
        procs.append(router)
        yield Mesh(router.address(timeout=120), [peer]), tls("client"), node
    finally:
        for p in procs:
            p.stop()


def test_token_and_tls_from_the_cli(secure_mesh, monkeypatch):
    (mesh_, client_tls, _) = secure_mesh
    monkeypatch.delenv("EXPERTMESH_TOKEN", raising=False)
    out = cli("generate", "--router", mesh_.address, "Hello", "--max-tokens", "4", *client_tls)
    assert "no cluster token given: pass --token or set EXPERTMESH_TOKEN" in one_line_error(out, "generate")
    out = cli("cluster", "--router", mesh_.address, "--token", "guess", *client_tls)
    assert "wrong cluster token" in one_line_error(out, "cluster")
    out = cli("cluster", "--router", mesh_.address, "--token", TOKEN)  # plaintext to a TLS router
    assert f"cannot reach router {mesh_.address}" in one_line_error(out, "cluster")
    monkeypatch.setenv("EXPERTMESH_TOKEN", TOKEN)
    out = cli("generate", "--router", mesh_.address, "Hello", "--max-tokens", "4", *client_tls)
    assert out.returncode == 0 and "[4 tokens" in out.stderr, out.stderr


def test_bad_tls_files_port_in_use_and_bad_flags_are_one_line(secure_mesh, tiny, tmp_path):
    (mesh_, client_tls, _) = secure_mesh
    missing = [*client_tls[:2], "--tls-key", str(tmp_path / "nope.pem"), *client_tls[4:]]
    out = cli("generate", "--router", mesh_.address, "Hi", *missing)
    assert "--tls-key" in one_line_error(out, "generate") and "No such file" in out.stderr
    out = cli("cluster", "--router", mesh_.address, *client_tls[:2])
    assert "TLS needs all of --tls-cert, --tls-key and --tls-ca" in one_line_error(out, "cluster")
    out = cli("node", "--model", str(tiny), "--port", mesh_.nodes[0].rpartition(":")[2])
    assert "Address already in use" in one_line_error(out, "node")
    out = cli("node", "--model", str(tiny), "--port", "70000")
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == \
        "expertmesh node: error: argument --port: '70000' is not a port (0-65535)"


def test_ctrl_c_and_a_node_dying_mid_generation_end_in_one_line(secure_mesh, tmp_path):
    """Runs last in this module: it kills the mesh's node."""
    (mesh_, client_tls, node) = secure_mesh
    args = ["generate", "--router", mesh_.address, "Hi", "--max-tokens", "480", "--token", TOKEN, *client_tls]
    for stop in ("ctrl-c", "node dies"):
        gen = subprocess.Popen([sys.executable, "-m", "expertmesh.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        try:
            assert gen.stdout.read(1)  # generating
            if stop == "ctrl-c":
                gen.send_signal(signal.SIGINT)
                assert gen.wait(timeout=60) == 130
                assert "Traceback" not in gen.stderr.read()
            else:
                node.proc.kill()
                _, err = gen.communicate(timeout=120)
                result = subprocess.CompletedProcess(args, gen.returncode, "", err)
                assert "vault" in one_line_error(result, "generate")
        finally:
            gen.kill()
            gen.wait()
