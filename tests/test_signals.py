"""A server's wait for Ctrl-C or SIGTERM (expertmesh.signals): the signal is
reported, never raised into whatever lock code the main thread is in."""

import os
import signal
import threading

from expertmesh.signals import StopSignals


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
