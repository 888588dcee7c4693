"""A server's wait for Ctrl-C or SIGTERM (expertmesh.signals): the signal is
reported, never raised into whatever lock code the main thread is in."""

import os
import signal
import threading

import pytest

from expertmesh.signals import StopSignals, interruptible


def test_each_signal_is_reported_once_by_wait_and_the_old_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd)
    with StopSignals() as stop:
        assert not stop.wait(0), "no signal yet"
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(10)
        assert not stop.wait(0), "each signal is reported once"
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # a quick second one (Ctrl-C twice) is its own
        assert stop.wait(10) and stop.wait(10)
        assert not stop.wait(0)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert signal.set_wakeup_fd(fd) == fd, "the wakeup fd before the block is back"


def test_signals_arriving_while_the_main_thread_waits_on_a_condition_raise_nothing_into_it():
    """What broke in CI: SIGTERM's KeyboardInterrupt landed inside grpc's
    ``Condition.wait`` and its lock was left half-released ("release unlocked
    lock"). Here a burst of signals arrives while the main thread goes round
    such waits; none may raise, and every one is reported after."""
    cond = threading.Condition()
    done = threading.Event()

    def burst():
        for _ in range(300):
            os.kill(os.getpid(), signal.SIGTERM)
        done.set()

    with StopSignals() as stop:
        sender = threading.Thread(target=burst)
        sender.start()
        while not done.is_set():
            with cond:
                cond.wait(0.0005)
        sender.join()
        assert stop.wait(10)


class _Reply:
    """A stream that yields two items, then waits until it is cancelled."""

    def __init__(self):
        self.cancelled = threading.Event()
        self.waiting = threading.Event()

    def __iter__(self):
        yield "a"
        yield "b"
        self.waiting.set()
        self.cancelled.wait(30)
        raise RuntimeError("cancelled")  # what a cancelled grpc stream does: raise in its reader

    def cancel(self):
        self.cancelled.set()


def test_ctrl_c_while_a_reply_streams_cancels_it_and_raises_keyboardinterrupt_in_the_reader():
    reply = _Reply()
    got = []

    def ctrl_c():  # while the main thread waits for the next item
        if reply.waiting.wait(30):
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c, daemon=True).start()
    try:
        for item in interruptible(reply):
            got.append(item)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("no KeyboardInterrupt")
    assert got in ([], ["a"], ["a", "b"]), "items come in order; those not yet read when Ctrl-C came may be dropped"
    assert reply.cancelled.is_set(), "the router is told to stop generating"


def test_a_reply_read_to_its_end_or_left_early_raises_its_own_errors_and_is_cancelled_when_left():
    assert list(interruptible(_Items(["x", "y"]))) == ["x", "y"]
    failing = _Items(["x"], error=ValueError("refused"))
    with pytest.raises(ValueError, match="refused"):
        list(interruptible(failing))
    reply = _Reply()
    items = interruptible(reply)
    assert next(items) == "a"
    items.close()  # the caller walks away
    assert reply.cancelled.is_set()


class _Items:
    def __init__(self, items, error=None):
        self.items, self.error = items, error

    def __iter__(self):
        yield from self.items
        if self.error:
            raise self.error

    def cancel(self):
        pass


def test_once_the_stop_starts_a_further_signal_ends_the_process_at_once():
    """A shutdown that hangs (a node that never answers its release, say)
    is cut short by one more Ctrl-C: status 130 at once, with a line saying so."""
    import select
    import subprocess
    import sys

    script = (
        "import signal, sys, time\n"
        "from expertmesh.signals import StopSignals\n"
        "with StopSignals() as stop:\n"
        "    print('serving', flush=True)\n"
        "    stop.wait()\n"
        "    stop.end_at_once_on_the_next()\n"
        "    print('stopping', flush=True)\n"
        "    while True:\n"
        "        time.sleep(1)  # the stop that hangs\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    def line() -> str:  # the child's next line, or "" after 30 s (no hang if it never comes)
        ready, _, _ = select.select([child.stdout], [], [], 30)
        return child.stdout.readline() if ready else ""

    try:
        assert line() == "serving\n"
        child.send_signal(signal.SIGTERM)
        assert line() == "stopping\n"
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=30) == 130
        assert "stopped at once" in child.stderr.read()
    finally:
        child.kill()
        child.wait()
