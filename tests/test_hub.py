"""``--model ORG/NAME``: repos from a Hugging Face hub on loopback (tests/fakehub.py).

Every process gets its own HF_HOME (its own machine's cache) and HF_TOKEN
(how the hub tells the clients apart, to count what each fetched).
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from expertmesh import Client
from expertmesh.checkpoint import Checkpoint
from expertmesh.models import get_adapter
from expertmesh.placement import size
from expertmesh.testing.process import Process
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from fakehub import FakeHub
from test_cli import one_line_error

REPO = "org/tiny"
PROMPT = "Once upon a time there was a little model"
TOKENS = 12


@pytest.fixture(scope="module")
def hub(checkpoints):
    with FakeHub({REPO: checkpoints["mlx-4bit"], "org/hf": checkpoints["hf-f32"]}) as hub:
        yield hub


def shard_bytes(hub, client: str) -> int:
    return sum(n for (c, f), n in hub.by_file.items() if c == client and f.endswith(".safetensors"))


def run(hub, tmp_path, client: str, *args, **env) -> subprocess.CompletedProcess:
    """The ``expertmesh`` CLI as ``client``, caching under ``tmp_path/client``."""
    return subprocess.run([sys.executable, "-m", "expertmesh.cli", *args], capture_output=True, text=True,
                          timeout=180, env={**os.environ, **hub.env(tmp_path / client, client), **env})


def mlx_lm_tokens(hub, tmp_path, repo: str = REPO) -> list[int]:
    """Greedy tokens of mlx-lm loading ``repo`` from the hub itself (a process of its own)."""
    code = ("import json, sys; from mlx_lm import load; from mlx_lm.generate import stream_generate; "
            "m, t = load(sys.argv[1]); "
            f"print(json.dumps([r.token for r in stream_generate(m, t, {PROMPT!r}, max_tokens={TOKENS})]))")
    out = subprocess.run([sys.executable, "-c", code, repo], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **hub.env(tmp_path / "mlx-lm", "mlx-lm")})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def share(path: Path, experts: list[int]) -> int:
    """Bytes of these experts in every MoE layer of the checkpoint at ``path``."""
    ck = Checkpoint(path)
    adapter = get_adapter(ck.config)
    return sum(adapter.expert_bytes(ck.tensors, l) * len(experts) for l in adapter.moe_layers)


def dense(path: Path) -> int:
    ck = Checkpoint(path)
    adapter = get_adapter(ck.config)
    return sum(t.nbytes for n, t in ck.tensors.items() if not adapter.is_expert_weight(n))


def overhead(path: Path) -> int:
    """Headers, and the identity's samples (3 x 64 bytes a tensor, and the gaps between close ones)."""
    ck = Checkpoint(path)
    headers = sum(8 + int.from_bytes(ck.files.read(f, 0, 8), "little") for f in {t.file for t in ck.tensors.values()})
    return headers + (192 + 256) * len(ck.tensors)  # blocks less than 256 bytes apart come as one


def node(hub, tmp_path, name: str, repo: str = REPO, **env) -> Process:
    return Process(["node", "--model", repo, "--name", name, "--memory-gb", "1", "--no-discovery"],
                   tmp_path / f"{name}.log", env={**hub.env(tmp_path / name, name), **env})


