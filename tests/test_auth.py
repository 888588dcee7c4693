"""A mesh with a cluster token and mutual TLS lets in only those who have them,
on every server: node and router gRPC, the data plane, the HTTP API."""

import contextlib
import http.client
import json
import socket
import ssl
import threading
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from expertmesh import Client, wire
from expertmesh.errors import AuthError, UnavailableError
from expertmesh.nodes import Node, NodeConfig
from expertmesh.nodes.dataplane import MAX_UNADMITTED
from expertmesh.router import Router, RouterConfig
from expertmesh.security import Security
from expertmesh.router.dataplane import recv_reply
from expertmesh.testing.certs import write_test_certs
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

TOKEN = "s3cret-cluster-token"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return write_test_certs(tmp_path_factory.mktemp("certs"))


def tls(certs, name: str) -> dict:
    return dict(tls_cert=certs / f"{name}.pem", tls_key=certs / f"{name}-key.pem", tls_ca=certs / "ca.pem")


@contextlib.contextmanager
def mesh(model, node_security: Security, router_security: Security, http: bool = False, mode: str = "expert"):
    node = Node(NodeConfig(model=model, name="n0", memory_gb=1.0, security=node_security, metrics_port=0)).start()
    try:
        router = Router(RouterConfig(model=model, peers=[node.address], port=0, security=router_security,
                                     http_port=0 if http else None, mode=mode, metrics_port=0))
        try:
            router.connect()
            router.start()
            yield node, router
        finally:
            router.stop(grace=0)
    finally:
        node.stop(grace=0)


@pytest.fixture(scope="module")
def token_mesh(tiny):
    with mesh(tiny, Security(TOKEN), Security(TOKEN), http=True) as m:
        yield m


@pytest.fixture(scope="module")
def tls_mesh(tiny, certs):
    with mesh(tiny, Security(TOKEN, **tls(certs, "node")), Security(TOKEN, **tls(certs, "router")), http=True) as m:
        yield m


def text(client: Client) -> str:
    return "".join(p.text for p in client.generate("Hello", max_tokens=4))


def test_router_answers_only_callers_with_the_token(token_mesh, monkeypatch):
    node, router = token_mesh
    monkeypatch.delenv("EXPERTMESH_TOKEN", raising=False)
    address = f"127.0.0.1:{router.port}"
    with Client(address) as c, pytest.raises(AuthError, match="no cluster token given: pass --token"):
        text(c)
    with Client(address, token="guess") as c, pytest.raises(AuthError, match="wrong cluster token"):
        c.cluster()
    with Client(address, token=TOKEN) as c:
        assert text(c)
    monkeypatch.setenv("EXPERTMESH_TOKEN", TOKEN)  # the SDK's default, as the CLI's
    with Client(address) as c:
        assert c.cluster().nodes[0].state == "ready"


