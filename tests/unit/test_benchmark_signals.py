"""signals_held: a Ctrl-C or SIGTERM that comes while a benchmark starts its processes waits for
the block's end, so the cleanup has a handle to every process started."""

import os
import signal

import pytest

from macfleet.benchmark import signals_held, sigterm_interrupts


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupt_waits_for_the_end_of_the_block(sig):
    ran = []
    with pytest.raises(KeyboardInterrupt):
        with sigterm_interrupts():
            with signals_held():
                os.kill(os.getpid(), sig)
                ran.append("after the signal")  # the block runs on to its end
            ran.append("after the block")  # not reached: the interrupt is raised at the block's end
    assert ran == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nothing_is_raised_without_a_signal():
    with sigterm_interrupts():
        before = signal.getsignal(signal.SIGTERM)
        with signals_held():
            pass
        assert signal.getsignal(signal.SIGTERM) is before
