"""The encoder thread (macfleet/compression/encoder.py): order, errors, drain, and its end."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from macfleet.compression.encoder import Encoder
from macfleet.config import CompressionConfig
from macfleet.errors import ConfigError


def _done(value) -> torch.futures.Future:
    fut = torch.futures.Future()
    fut.set_result(value)
    return fut


def test_jobs_run_in_order_on_the_thread_and_errors_reach_the_future():
    enc = Encoder()
    ran = []
    futures = [enc.submit(lambda i=i: (ran.append((i, threading.get_ident())), _done(i))[1]) for i in range(20)]
    assert [f.wait() for f in futures] == list(range(20))
    assert [i for i, _ in ran] == list(range(20))
    assert {t for _, t in ran} == {enc.ident} != {threading.get_ident()}

    def fails():
        raise ValueError("a bucket's segments do not cover it")

    with pytest.raises(ValueError, match="do not cover it"):
        enc.submit(fails).wait()
    later = torch.futures.Future()
    chained = enc.submit(lambda: later)  # the job's own future completes later, from elsewhere
    assert enc.drain(timeout=10) and not chained.done()
    later.set_exception(RuntimeError("peer lost"))
    with pytest.raises(RuntimeError, match="peer lost"):
        chained.wait()
    enc.close()


def test_drain_waits_for_a_running_job():
    enc = Encoder()
    started, release = threading.Event(), threading.Event()

    def slow():
        started.set()
        release.wait(10)
        return _done(1)

    fut = enc.submit(slow)
    assert started.wait(10)
    assert not enc.drain(timeout=0.05)  # still running
    release.set()
    assert enc.drain(timeout=10) and fut.wait() == 1
    enc.close()


def test_a_dropped_encoder_stops_its_thread():
    enc = Encoder()
    enc.submit(lambda: _done(0)).wait()
    thread = enc._thread
    del enc
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()


def test_the_encoder_option_is_checked():
    assert CompressionConfig(name="topk", encoder="thread").encoder == "thread"
    with pytest.raises(ConfigError, match="compression.encoder='threads': choose one of auto, thread, inline"):
        CompressionConfig(name="topk", encoder="threads")