def test_node_refuses_calls_and_assign_without_the_token_but_health_stays_open(token_mesh):
    node, _ = token_mesh
    held = node.store.held()
    with grpc.insecure_channel(node.address) as ch:
        stub = pb_grpc.ExpertServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Assign(pb.AssignRequest(config_hash=node.store.checkpoint.config_hash,
                                              experts=[pb.LayerExperts(layer=0, experts=[0])]), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for call in (lambda: stub.GetInfo(pb.GetInfoRequest(), timeout=10),
                     lambda: stub.GetStats(pb.GetStatsRequest(), timeout=10),
                     lambda: list(stub.Forward(iter([pb.ForwardRequest()]), timeout=10)),
                     lambda: list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                         iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "no cluster token" in err.value.details()
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert node.store.held() == held  # the refused Assign changed nothing
    with Security(TOKEN).channel(node.address, []) as ch:
        info = pb_grpc.ExpertServiceStub(ch).GetInfo(pb.GetInfoRequest(), timeout=10)
    assert info.token_required and info.data_port


def test_a_router_without_the_token_cannot_use_the_nodes(tiny, token_mesh):
    node, _ = token_mesh
    for security, why in ((Security(), "no cluster token"), (Security("wrong"), "wrong cluster token")):
        router = Router(RouterConfig(model=tiny, peers=[node.address], port=0, security=security))
        try:
            with pytest.raises(UnavailableError, match=f"no reachable node: .*{why}"):
                router.connect()
        finally:
            router.stop(grace=0)


def test_router_warns_about_a_node_that_lets_anyone_in(tiny, caplog):
    with mesh(tiny, Security(), Security(TOKEN)) as (node, router):
        with Client(f"127.0.0.1:{router.port}", token=TOKEN) as c:
            assert text(c)  # works, but the node is open to all
    assert "node n0 (127.0.0.1" in caplog.text and "accepts calls without the cluster token" in caplog.text


def hello_then_request(port: int, first_frames: list, sock_wrap=lambda s: s) -> list:
    """Send ``first_frames`` on a fresh data-plane connection; the replies until it closes (or 2)."""
    with sock_wrap(socket.create_connection(("127.0.0.1", port), timeout=10)) as sock:
        for frame in first_frames:
            wire.send_frame(sock, frame)
        replies = []
        while len(replies) < 2 and (r := recv_reply(sock, 1 << 20)) is not None:
            replies.append(r)
        return replies


def held(router) -> pb.DataPlaneHello:
    """The hello of the router holding the node: the token, its identity and epoch."""
    return pb.DataPlaneHello(token=TOKEN, router_id=router.identity.id, epoch=router.links[0].epoch)


def test_data_plane_serves_nobody_before_the_hello(token_mesh):
    node, router = token_mesh
    port = node.dataplane.port
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED.value[0]
    probe = pb.ForwardRequest(request_id=7, expert=pb.ExpertRequest(layer=0))
    (refused,) = hello_then_request(port, [probe, probe])  # a request instead of a hello: refused, closed
    assert refused.error_code == unauthenticated and "no cluster token" in refused.error
    (refused,) = hello_then_request(port, [pb.DataPlaneHello(token="guess"), probe])
    assert refused.error_code == unauthenticated and refused.error == "wrong cluster token"
    (refused,) = hello_then_request(port, [pb.DataPlaneHello(token=TOKEN), probe])  # the token, but no router
    assert refused.error_code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "serves router" in refused.error
    welcome, answer = hello_then_request(port, [held(router), probe])
    assert welcome.error_code == 0 and welcome.request_id == 0
    assert answer.request_id == 7 and answer.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]  # served


def test_strangers_that_never_say_hello_cannot_keep_a_router_out_or_pile_up_threads(token_mesh):
    node, router = token_mesh
    plane = node.dataplane
    before = threading.active_count()
    strangers = [socket.create_connection(("127.0.0.1", plane.port), timeout=10) for _ in range(MAX_UNADMITTED + 36)]
    try:
        for oldest in strangers[:36]:  # each one past the limit dropped the oldest waiting
            assert oldest.recv(1) == b""
        assert plane.unadmitted == MAX_UNADMITTED  # one short-lived thread each, no MLX worker
        welcome, answer = hello_then_request(plane.port, [held(router), pb.ForwardRequest(request_id=9)])
        assert welcome.error_code == 0 and answer.request_id == 9  # a router that says its hello gets in even so
    finally:
        for s in strangers:
            s.close()
    plane.join_admissions(timeout=10)
    assert plane.unadmitted == 0 and threading.active_count() - before <= 4  # their threads ended


def test_openai_api_wants_the_bearer_token(token_mesh):
    _, router = token_mesh
    body = json.dumps({"prompt": "Hello", "max_tokens": 2})
    for headers, status in (({}, 401), ({"Authorization": "Bearer guess"}, 401),
                            ({"Authorization": f"Bearer {TOKEN}"}, 200)):
        conn = http.client.HTTPConnection("127.0.0.1", router.http.port, timeout=60)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        data = json.loads(resp.read())
        conn.close()
        assert resp.status == status, data
        if status == 401:
            assert data["error"]["code"] == "invalid_api_key"


def test_mutual_tls_mesh_generates_and_refuses_strangers(tls_mesh, certs, tmp_path):
    node, router = tls_mesh
    address = f"127.0.0.1:{router.port}"
    with Client(address, token=TOKEN, **tls(certs, "client")) as c:
        assert text(c)  # router -> node over TLS gRPC and the TLS data plane
    assert node.core.stats.forward_requests > 0
    with Client(address, token=TOKEN, timeout=10) as c, pytest.raises(UnavailableError):
        c.cluster()  # plaintext against TLS
    stranger = write_test_certs(tmp_path / "other-ca", names=["client"])
    with Client(address, token=TOKEN, timeout=10, **tls(stranger, "client")) as c, pytest.raises(UnavailableError):
        c.cluster()  # a certificate from another CA
    with Client(address, token="guess", **tls(certs, "client")) as c, pytest.raises(AuthError):
        c.cluster()  # TLS does not replace the token


def test_a_long_prompts_frames_cross_the_tls_data_plane_whole(tiny, tls_mesh, certs):
    """A prompt's layers send frames of over 64 KiB, which go out as two
    writes (two TLS records): the mesh still generates mlx-lm's tokens."""
    from mlx_lm import load
    from mlx_lm.generate import stream_generate

    node, router = tls_mesh
    model, tokenizer = load(str(tiny))
    words = 0
    while len(tokenizer.encode(prompt := " ".join(f"word{i % 50}" for i in range(words)))) < 320:
        words += 10
    assert 320 * model.args.hidden_size * 4 > 64 << 10  # a layer's float32 hidden states, in one frame
    expected = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=4)]
    received = node.core.stats.bytes_received
    with Client(f"127.0.0.1:{router.port}", token=TOKEN, **tls(certs, "client")) as c:
        assert [p.token for p in c.generate(prompt, max_tokens=4)] == expected
    assert node.core.stats.bytes_received - received > 64 << 10


