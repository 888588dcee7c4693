"""Behaviour is set by typed configs the CLI fills, and the configs check their fields."""

import pytest

from expertmesh import InvalidRequestError, compiled
from expertmesh.nodes import Node, NodeConfig
from expertmesh.options import GenerationOptions
from expertmesh.router import RouterConfig
from expertmesh.router.validation import validate

from conftest import cli, running_nodes, running_router


@pytest.mark.parametrize("field, value", [
    ("port", 70000), ("port", -1), ("port", "50061"), ("metrics_port", 65536), ("memory_gb", 0),
    ("memory_gb", float("nan")), ("kv_idle_timeout", -5.0), ("compile", "no"), ("discovery", 1),
    ("interfaces", [""]),
])
def test_node_config_refuses_a_bad_field_by_name(tmp_path, field, value):
    with pytest.raises(InvalidRequestError) as e:
        NodeConfig(model=tmp_path, **{field: value})
    assert e.value.param == field and field in str(e.value)


def test_node_config_takes_good_values(tmp_path):
    config = NodeConfig(model=tmp_path, port=65535, metrics_port=0, memory_gb=0.5, kv_idle_timeout=1, compile=False)
    assert (config.port, config.compile) == (65535, False)


@pytest.mark.parametrize("fields, param, says", [
    (dict(expect=0), "expect", "--expect must be at least 1"),
    (dict(placement_stats="stats.json", replicas=2), "placement_stats", "--placement-stats plans the copies itself"),
    (dict(mode="pipeline", replicas=2), "mode", "--mode pipeline runs whole layers on one node each"),
    (dict(mode="layers"), "mode", "--mode must be one of expert, pipeline, auto"),
    (dict(rebalance_threshold=1.5), "rebalance_threshold", "--rebalance-threshold must be in (0, 1]"),
    (dict(rebalance_min_tokens=-1), "rebalance_min_tokens", "--rebalance-min-tokens must be 0 or more"),
    (dict(forward_timeout=0.5), "forward_timeout", "--forward-timeout must be at least 1 s"),
    (dict(forward_timeout=20.0, request_limit=10.0), "request_limit", "--request-limit must be at least"),
    (dict(port=-1), "port", "--port must be 0-65535"),
    (dict(http_port=99999), "http_port", "--http-port must be 0-65535"),
    (dict(replicas=0), "replicas", "--replicas must be at least 1"),
    (dict(num_draft_tokens=0), "num_draft_tokens", "--num-draft-tokens must be at least 1"),
    (dict(settle=0), "settle", "settle must be a number above 0"),
    (dict(compile="no"), "compile", "compile must be True or False"),
])
def test_router_config_refuses_a_bad_field_or_combination(tmp_path, fields, param, says):
    with pytest.raises(InvalidRequestError) as e:
        RouterConfig(model=tmp_path, **fields)  # the config checks itself
    assert e.value.param == param and says in str(e.value)


def test_router_config_defaults_pass(tmp_path):
    validate(RouterConfig(model=tmp_path))  # the check the CLI's messages come from


def test_compile_is_a_bool_set_by_config():
    with pytest.raises(ValueError, match="compile must be True or False"):
        compiled.configure("0")
    assert compiled.enabled()


def test_nodes_without_compiled_steps_decode_the_same_tokens(tiny, live_router):
    prompt, options = "The router looks at", GenerationOptions(max_tokens=12)
    want = [p.token for p in live_router.generate(prompt, options=options)]
    try:
        with running_nodes(tiny, 2, compile=False) as nodes:
            assert not compiled.enabled()
            # one process here: the router's config must not turn compiling back on for the nodes
            with running_router(tiny, [n.address for n in nodes], compile=False) as router:
                assert [p.token for p in router.generate(prompt, options=options)] == want
    finally:
        compiled.configure(True)


def test_the_cli_has_compile_flags_and_no_discovery_environment(tmp_path):
    for role in ("node", "router"):
        out = cli(role, "--help")
        assert "--no-compile" in out.stdout and "EXPERTMESH_DISCOVERY" not in out.stdout
    out = cli("node", "--model", str(tmp_path), "--no-compile")  # parsed; then the missing checkpoint stops it
    assert out.returncode == 1 and "config.json" in out.stderr


def test_a_node_built_in_python_refuses_a_bad_port_before_reading_the_model(tmp_path):
    with pytest.raises(InvalidRequestError, match="port must be 0-65535"):
        Node(NodeConfig(model=tmp_path / "missing", port=123456))