def test_two_nodes_and_a_router_each_fetch_their_share_and_generate_mlx_lms_tokens(hub, checkpoints, tmp_path):
    path = checkpoints["mlx-4bit"]
    procs = [node(hub, tmp_path, f"n{i}") for i in range(2)]
    try:
        peers = [p.address(timeout=120) for p in procs]
        router = Process(["router", "--model", REPO, "--port", "0", "--mode", "expert", "--no-discovery",
                          *[a for p in peers for a in ("--peer", p)]], tmp_path / "router.log",
                         env=hub.env(tmp_path / "router", "router"))
        procs.append(router)
        with Client(router.address(timeout=180)) as client:
            tokens = [p.token for p in client.generate(PROMPT, max_tokens=TOKENS)]
    finally:
        for p in procs:
            p.stop()
    assert tokens == mlx_lm_tokens(hub, tmp_path)
    total = sum(len(d) for f, d in hub.repos[REPO].files.items() if f.endswith(".safetensors"))
    E = get_adapter(Checkpoint(path).config).num_experts
    extra = overhead(path)
    figures = {c: shard_bytes(hub, c) for c in ("n0", "n1", "router")}
    print(f"shards {total} B; fetched {figures}; each node's share {share(path, list(range(E // 2)))} B, "
          f"dense {dense(path)} B, headers + samples {extra} B")
    for i, experts in enumerate([list(range(E // 2)), list(range(E // 2, E))]):
        assert share(path, experts) <= figures[f"n{i}"] <= share(path, experts) + extra
    assert dense(path) <= figures["router"] <= dense(path) + extra
    assert shard_bytes(hub, "mlx-lm") == total  # the reference took everything


def test_a_reassigned_node_fetches_only_the_difference_and_a_restart_nothing(hub, checkpoints, tmp_path):
    path = checkpoints["mlx-4bit"]
    layers = get_adapter(Checkpoint(path).config).moe_layers

    def assign(address, experts):
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.ExpertServiceStub(ch)
            info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
            before = shard_bytes(hub, "solo")
            list(stub.Assign(pb.AssignRequest(config_hash=info.config_hash, weights_hash=info.weights_hash,
                                              experts=[pb.LayerExperts(layer=l, experts=experts) for l in layers]),
                             timeout=60))
            return shard_bytes(hub, "solo") - before

    p = node(hub, tmp_path, "solo")
    try:
        address = p.address(timeout=120)
        assert assign(address, [0, 1]) == share(path, [0, 1])
        assert assign(address, [1, 2, 5]) == share(path, [2, 5])  # expert 1 is in the cache already
    finally:
        p.stop()
    p = node(hub, tmp_path, "solo")  # the same cache, another process
    try:
        before = shard_bytes(hub, "solo")
        assert assign(p.address(timeout=120), [0, 1, 2]) == 0
        assert shard_bytes(hub, "solo") == before  # not even the identity's samples: remembered per commit
    finally:
        p.stop()


def test_plan_prints_what_each_node_will_fetch_from_the_headers_alone(hub, checkpoints, tmp_path):
    out = run(hub, tmp_path, "plan", "plan", "--model", REPO, "--node", "a:1", "--node", "b:1", "--mode", "expert")
    assert out.returncode == 0, out.stderr
    (line,) = [l for l in out.stdout.splitlines() if l.startswith("to fetch from org/tiny: ")]
    path = checkpoints["mlx-4bit"]
    E = get_adapter(Checkpoint(path).config).num_experts
    a, b = size(share(path, list(range(E // 2)))), size(share(path, list(range(E // 2, E))))
    assert line.endswith(f"a {a}, b {b}, router {size(dense(path))}"), line
    assert shard_bytes(hub, "plan") <= overhead(checkpoints["mlx-4bit"])  # headers only: nothing large


def cache_is_sound(home: Path, source: Path) -> None:
    """Every piece in the node's own cache holds exactly the source's bytes; no temporary file is left."""
    blobs = {hashlib.sha256(f.read_bytes()).hexdigest(): f.read_bytes() for f in source.glob("*.safetensors")}
    pieces = list((home / "expertmesh").rglob("*"))
    assert not [p for p in pieces if p.name.startswith(".tmp-")]
    for p in pieces:
        if p.parent.parent.name == "pieces":
            start, end = map(int, p.name.split("-"))
            assert p.read_bytes() == blobs[p.parent.name][start:end], p


@pytest.mark.parametrize("fault, says", [
    ("404", "404"), ("500", "500"), ("cut", "fetching bytes"),
])
def test_a_failing_hub_is_one_line_and_leaves_no_corrupt_file(hub, checkpoints, tmp_path, fault, says):
    shard = sorted(f for f in hub.repos[REPO].files if f.endswith(".safetensors"))[1]
    hub.faults[shard] = fault
    try:
        out = run(hub, tmp_path, f"fail-{fault}", "node", "--model", REPO, "--name", "x", "--no-discovery")
    finally:
        hub.faults.clear()
    line = one_line_error(out, "node")
    assert says in line and shard in line and "org/tiny" in line
    cache_is_sound(tmp_path / f"fail-{fault}", checkpoints["mlx-4bit"])


@pytest.mark.parametrize("fault", ["404", "500"])
def test_a_hub_failing_on_the_repo_itself_is_one_line(hub, tmp_path, fault):
    if fault == "404":
        out = run(hub, tmp_path, "missing", "plan", "--model", "org/missing", "--node", "a:1")
    else:
        hub.faults["api"] = "500"
        try:
            out = run(hub, tmp_path, "down", "plan", "--model", REPO, "--node", "a:1")
        finally:
            hub.faults.clear()
    line = one_line_error(out, "plan")
    assert ("org/missing" if fault == "404" else REPO) in line


def test_offline_a_fetched_repo_serves_from_the_caches(hub, checkpoints, tmp_path):
    first = run(hub, tmp_path, "off", "plan", "--model", REPO, "--node", "a:1")
    assert first.returncode == 0, first.stderr
    before = sum(hub.served.values())
    out = run(hub, tmp_path, "off", "plan", "--model", REPO, "--node", "a:1", HF_HUB_OFFLINE="1")
    assert out.returncode == 0, out.stderr
    assert sum(hub.served.values()) == before


def test_a_connection_cut_mid_piece_fails_that_assign_in_one_line_and_the_next_one_works(hub, checkpoints, tmp_path):
    path = checkpoints["mlx-4bit"]
    layers = get_adapter(Checkpoint(path).config).moe_layers
    p = node(hub, tmp_path, "cut")
    try:
        with grpc.insecure_channel(p.address(timeout=120)) as ch:
            stub = pb_grpc.ExpertServiceStub(ch)
            info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
            request = pb.AssignRequest(config_hash=info.config_hash, weights_hash=info.weights_hash,
                                       experts=[pb.LayerExperts(layer=l, experts=[0, 1, 2, 3]) for l in layers])
            for shard in hub.repos[REPO].files:
                if shard.endswith(".safetensors"):
                    hub.faults[shard] = "cut-data"
            try:
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.Assign(request, timeout=60))
            finally:
                hub.faults.clear()
            assert "\n" not in err.value.details() and "RemoteProtocolError" in err.value.details()
            cache_is_sound(tmp_path / "cut", path)
            list(stub.Assign(request, timeout=60))
            assert stub.GetInfo(pb.GetInfoRequest(), timeout=10).state == pb.READY
    finally:
        p.stop()
    cache_is_sound(tmp_path / "cut", path)


def evil_repo(hub, src: Path, tmp_path: Path, change) -> str:
    """A copy of ``src`` served as a repo, its index names rewritten by ``change``."""
    from fakehub import Repo

    copy = tmp_path / "evil"
    copy.mkdir()
    for f in src.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    index = copy / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = sorted(set(data["weight_map"].values()))[0]
    data["weight_map"] = {k: change(first) if v == first else v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    hub.repos[f"org/{tmp_path.name}"] = Repo(copy)
    return f"org/{tmp_path.name}"


def download_all(hub, home: Path, repo: str = REPO) -> Path:
    """What ``hf download`` leaves: the whole snapshot in the Hugging Face cache."""
    code = "import sys; from huggingface_hub import snapshot_download; print(snapshot_download(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, repo], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **hub.env(home, "hf-download")})
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.split()[-1])


@pytest.mark.parametrize("attack", ["dotdot index", "absolute index", "symlinked shard", "symlinked config",
                                    "another repo's blob"])
def test_a_repo_id_never_reads_outside_its_cache_folder(hub, checkpoints, tmp_path, attack):
    outside = tmp_path / "outside"
    outside.mkdir()
    src = checkpoints["mlx-4bit"]
    shard = sorted(src.glob("*.safetensors"))[0]
    (outside / "stolen.safetensors").write_bytes(shard.read_bytes())
    (outside / "config.json").write_bytes((src / "config.json").read_bytes())
    repo, home = REPO, tmp_path / "victim"
    if attack == "dotdot index":
        repo = evil_repo(hub, src, tmp_path, lambda f: "../../../outside/stolen.safetensors")
    elif attack == "absolute index":
        repo = evil_repo(hub, src, tmp_path, lambda f: str(outside / "stolen.safetensors"))
    else:
        snapshot = download_all(hub, home)
        download_all(hub, home, "org/hf")
        victim = snapshot / (shard.name if attack == "symlinked shard" else "config.json")
        victim.unlink()
        if attack == "another repo's blob":
            other = next((home / "hub" / "models--org--hf" / "blobs").iterdir())
            os.symlink(other, victim)
        else:
            os.symlink(outside / ("stolen.safetensors" if attack == "symlinked shard" else "config.json"), victim)
    for offline in ("0", "1") if attack not in ("dotdot index", "absolute index") else ("0",):
        out = subprocess.run([sys.executable, "-m", "expertmesh.cli", "plan", "--model", repo, "--node", "a:1"],
                             capture_output=True, text=True, timeout=180,
                             env={**os.environ, **hub.env(home, "victim"), "HF_HUB_OFFLINE": offline})
        assert "lies outside the model's cache folder" in one_line_error(out, "plan")


def test_a_snapshot_directory_is_a_model_directory(hub, checkpoints, tmp_path):
    snapshot = download_all(hub, tmp_path / "home")
    assert all(f.is_symlink() for f in snapshot.iterdir())  # into ../../blobs/
    out = subprocess.run([sys.executable, "-m", "expertmesh.cli", "plan", "--model", str(snapshot), "--node", "a:1"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert Checkpoint(snapshot).identity == Checkpoint(checkpoints["mlx-4bit"]).identity
