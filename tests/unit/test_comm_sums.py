"""The comm threads' sums (`collectives._add`): the same bits as torch's add, and no OpenMP team.

torch's CPU add runs in its intra-op OpenMP pool; a team started from a comm thread keeps
spinning after every sum and takes the cores of the training thread and of libzmq's I/O
threads on a node pinned to its cores. Single-precision and integer sums run in NumPy instead;
half precision stays in torch, on comm threads limited to themselves (`solo`).
"""

from __future__ import annotations

import os
import threading

import pytest
import torch

from macfleet.comm.collectives import _add
from macfleet.comm.threads import solo

BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _operands(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    if dtype.is_floating_point:
        a = torch.randn(100_003, generator=g).mul_(1e4).to(dtype)
        b = torch.randn(100_003, generator=g).to(dtype)
        special = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e-40, -0.0, 6e4])
        a[: len(special)], b[: len(special)] = special.to(dtype), special.flip(0).to(dtype)
        return a, b
    info = torch.iinfo(dtype)
    a = torch.randint(info.min, info.max, (100_003,), generator=g, dtype=dtype)
    b = torch.randint(info.min, info.max, (100_003,), generator=g, dtype=dtype)
    a[0], b[0] = info.max, 1  # wraps, as torch's add does
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8])
def test_sums_are_torch_add_bit_for_bit(dtype):
    a, b = _operands(dtype)
    want = torch.add(a, b)
    out = torch.empty_like(a)
    _add(out, a, b)
    view = BITS.get(dtype)
    assert torch.equal(out.view(view), want.view(view)) if view else torch.equal(out, want)
    _add(a, a, b)  # in place, as the all_reduce sums into its tensor
    assert torch.equal(a.view(view), want.view(view)) if view else torch.equal(a, want)


def _threads_started_by(fn) -> int:
    """Threads this process gained while `fn` ran on a fresh thread (an OpenMP team's workers
    stay alive with the thread that started them)."""
    seen = {}

    def run():
        before = set(os.listdir("/proc/self/task"))
        fn()
        seen["new"] = len(set(os.listdir("/proc/self/task")) - before)  # threads ending meanwhile do not count

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return seen["new"]


def test_sums_start_no_openmp_team_on_a_comm_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a, b = torch.ones(1 << 20), torch.ones(1 << 20)
        assert _threads_started_by(lambda: a.add_(b)) >= 1  # what torch's add does (the reason for _add)
        assert _threads_started_by(lambda: _add(a, a, b)) == 0
        assert torch.equal(a, torch.full((1 << 20,), 3.0))
    finally:
        torch.set_num_threads(threads)


def test_solo_keeps_a_threads_torch_ops_on_it_and_leaves_other_threads_alone():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a, b = torch.ones(1 << 20), torch.ones(1 << 20)
        seen = {}

        def alone():
            seen["solo"] = solo()
            seen["threads"] = torch.get_num_threads()
            a.add_(b)
            a.to(torch.float16)  # a codec's cast in a future's callback

        assert _threads_started_by(alone) == 0
        assert seen == {"solo": True, "threads": 1}
        assert torch.get_num_threads() == 2  # per thread: the caller keeps its pool
        assert _threads_started_by(lambda: a.add_(b)) >= 1  # and so does the next new thread
    finally:
        torch.set_num_threads(threads)