def test_pipeline_stages_run_under_the_token_and_mutual_tls(tiny, certs, tls_mesh):
    _, expert_router = tls_mesh
    with Client(f"127.0.0.1:{expert_router.port}", token=TOKEN, **tls(certs, "client")) as c:
        expected = text(c)
    with mesh(tiny, Security(TOKEN, **tls(certs, "node")), Security(TOKEN, **tls(certs, "router")),
              mode="pipeline") as (node, router):
        with Client(f"127.0.0.1:{router.port}", token=TOKEN, **tls(certs, "client")) as c:
            assert text(c) == expected
        assert node.core.stages.spans  # the node ran whole layers, over the authenticated TLS data plane


def test_tls_data_plane_refuses_plaintext_and_foreign_certificates(tls_mesh, certs, tmp_path):
    node, router = tls_mesh
    port = node.dataplane.port
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        hello_then_request(port, [pb.DataPlaneHello(token=TOKEN)])  # plaintext: no reply, the server drops it
    stranger = Security(**tls(write_test_certs(tmp_path / "other-ca", names=["client"]), "client"))
    with pytest.raises((ssl.SSLError, OSError)):
        hello_then_request(port, [pb.DataPlaneHello(token=TOKEN)],
                           lambda s: stranger.client_ssl_context().wrap_socket(s, server_hostname="127.0.0.1"))
    ours = Security(**tls(certs, "client"))
    welcome, answer = hello_then_request(
        port, [held(router), pb.ForwardRequest(request_id=3)],
        lambda s: ours.client_ssl_context().wrap_socket(s, server_hostname="127.0.0.1"))
    assert welcome.error_code == 0 and answer.request_id == 3


def test_openai_api_is_https_with_client_certificates(tls_mesh, certs):
    _, router = tls_mesh
    assert router.http.url.startswith("https://")
    ctx = Security(**tls(certs, "client")).client_ssl_context()
    conn = http.client.HTTPSConnection("127.0.0.1", router.http.port, timeout=60, context=ctx)
    conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
    assert conn.getresponse().status == 200
    conn.close()
    anonymous = ssl.create_default_context(cafile=certs / "ca.pem")
    conn = http.client.HTTPSConnection("127.0.0.1", router.http.port, timeout=60, context=anonymous)
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
        conn.getresponse()
    conn.close()


def test_bad_security_settings_are_one_clear_error(certs, tmp_path):
    with pytest.raises(AuthError, match="needs all of --tls-cert, --tls-key and --tls-ca"):
        Security(tls_cert=certs / "node.pem")
    with pytest.raises(AuthError, match=r"--tls-key .*missing-key.pem: No such file"):
        Security(**{**tls(certs, "node"), "tls_key": tmp_path / "missing-key.pem"})
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(AuthError, match="junk.pem is not a PEM file"):
        Security(**{**tls(certs, "node"), "tls_ca": tmp_path / "junk.pem"})
    with pytest.raises(AuthError, match="do not go together"):
        Security(**{**tls(certs, "node"), "tls_key": certs / "router-key.pem"})
    with pytest.raises(AuthError, match="printable ASCII"):
        Security("tök\n")


def scrape(url: str, token: str | None = None, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10, context=context) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_metrics_want_the_token_and_under_tls_a_client_certificate(token_mesh, tls_mesh, certs):
    for component in token_mesh:
        status, body = scrape(component.metrics.url)
        assert status == 401 and body.startswith("no cluster token given")
        assert scrape(component.metrics.url, "guess") == (401, "wrong cluster token\n")
        status, body = scrape(component.metrics.url, TOKEN)
        assert status == 200 and list(text_string_to_metric_families(body))
    client = Security(TOKEN, **tls(certs, "client")).client_ssl_context()
    for component in tls_mesh:
        assert component.metrics.url.startswith("https://")
        silent = socket.create_connection(("127.0.0.1", component.metrics.port))  # connects, never handshakes
        status, body = scrape(component.metrics.url, TOKEN, client)
        assert status == 200 and list(text_string_to_metric_families(body))
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            scrape(component.metrics.url, TOKEN, ssl.create_default_context(cafile=str(certs / "ca.pem")))
        silent.close()
