"""Ctrl-C on a router, as its operator and its clients see it: running
requests finish, new ones are refused, a second Ctrl-C ends them."""

import json
import signal
import urllib.error
import urllib.request

import pytest

from expertmesh import Client, UnavailableError
from expertmesh.testing.process import Process

from conftest import node_processes


def test_ctrl_c_finishes_running_requests_refuses_new_ones_and_a_second_ends_them(tiny, tmp_path):
    with node_processes(tiny, 2, tmp_path) as nodes:
        peers = [arg for _, address in nodes for arg in ("--peer", address)]
        router = Process(["router", "--model", str(tiny), "--port", "0", "--http-port", "0", "--no-discovery",
                          "--forward-timeout", "120", "--request-limit", "120", *peers], tmp_path / "router.log")
        try:
            address = router.address(timeout=120)
            api = router.wait_for(r"OpenAI-compatible API at (\S+)", 30).group(1)
            with Client(address) as client:
                stream = client.generate("Hello", max_tokens=400)
                assert next(stream).text is not None
                for node, _ in nodes:  # the request cannot finish while the test looks
                    node.proc.send_signal(signal.SIGSTOP)
                router.proc.send_signal(signal.SIGINT)
                router.wait_for(r"shutting down; finishing 1 request first, refusing new ones "
                                r"\(Ctrl-C again ends them now\)", 30)
                with pytest.raises(UnavailableError, match="^the router is shutting down"):
                    list(client.generate("Hi", max_tokens=2))
                request = urllib.request.Request(f"{api}/completions", headers={"Content-Type": "application/json"},
                                                 data=json.dumps({"prompt": "Hi", "max_tokens": 2}).encode())
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(request, timeout=30)
                assert refused.value.code == 503
                assert json.load(refused.value)["error"]["message"].startswith("the router is shutting down")
                router.proc.send_signal(signal.SIGINT)
                router.wait_for(r"ended 1 unfinished request$", 30)
                with pytest.raises(UnavailableError, match="^the router was stopped before this request finished"):
                    list(stream)
            for node, _ in nodes:
                node.proc.send_signal(signal.SIGCONT)
            assert router.proc.wait(timeout=60) == 130
            assert "Traceback" not in router.log.read_text()
        finally:
            router.proc.kill()
            router.proc.wait(timeout=30)
