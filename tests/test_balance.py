"""Balancing a skewed model: calibrate, popularity-aware placement, live
rebalancing under concurrent streams, the automatic mode; greedy output stays
mlx-lm's throughout."""

import contextlib
import io
import re
import signal
import threading
import time

import pytest
from mlx_lm import load
from mlx_lm.generate import stream_generate

from expertmesh import Client
from expertmesh.cli import main
from expertmesh.errors import InvalidRequestError, PlacementError, UnavailableError
from expertmesh.testing.tinymodel import write_tiny_model
from expertmesh.v1 import expertmesh_pb2 as pb

from conftest import node_processes, running_nodes, running_router

# experts 0 and 1 win every token (top-2), so contiguous ranges give node n0 all the work
PROMPTS = ["Once upon a time there was a little model", "Hello! How are you today?",
           "The router looks at each token", "Numbers like 1, 2, 3 and 42"]
TOKENS = 12
STREAM_TOKENS = 40


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("models") / "skewed", seed=1, hot_experts=[0, 1])
    model, tok = load(str(path))
    expected = {p: [r.token for r in stream_generate(model, tok, p, max_tokens=STREAM_TOKENS)] for p in PROMPTS}
    return path, expected


@pytest.fixture(scope="module")
def mesh(skewed):
    path, _ = skewed
    with running_nodes(path, 3) as nodes, running_router(path, [n.address for n in nodes]) as router:
        yield nodes, router, f"127.0.0.1:{router.port}"


def generate_all(address, tokens=TOKENS):
    with Client(address) as client:
        return {p: [x.token for x in client.generate(p, max_tokens=tokens)] for p in PROMPTS}


def cut(expected, n=TOKENS):
    return {p: t[:n] for p, t in expected.items()}


@pytest.fixture(scope="module")
def calibrated(mesh, tmp_path_factory):
    """``expertmesh calibrate`` through the contiguous mesh: the stats file and what it printed."""
    _, _, address = mesh
    tmp = tmp_path_factory.mktemp("calibrate")
    prompts, out = tmp / "prompts.txt", tmp / "stats.json"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["calibrate", "--router", address, "--prompts", str(prompts), "--out", str(out),
                     "--max-tokens", str(TOKENS)]) == 0
    return out, printed.getvalue()


def test_calibrate_records_the_skew_and_plan_spreads_it(skewed, mesh, calibrated, capsys):
    path, expected = skewed
    _, router, address = mesh
    out, text = calibrated
    assert float(text.split("balance ratio ")[1].split()[0]) <= 0.6, text  # contiguous: n0 holds both hot experts
    assert re.search(r"hot experts \(layer:expert\) \d+:[01] \(", text), text
    assert router.stats().balance_ratio <= 0.6
    assert main(["plan", "--model", str(path), "--node", "a:1", "--node", "b:1", "--node", "c:1",
                 "--mode", "expert", "--stats", str(out)]) == 0
    plan = capsys.readouterr().out
    ratios = re.search(r"balance ratio expected on the traffic in .*: ([\d.]+) \(contiguous ranges: ([\d.]+)\)", plan)
    assert float(ratios[1]) >= 0.85 and float(ratios[2]) <= 0.6, plan
    assert generate_all(address) == cut(expected)


