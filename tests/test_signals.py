"""A server's wait for Ctrl-C or SIGTERM (expertmesh.signals): the signal is
reported, never raised into whatever lock code the main thread is in."""

import os
import signal
import threading

import pytest

from expertmesh.signals import StopSignals, interruptible


def test_a_sigterm_is_reported_by_wait_and_the_old_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        assert not stop.wait(0), "no signal yet"
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(10)
        assert not stop.wait(0), "each signal is reported once"
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.wait(10)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


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
    try:
        for item in interruptible(reply):
            got.append(item)
            if item == "b":
                assert reply.waiting.wait(30)
                os.kill(os.getpid(), signal.SIGINT)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("no KeyboardInterrupt")
    assert got == ["a", "b"]
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
