"""`Encoder`: one thread that encodes a node's buckets, so backward's hooks only hand them over.

On an accelerator a codec's work is kernel launches: error feedback, top-k selection, packing,
the fp16 cast. Run inside the comm hook, every launch is host time on the autograd thread, the
thread that also launches backward's kernels; where the host is what bounds a step (a fast GPU,
a small batch per node), each bucket's encoding delays the rest of backward by as much. On its
own thread the same launches overlap backward's.

    enc = Encoder(solo=True)
    fut = enc.submit(lambda: compressor.reduce_now(flat, segments, step))   # -> Future
    enc.drain()                                     # every job handed over so far has run

Jobs run one at a time, in the order they were submitted, so every rank still issues its
collectives in bucket order. On CUDA the compressor runs each job on the stream that was current
where the hook ran (the autograd thread's, the forward's stream), so the device runs a bucket's
encoding after the kernels that produced it, as it would have inline; MPS has one queue, in the
order kernels are queued (`auto` does not pick the thread on MPS: see GradientCompressor). The
future returned completes with the job's own future's value, or its error.
"""

from __future__ import annotations

import queue
import threading
import weakref

import torch

from macfleet.comm.group import pass_outcome
from macfleet.comm.threads import solo as _solo
from macfleet.comm.threads import span


class _Queue:
    """What the thread and its Encoder share: the jobs, and how many have not run yet."""

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.cond = threading.Condition()
        self.queued = 0

    def ran(self) -> None:
        with self.cond:
            self.queued -= 1
            if not self.queued:
                self.cond.notify_all()


class Encoder:
    """A thread that runs submitted jobs in order; see the module docstring."""

    def __init__(self, solo: bool = True, name: str = "macfleet-encode"):
        self._q = _Queue()
        self._thread = threading.Thread(target=_run, args=(self._q, solo), name=name, daemon=True)
        self._thread.start()
        # The thread holds only the queue: an encoder that is dropped stops its thread.
        weakref.finalize(self, self._q.jobs.put, None)

    def submit(self, job) -> torch.futures.Future:
        """Run `job()` (which returns a Future) on the thread; a Future of its Future's value."""
        out: torch.futures.Future = torch.futures.Future()
        with self._q.cond:
            self._q.queued += 1
        self._q.jobs.put((job, out))
        return out

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every job submitted so far has run (not for their futures); False on timeout."""
        with self._q.cond:
            return self._q.cond.wait_for(lambda: self._q.queued == 0, timeout)

    def close(self) -> None:
        """Stop the thread once the jobs already submitted have run."""
        self._q.jobs.put(None)

    @property
    def ident(self) -> int | None:
        return self._thread.ident


def _run(q: _Queue, solo: bool) -> None:
    if solo:
        _solo()  # its torch CPU ops (small: shapes, a payload's header) on this thread alone
    while True:
        item = q.jobs.get()
        if item is None:
            return
        job, out = item
        del item
        try:
            with span("comm.encode"):  # a step profile's trace shows it beside the comm threads'
                inner = job()
        except BaseException as exc:  # noqa: BLE001 - the hook's caller sees it through the future
            out.set_exception(exc)
        else:
            inner.add_done_callback(lambda f, out=out: pass_outcome(f, out))
        finally:
            del job
            q.ran()

