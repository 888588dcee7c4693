"""Nodes and the router find each other over mDNS, each on a host of its own
(a network namespace with one veth into a bridge), and the router keeps up
as nodes leave and come back."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from expertmesh import DiscoveryError
from expertmesh.checkpoint import Checkpoint
from expertmesh.discovery import Bounds, Interface, NodeRecord, resolve_interfaces
from expertmesh.serving import KEEPALIVE_S, KEEPALIVE_TIMEOUT_S
from expertmesh.testing.process import Process

from conftest import cli
from lan import IFACE, Lan, make_lan
from test_cli import one_line_error
from test_correctness import PROMPT, reference_tokens

TOKENS = 24
MDNS = ["--discovery", "--interface", IFACE]


def test_txt_record_round_trips_and_long_expert_lists_span_several_strings():
    same = NodeRecord("mini-a", 1, "Qwen3-30B-A3B-4bit", "3f2a", 12 * 10**9, "ready", {l: [0, 1, 2, 3] for l in range(48)})
    assert same.to_txt()["held"] == "0-47:0-3"
    held = {l: list(range(l % 2, 128, 2)) for l in range(48)}  # every other expert: long lists
    record = NodeRecord("mini-a", 1, "Qwen3-30B-A3B-4bit", "3f2a", 12 * 10**9, "loading", held, "0.1.0")
    txt = record.to_txt()
    assert "held2" in txt and all(len(f"{k}={v}".encode()) <= 255 for k, v in txt.items())
    assert NodeRecord.from_txt({k.encode(): v.encode() for k, v in txt.items()}) == record


def test_unreadable_txt_records_say_why():
    txt = {k.encode(): v.encode() for k, v in NodeRecord("n", 1, "m", "c", 1).to_txt().items()}
    with pytest.raises(ValueError, match="lacks config"):
        NodeRecord.from_txt({k: v for k, v in txt.items() if k != b"config"})
    with pytest.raises(ValueError, match="unknown state 'asleep'"):
        NodeRecord.from_txt({**txt, b"state": b"asleep"})


def test_records_are_read_within_the_models_counts_or_small_absolute_caps():
    txt = {k.encode(): v.encode() for k, v in NodeRecord("n", 1, "m", "c", 1).to_txt().items()}
    model = Bounds(layers=48, experts=128, config_hash="c")
    assert NodeRecord.from_txt({**txt, b"held": b"0-47:0-127"}, model).held[47] == list(range(128))
    for held, why in ((b"0-99999:0-99999", "ids lie below 48"), (b"0:0-128", "ids lie below 128"),
                      (b"0:" + b"0-127," * 2, "more than 128 ids"), (b"3-1:0", "not a number or a range")):
        start = time.perf_counter()
        with pytest.raises(ValueError, match=why):
            NodeRecord.from_txt({**txt, b"held": held}, model)
        assert time.perf_counter() - start < 0.01
    # another model's record (refused for its config anyway) and a router that knows no model yet: absolute caps
    with pytest.raises(ValueError, match="ids lie below 512"):
        NodeRecord.from_txt({**txt, b"config": b"other", b"held": b"0-99999:0"}, model)
    with pytest.raises(ValueError, match=r"more than 65536 \(layer, expert\) pairs"):
        NodeRecord.from_txt({**txt, b"held": b"0-511:0-2047"})
    with pytest.raises(ValueError, match="mem must be"):
        NodeRecord.from_txt({**txt, b"mem": b"-1"})
    # a node whose list would not fit a record leaves it out rather than send what no router reads
    scattered = {l: list(range(l % 7, 2048, 7)) for l in range(60)}
    assert NodeRecord("n", 1, "m", "c", 1, held=scattered).to_txt()["held"] == ""


def test_interfaces_are_named_or_given_by_address_and_unknown_ones_are_one_line(tiny):
    assert resolve_interfaces(["lo"]) == resolve_interfaces(["127.0.0.1"]) == [Interface("lo", "127.0.0.1", 8)]
    default = resolve_interfaces([])
    assert default and (all(not i.is_loopback for i in default) or default == resolve_interfaces(["lo"]))
    with pytest.raises(DiscoveryError, match=r"no interface 'nope0' .*there are: lo \(127\.0\.0\.1\)"):
        resolve_interfaces(["nope0"])
    out = cli("node", "--model", str(tiny), "--discovery", "--interface", "nope0")
    assert "no interface 'nope0'" in one_line_error(out, "node")


@dataclass
class Mesh:
    lan: Lan
    model: Path
    logs: Path
    procs: dict[str, Process] = field(default_factory=dict)  # by node name, and "router"
    address: str = ""                                         # the router's, inside its host

    def node(self, host: str, name: str, key: str | None = None) -> Process:
        p = Process(["node", "--model", str(self.model), "--name", name, "--memory-gb", "1", *MDNS],
                    self.logs / f"{key or name}-{host}-{len(self.procs)}.log", prefix=self.lan.hosts[host].prefix)
        self.procs[key or name] = p
        return p

    @property
    def router(self) -> Process:
        return self.procs["router"]

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """The expertmesh CLI on the router's host."""
        return subprocess.run([*self.lan.hosts["router"].prefix, sys.executable, "-m", "expertmesh.cli", *args],
                              capture_output=True, text=True, timeout=120)

    def cluster(self) -> dict[str, str]:
        """Node name -> its line (and error line) in ``expertmesh cluster``."""
        out = self.cli("cluster", "--router", self.address)
        assert out.returncode == 0, out.stderr
        rows: dict[str, str] = {}
        name = ""
        for line in out.stdout.splitlines()[2:]:
            if line.startswith(" "):  # "error: ..." under its node
                rows[name] += "\n" + line.strip()
            else:
                name = line.split()[0]
                rows[name] = line
        return rows

    def greedy_tokens(self) -> list[int]:
        code = ("import json, sys; from expertmesh import Client\n"
                "with Client(sys.argv[1]) as c:\n"
                "    print(json.dumps([p.token for p in c.generate(sys.argv[2], max_tokens=int(sys.argv[3]))]))")
        out = subprocess.run([*self.lan.hosts["router"].prefix, sys.executable, "-c", code, self.address, PROMPT,
                              str(TOKENS)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


@pytest.fixture(scope="module")
def lan():
    lan = make_lan("router", "a", "b", "c", "x")
    yield lan
    lan.close()


@pytest.fixture(scope="module")
def expected(tiny) -> list[int]:
    return reference_tokens(tiny, PROMPT, TOKENS)


@pytest.fixture(scope="module")
def mesh(lan, tiny, tmp_path_factory):
    mesh = Mesh(lan, tiny, tmp_path_factory.mktemp("discovery-logs"))
    try:
        for p in (mesh.node("a", "mini-a"), mesh.node("b", "mini-b")):
            p.address(timeout=120)
        # expert mode: the tests follow each node's experts
        mesh.procs["router"] = Process(["router", "--model", str(tiny), "--port", "0", *MDNS, "--expect", "2",
                                        "--mode", "expert"],
                                       mesh.logs / "router.log", prefix=lan.hosts["router"].prefix)
        mesh.address = mesh.router.address(timeout=120)
        yield mesh
    finally:
        for p in sorted(mesh.procs.values(), key=lambda p: p is not mesh.procs.get("router")):
            p.stop()  # the router first, so it does not watch the nodes go


def test_router_finds_the_nodes_and_generates_what_mlx_lm_generates(mesh, expected):
    rows = mesh.cluster()
    assert "mini-a" in rows and "mini-b" in rows
    a, b = mesh.lan.hosts["a"].ip, mesh.lan.hosts["b"].ip
    assert f" {a}:" in rows["mini-a"] and "ready" in rows["mini-a"] and "0-3 (every layer)" in rows["mini-a"]
    assert f" {b}:" in rows["mini-b"] and "ready" in rows["mini-b"] and "4-7 (every layer)" in rows["mini-b"]
    assert mesh.greedy_tokens() == expected


def test_nodes_announce_their_state_and_experts(mesh):
    out = mesh.cli("discover", "--interface", IFACE, "--expect", "2", "--timeout", "30")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[2:]}
    for name, held in (("mini-a", "0-3 (every layer)"), ("mini-b", "4-7 (every layer)")):
        assert " ready " in rows[name] and held in rows[name] and "mlx-f32" in rows[name]
        assert " 1.0 GB " in rows[name]


def resident_bytes(pid: int) -> int:
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return int(fields["VmRSS"].split()[0]) * 1024


# before a second router takes these nodes over (issue 14, point 10)
def test_crafted_records_are_skipped_in_one_line_each_and_cost_the_router_nothing(mesh, lan, tiny, expected):
    router = mesh.router.proc.pid  # `ip netns exec` execs: this is the router's python
    before = resident_bytes(router)
    fakes = subprocess.Popen(
        [*lan.hosts["x"].prefix, sys.executable, "-c", CRAFTED_RECORDS, IFACE, Checkpoint(tiny).config_hash],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert fakes.stdout.readline().strip() == "advertised"
        deadline = time.monotonic() + 30
        while not all(f"mDNS: {n} at" in (log := mesh.router.log.read_text()) for n in CRAFTED) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        out = subprocess.run([*lan.hosts["router"].prefix, sys.executable, "-c", CLUSTER_LATENCY, mesh.address,
                              PROMPT, str(TOKENS)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        latency = json.loads(out.stdout)
        during = resident_bytes(router)
    finally:
        fakes.communicate(timeout=30)
    for name, why in CRAFTED.items():
        (line,) = [l for l in log.splitlines() if f"mDNS: {name} at" in l]  # one warning line each
        assert "WARNING" in line and "cannot join: unreadable TXT record: " in line and why in line, line
    print(f"\nrouter RSS {before / 2**20:.0f} -> {during / 2**20:.0f} MB with the crafted records on the wire; "
          f"GetCluster worst {max(latency['cluster']) * 1e3:.0f} ms of {len(latency['cluster'])}")
    assert during - before < 32 << 20  # not 10^10 integers
    assert max(latency["cluster"]) < 1.0 and latency["tokens"] == expected
    assert len(latency["followed"]) == 3  # a browser follows a bounded number of nodes


# what each crafted record makes the router say
CRAFTED = {
    "bomb": "held group '0-99999:0-99999': 99999 is out of range: ids lie below 4",  # the tiny model's 4 layers
    "garbled": "held group 'x-y:1': 'x-y' is not a number or a range N-M",
    "bloated": "at most 4096 bytes in 32 keys",
    "shouting": "name is not printable text",
}

CRAFTED_RECORDS = """
import asyncio, sys
from zeroconf import ServiceInfo
from expertmesh.discovery import SERVICE_TYPE, resolve_interfaces
from expertmesh.discovery.mdns import MDNS
interfaces = resolve_interfaces([sys.argv[1]])
ip = interfaces[0].ip
base = {"name": "x", "proto": "1", "model": "mlx-f32", "config": sys.argv[2], "mem": "1000000000", "state": "ready"}
crafted = {"bomb": {"held": "0-99999:0-99999"}, "garbled": {"held": "x-y:1"},
           "bloated": {f"pad{i}": "p" * 180 for i in range(31)}, "shouting": {"name": "a\\nfake log line"}}
mdns = MDNS(interfaces)
infos = [ServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=4100 + i, parsed_addresses=[ip],
                     properties={**base, **extra}, server=f"crafted-{name}.local.")
         for i, (name, extra) in enumerate(crafted.items())]
async def each(method):
    await asyncio.gather(*[await method(info) for info in infos])
try:
    mdns.submit(each(mdns.zc.async_register_service)).result(30)
    print("advertised", flush=True)
    sys.stdin.read()
    mdns.submit(each(mdns.zc.async_unregister_service)).result(30)
finally:
    mdns.close()
"""

CLUSTER_LATENCY = """
import json, queue, sys, time
from expertmesh import Client
from expertmesh.discovery import Browser, resolve_interfaces
with Client(sys.argv[1]) as c:
    cluster = []
    for _ in range(20):
        tic = time.perf_counter()
        c.cluster()
        cluster.append(time.perf_counter() - tic)
    tokens = [p.token for p in c.generate(sys.argv[2], max_tokens=int(sys.argv[3]))]
news = queue.SimpleQueue()  # a browser that follows at most 3 of the 6 nodes announced
browser = Browser(resolve_interfaces(["mesh0"]), lambda instance, ann: news.put(instance), max_instances=3)
followed, deadline = set(), time.monotonic() + 5  # listen a while: no fourth may come
while (left := deadline - time.monotonic()) > 0:
    try:
        followed.add(news.get(timeout=left))
    except queue.Empty:
        break
browser.close()
print(json.dumps({"cluster": cluster, "tokens": tokens, "followed": sorted(followed)}))
"""


def test_peers_mix_with_discovery_and_without_expect_the_router_settles(mesh, lan, tiny):
    peer = mesh.cluster()["mini-a"].split()[1]  # mini-a's HOST:PORT: given as --peer, and announced
    # the mesh's router holds the nodes: this one takes them over, and gives them back when it stops
    second = Process(["router", "--model", str(tiny), "--port", "0", *MDNS, "--peer", peer, "--takeover"],
                     mesh.logs / "second-router.log", prefix=lan.hosts["router"].prefix)
    try:
        second.wait_for(r"listening on \S+ \(2 nodes: mini-a, mini-b;", 120)
        assert "joined after the plan" not in second.log.read_text()  # mini-a is the peer, not a newcomer
        out = mesh.cli("generate", "--router", mesh.address, PROMPT, "--max-tokens", "4")
        assert out.returncode == 1 and "taken over by router" in out.stderr  # the first router says why
    finally:
        second.stop()
    back = {mesh.router.wait_for(r"node (mini-\w) is back at \S+: re-assigned", 60)[1] for _ in range(2)}
    assert back == {"mini-a", "mini-b"}  # released: the mesh's router took its nodes back


def test_router_says_whom_it_saw_and_rejected_when_too_few_turn_up(mesh, lan, tiny):
    fakes = subprocess.Popen(
        [*lan.hosts["x"].prefix, sys.executable, "-c", FAKE_NODES, IFACE, Checkpoint(tiny).config_hash],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert fakes.stdout.readline().strip() == "advertised"
        out = mesh.cli("router", "--model", str(tiny), "--port", "0", *MDNS, "--expect", "5", "--wait", "4")
    finally:
        fakes.communicate(timeout=30)  # closes stdin: they say goodbye
    assert out.returncode == 1 and "Traceback" not in out.stderr
    (line,) = [l for l in out.stderr.splitlines() if l.startswith("expertmesh router: error:")]
    x = lan.hosts["x"].ip
    assert "for 5 nodes serving mlx-f32" in line and f"on {IFACE} ({lan.hosts['router'].ip})" in line
    assert f"found 2: mini-a at {lan.hosts['a'].ip}:" in line and f"mini-b at {lan.hosts['b'].ip}:" in line
    assert f"odd at {x}:4000 serves model other-model (config 0123456789abcdef), the router has mlx-f32" in line
    assert f"future at {x}:4001 speaks protocol 99, the router speaks 1" in line


FAKE_NODES = """
import sys
from expertmesh.discovery import Advertiser, NodeRecord, resolve_interfaces
interfaces = resolve_interfaces([sys.argv[1]])
ip = interfaces[0].ip
fakes = [Advertiser("odd", 4000, [ip], interfaces, NodeRecord("odd", 1, "other-model", "0123456789abcdef", 10**9)),
         Advertiser("future", 4001, [ip], interfaces, NodeRecord("future", 99, "mlx-f32", sys.argv[2], 10**9))]
try:
    for fake in fakes:
        fake.start()
    print("advertised", flush=True)
    sys.stdin.read()
finally:
    for fake in fakes:
        fake.close()
"""


def test_a_second_node_of_the_same_name_gets_its_own_instance_and_leaves_with_a_goodbye(mesh):
    twin = mesh.node("c", "mini-a", key="twin")
    twin.address(timeout=120)
    assert twin.wait_for(r"advertised over mDNS as (\S+)", 30).group(1) == "mini-a-2"
    mesh.router.wait_for(r"node mini-a-2 at \S+ joined after the plan was made", 30)
    rows = mesh.cluster()
    assert " idle " in rows["mini-a-2"] and mesh.lan.hosts["c"].ip in rows["mini-a-2"]
    assert "ready" in rows["mini-a"]  # the first mini-a keeps its name and its experts

    start = time.monotonic()
    twin.stop()  # SIGTERM: a clean exit sends goodbye packets
    mesh.router.wait_for(r"mDNS: mini-a-2 left", 10)
    print(f"\nrouter dropped a node that said goodbye after {time.monotonic() - start:.2f}s")
    assert "mini-a-2" not in mesh.cluster()


def test_a_killed_node_is_down_at_once_its_experts_move_and_it_rejoins_with_them(mesh, expected):
    start = time.monotonic()
    mesh.procs["mini-b"].proc.kill()
    mesh.router.wait_for(r"node mini-b is down", 10)
    print(f"\nrouter saw a SIGKILLed node down after {time.monotonic() - start:.2f}s")
    rows = mesh.cluster()
    assert " down " in rows["mini-b"] and "error:" in rows["mini-b"] and "ready" in rows["mini-a"]

    # its experts are re-planned onto mini-a, which has the memory for them
    out = mesh.cli("generate", "--router", mesh.address, PROMPT, "--max-tokens", "4")
    assert out.returncode == 0, out.stderr
    mesh.router.wait_for(r"re-planning layer \d+ experts 4-7; .* onto mini-a", 10)
    assert "0-7 (every layer)" in mesh.cluster()["mini-a"]

    start = time.monotonic()
    mesh.node("b", "mini-b").address(timeout=120)
    listening = time.monotonic()
    mesh.router.wait_for(r"node mini-b is back at \S+: re-assigned \d+ experts in \d+ layers", 30)
    print(f"router re-admitted it {time.monotonic() - start:.2f}s after it was restarted "
          f"({time.monotonic() - listening:.2f}s after its 'listening' line)")
    assert "ready" in (row := mesh.cluster()["mini-b"]) and "4-7 (every layer)" in row
    assert mesh.greedy_tokens() == expected


def test_an_unplugged_host_is_down_within_the_keepalive_and_back_when_plugged_in(mesh, expected):
    host = mesh.lan.hosts["a"]
    start = time.monotonic()
    host.unplug()
    try:
        mesh.router.wait_for(r"node mini-a is down", KEEPALIVE_S + KEEPALIVE_TIMEOUT_S + 10)
        print(f"\nrouter saw an unplugged host down after {time.monotonic() - start:.2f}s")
        assert " down " in mesh.cluster()["mini-a"]
    finally:
        host.plug()
    start = time.monotonic()
    mesh.router.wait_for(r"node mini-a is back at", 30)
    print(f"router re-admitted it {time.monotonic() - start:.2f}s after it was plugged in")
    assert mesh.greedy_tokens() == expected