def test_dry_run_shows_the_plan_and_moves_nothing(mesh, capsys):
    _, router, address = mesh
    before = router.placement
    assert main(["rebalance", "--router", address, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "planned on the same traffic" in out and "layer 0 expert 0: n0 -> n0, n1, n2" in out
    assert out.rstrip().endswith("dry run: nothing moved")
    assert router.placement is before


def test_bad_input_is_one_line_and_the_router_keeps_serving(mesh, tmp_path, capsys):
    _, router, address = mesh
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    stats = tmp_path / "stats.json"
    for argv, message in [
        (["calibrate", "--router", address, "--prompts", str(tmp_path / "missing.txt")], "cannot read"),
        (["calibrate", "--router", address, "--prompts", str(empty)], "has no prompts (one per line)"),
        (["rebalance", "--router", address, "--threshold", "2"], "--threshold must be in [0, 1]"),
        (["rebalance", "--router", "127.0.0.1:1"], "cannot reach router 127.0.0.1:1"),
        (["router", "--model", str(tmp_path), "--placement-stats", str(stats), "--replicas", "2"],
         "--placement-stats plans the copies itself"),
        (["router", "--model", str(tmp_path), "--rebalance-threshold", "0"], "--rebalance-threshold must be in (0, 1]"),
    ]:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"expertmesh {argv[0]}: error: ") and message in err[-1], err
    with Client(address) as client, pytest.raises(InvalidRequestError, match="threshold must be in"):
        list(client.rebalance(threshold=-1))
    assert len(generate_all(address, tokens=2)) == len(PROMPTS)


@contextlib.contextmanager
def streaming(address, streams):
    """One Generate per prompt in ``streams``, each on a thread of its own;
    entered once every stream has streamed two tokens, left once all ended.
    Yields each stream's tokens, the times they came, and what the streams raised."""
    got, times, errors = [[] for _ in streams], [[] for _ in streams], []
    started = [threading.Event() for _ in streams]

    def stream(i):
        try:
            with Client(address) as client:
                for piece in client.generate(streams[i], max_tokens=STREAM_TOKENS):
                    got[i].append(piece.token)
                    times[i].append(time.monotonic())
                    if len(got[i]) == 2:
                        started[i].set()
        except Exception as e:  # noqa: BLE001 (asserted by the callers, by name)
            errors.append(e)
            started[i].set()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    try:
        assert all(e.wait(timeout=60) for e in started)
        yield got, times, errors
    finally:
        for t in threads:
            t.join(timeout=120)


def rebalance_during(address, streams):
    """Start one Generate per prompt in ``streams``; once each has streamed two
    tokens, rebalance. Returns every stream's tokens, the rebalance's progress
    messages, and how many tokens each stream had at the (first) switch."""
    progress, at_switch = [], None
    with streaming(address, streams) as (got, _, errors), Client(address) as client:
        for p in client.rebalance():
            progress.append(p)
            if p.phase == pb.REBALANCE_SWITCHED and at_switch is None:
                at_switch = [len(g) for g in got]
    assert not errors
    return got, progress, at_switch


def assert_nodes_hold_exactly_the_placement(nodes, router):
    sizes = router.state.expert_bytes
    for node in nodes:
        assert node.store.held() == {l: e for l, e in router.placement.experts_of(node.name).items() if e}
        assert node.store.nbytes == router.placement.bytes_of(node.name, sizes)


def test_rebalance_under_concurrent_streams_changes_no_output_and_evens_the_load(skewed, mesh):
    _, expected = skewed
    nodes, router, address = mesh
    streams = PROMPTS * 2
    got, progress, at_switch = rebalance_during(address, streams)
    assert got == [expected[p] for p in streams]
    # new copies loaded before the switch, old ones dropped after it (one round: room for both); streams mid-way
    phases = [p.phase for p in progress]
    assert phases[0] == pb.REBALANCE_PLANNED and phases[-1] == pb.REBALANCE_DONE
    assert phases.index(pb.REBALANCE_LOADING) < phases.index(pb.REBALANCE_SWITCHED) < phases.index(
        pb.REBALANCE_DROPPING)
    assert {p.round for p in progress if p.phase != pb.REBALANCE_PLANNED} <= {0, 1}
    assert progress[0].balance_planned >= 0.85
    assert any(0 < n < STREAM_TOKENS for n in at_switch), at_switch
    assert sorted(router.placement.holders(0, 0)) == [0, 1, 2]
    assert_nodes_hold_exactly_the_placement(nodes, router)  # old copies dropped, memory freed
    # fresh traffic: even load, same output
    router.stats(reset=True)
    assert generate_all(address) == cut(expected)
    assert router.stats().balance_ratio >= 0.85


def test_nodes_without_room_for_old_and_new_move_in_rounds_within_their_budgets(skewed):
    path, expected = skewed
    # 0.65 MB: n0's 12 experts (0.59 MB) leave no room for its new ones until it drops old ones
    with running_nodes(path, 3, memory_gb=0.00065) as nodes, \
            running_router(path, [n.address for n in nodes]) as router:
        address = f"127.0.0.1:{router.port}"
        streams = PROMPTS[:2]
        got, progress, _ = rebalance_during(address, streams)
        assert got == [expected[p] for p in streams]
        assert progress[-1].phase == pb.REBALANCE_DONE and max(p.round for p in progress) > 1
        assert_nodes_hold_exactly_the_placement(nodes, router)
        assert all(n.store.nbytes <= n.core.memory_budget for n in nodes)
        router.stats(reset=True)
        assert generate_all(address) == cut(expected)
        assert router.stats().balance_ratio > 0.5  # contiguous: 1/3


def test_nodes_too_full_to_swap_stop_with_one_clear_error_and_keep_serving(skewed):
    path, expected = skewed
    # 0.6 MB: n0 and n2 are full with their 12 experts; n1's room does not let them swap
    with running_nodes(path, 3, memory_gb=0.0006) as nodes, \
            running_router(path, [n.address for n in nodes]) as router:
        address = f"127.0.0.1:{router.port}"
        assert generate_all(address) == cut(expected)
        with Client(address) as client, pytest.raises(PlacementError, match=r"rebalancing stopped after \d+ rounds: "
                                                                           r"\d+ expert copies still to load"):
            list(client.rebalance())
        assert_nodes_hold_exactly_the_placement(nodes, router)  # what it reached, consistently
        assert generate_all(address) == cut(expected)


def test_router_placed_by_calibrated_stats_is_balanced_from_the_start(skewed, calibrated):
    path, expected = skewed
    with running_nodes(path, 3) as nodes, running_router(path, [n.address for n in nodes],
                                                         placement_stats=calibrated[0]) as router:
        address = f"127.0.0.1:{router.port}"
        assert generate_all(address) == cut(expected)
        assert router.stats().balance_ratio >= 0.85


def test_automatic_mode_rebalances_when_the_balance_drops(skewed):
    path, expected = skewed
    with running_nodes(path, 3) as nodes, running_router(
            path, [n.address for n in nodes], rebalance_threshold=0.85, rebalance_interval=0.1,
            rebalance_min_tokens=20) as router:
        address = f"127.0.0.1:{router.port}"
        first = router.placement
        assert generate_all(address) == cut(expected)
        assert router.rebalancer.wait(1, timeout=30)
        assert router.placement is not first and sorted(router.placement.holders(0, 1)) == [0, 1, 2]
        router.stats(reset=True)
        assert generate_all(address) == cut(expected)
        assert router.stats().balance_ratio >= 0.85


def test_a_node_stopped_during_a_rebalance_delays_other_streams_by_at_most_the_forward_timeout(skewed, tmp_path):
    """n0 holds the hot experts, so every token needs it; it is SIGSTOPped as
    a rebalance starts moving experts onto and off it. The streams wait for
    the --forward-timeout, not for the rebalance's load to give up: the
    rebalance stops with an error naming n0, n0's experts are re-planned onto
    the others, and the streams go on with mlx-lm's tokens."""
    path, expected = skewed
    forward_timeout, margin = 3.0, 3.0  # margin: recovery's loads on a loaded machine
    with node_processes(path, 3, tmp_path) as nodes, \
            running_router(path, [a for _, a in nodes], forward_timeout=forward_timeout, assign_timeout=60) as router:
        address = f"127.0.0.1:{router.port}"
        try:
            with streaming(address, PROMPTS) as (got, times, errors):
                stopped = time.monotonic()
                nodes[0][0].proc.send_signal(signal.SIGSTOP)
                with Client(address) as client, pytest.raises(UnavailableError, match=r"rebalancing stopped: .*n0"):
                    list(client.rebalance())
        finally:  # once the streams ended
            nodes[0][0].proc.send_signal(signal.SIGCONT)
        assert not errors
        assert got == [expected[p] for p in PROMPTS]
        gaps = [b - a for ts in times for a, b in zip(ts, ts[1:]) if b > stopped]
        assert max(gaps) <= forward_timeout + margin, max(gaps)
        deadline = time.monotonic() + 60  # continued, n0 is re-admitted with the experts it held
        while router.cluster().nodes[0].state != pb.READY:
            assert time.monotonic() < deadline, router.cluster().nodes[0]
            time.sleep(0.1)
        assert generate_all(address) == cut(expected)
