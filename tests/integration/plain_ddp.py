"""A plain torch DDP script, as a user would write it: `import macfleet` is its only MacFleet line.

    python -m torch.distributed.run --nproc-per-node 2 tests/integration/plain_ddp.py macfleet OUT.pt

Trains a small model for a few steps on CPU over BACKEND; rank 0 saves the final state_dict to OUT.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import macfleet  # noqa: F401 - registers the "macfleet" backend

backend, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
dist.init_process_group(backend)  # torchrun's env: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
rank = dist.get_rank()
torch.manual_seed(0)
model = DDP(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
for _ in range(5):
    x, y = torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
if rank == 0:
    torch.save(model.module.state_dict(), out)
# Both ranks tear down together: a rank that destroyed its gloo group while the other was still
# saving once died with "terminate called without an active exception" (SIGABRT) in CI.
dist.barrier()
if backend == "gloo":
    # gloo's own teardown still aborted rank 0 that way once after the barrier (CI, 2026-11-28):
    # its loop thread races the peer closing its sockets. gloo is only the reference here, so
    # its ranks leave without tearing it down; the macfleet backend's teardown runs below.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
dist.destroy_process_group()
