"""DataLoader workers and the fleet's sockets: a forked worker must not keep the node's network
sockets alive after the node closes them (macfleet/data/loader.py, drop_inherited_sockets).

Before, a persistent worker held a copy of the data plane's listener, so the next generation could
not listen on the same port ("Address already in use") and every elastic recovery with
`trainer.num_workers` > 0 stopped the run; and it held copies of the node's connections, so a peer
never saw them close. Real fork, real DataLoader workers, real sockets.
"""

from __future__ import annotations

import socket

import pytest
import torch
from torch.utils.data import TensorDataset

from macfleet.data.loader import build_loader, drop_inherited_sockets
from macfleet.sampler import WeightedBatchSampler


def _listener(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the data plane's transport does
    sock.bind(("127.0.0.1", port))
    sock.listen(8)
    return sock


@pytest.mark.skipif(torch.multiprocessing.get_start_method(allow_none=True) not in (None, "fork"),
                    reason="workers are forked only where fork is the start method (Linux)")
def test_forked_workers_let_go_of_the_nodes_sockets():
    listener = _listener()
    port = listener.getsockname()[1]
    peer = socket.create_connection(("127.0.0.1", port), timeout=5)  # a peer connected to this node
    conn, _ = listener.accept()
    data = TensorDataset(torch.arange(64, dtype=torch.float32).reshape(32, 2), torch.zeros(32, dtype=torch.long))
    sampler = WeightedBatchSampler(dataset_size=32, global_batch=8, weights=[1.0])
    loader = build_loader(data, sampler, seed=0, num_workers=2)
    sampler.set_epoch(0)
    batches = iter(loader)
    # The persistent workers are forked now, holding whatever they inherited. Batches alternate
    # between them: two batches mean both ran their worker_init_fn.
    for _ in range(2):
        x, _ = next(batches)
        assert x.shape == (8, 2)

    # The node closes this generation's data plane ...
    conn.close()
    listener.close()
    # ... and the next generation listens on the same port at once.
    again = _listener(port)
    again.close()
    # The peer sees its connection close (EOF), not a connection a worker keeps open.
    peer.settimeout(10)
    assert peer.recv(1) == b""
    peer.close()
    x, _ = next(batches)  # the workers still serve batches
    assert x.shape == (8, 2)
    del batches, loader


def test_only_network_sockets_are_dropped():
    """Pipes and Unix sockets (a worker's way to hand batches back) stay; a TCP socket is replaced
    by /dev/null under the same descriptor number."""
    tcp = _listener()
    left, right = socket.socketpair()  # AF_UNIX
    try:
        # Run in a forked child, as a worker would: the parent's sockets must stay as they are.
        import os

        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit code
            code = 1
            try:
                dropped = drop_inherited_sockets()
                still_unix = socket.socket(fileno=os.dup(left.fileno())).family == socket.AF_UNIX
                tcp_gone = not __import__("stat").S_ISSOCK(os.fstat(tcp.fileno()).st_mode)
                code = 0 if dropped >= 1 and still_unix and tcp_gone else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent's own sockets were not touched.
        assert tcp.getsockname()[0] == "127.0.0.1" and left.family == socket.AF_UNIX
    finally:
        tcp.close()
        left.close()
        right.close()
