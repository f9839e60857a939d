"""torch DDP over the "macfleet" backend: same parameters as over gloo, in 2 real processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from macfleet.comm.launch import free_ports, spawn_local
from tests.conftest import ROOT

HERE = ROOT / "tests" / "integration"
# ROOT first on the path: the scripts run from tests/integration/ must import this checkout's macfleet.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
           PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def _train(backend: str, rank: int, world_size: int, port: int, hook: bool) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import macfleet  # noqa: F401 - registers "macfleet"

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    # The data-plane session rank 0 drew and published in the store (the default group is ours).
    session = dist.distributed_c10d._get_default_group().group.session if backend == "macfleet" else None
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    # Rank 1 starts different: DDP's initial broadcast must make the replicas equal.
    if rank == 1:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    ddp = DDP(model, bucket_cap_mb=0.0005)  # tiny buckets: several all_reduces per step
    if hook:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(None, default_hooks.allreduce_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(5):
        x, y = torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    gathered = [torch.zeros(2) for _ in range(world_size)]
    dist.all_gather(gathered, torch.tensor([float(rank), 7.0]))
    dist.barrier()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    engine = dist.distributed_c10d._get_default_group().group if backend == "macfleet" else None
    dist.destroy_process_group()
    # A group the backend made is the backend's: destroying the process group closes it.
    closed = engine._closed if engine is not None else None
    return {"state": state, "gathered": gathered, "session": session, "closed": closed}


def _from_group(rank: int, world_size: int, addrs: list[str]) -> dict:
    import threading

    import torch.distributed as dist

    from macfleet.comm import Group
    from macfleet.comm.backend import init_process_group_from_group

    group = Group(rank, world_size, addrs, timeout=30, session=0x5E55_1011)
    init_process_group_from_group(group)
    assert dist.get_backend() == "macfleet"
    assert dist.distributed_c10d._get_default_group().group.session == 0x5E55_1011
    t = torch.full((3,), float(rank + 1))
    dist.all_reduce(t)
    b = torch.full((2,), float(rank))
    dist.broadcast(b, src=1)
    dist.destroy_process_group()
    # The caller's Group outlives the process group (a trainer rebuilding its DDP within a
    # generation keeps training on it): it still sums, and serves a second process group.
    again = torch.full((1,), 10.0 * (rank + 1))
    group.all_reduce(again)
    init_process_group_from_group(group)
    dist.all_reduce(again)
    dist.destroy_process_group()
    group.close()
    comm_threads = [th.name for th in threading.enumerate() if th.name.startswith("macfleet-comm")]
    return {"sum": t.tolist(), "bcast": b.tolist(), "again": again.tolist(), "threads_left": comm_threads}


def _ranks(rank, world_size, addrs, ports):
    out = {name: _train(name.split("+")[0], rank, world_size, port, name.endswith("hook"))
           for name, port in zip(("gloo", "macfleet", "macfleet+hook"), ports)}
    out["from_group"] = _from_group(rank, world_size, addrs)
    return out


def test_ddp_over_macfleet_matches_gloo():
    results = spawn_local(_ranks, 2, (free_ports(3),), timeout=150)
    ref = results[0]["gloo"]["state"]
    for rank in range(2):
        for name in ("macfleet", "macfleet+hook"):
            out = results[rank][name]
            for key, value in ref.items():
                assert torch.allclose(out["state"][key], value, atol=1e-6), (rank, name, key)
            assert [t.tolist() for t in out["gathered"]] == [[0.0, 7.0], [1.0, 7.0]]
    # Both ranks of one rendezvous share rank 0's random session; the next rendezvous draws another.
    sessions = [[results[r][name]["session"] for r in range(2)] for name in ("macfleet", "macfleet+hook")]
    assert sessions[0][0] == sessions[0][1] and sessions[1][0] == sessions[1][1], sessions
    assert sessions[0][0] != sessions[1][0] and 0 not in sessions[0] + sessions[1], sessions
    for rank in range(2):
        assert results[rank]["from_group"] == {"sum": [3.0] * 3, "bcast": [1.0, 1.0], "again": [60.0],
                                               "threads_left": []}
        assert results[rank]["macfleet"]["closed"] is True and results[rank]["macfleet+hook"]["closed"] is True
    # The replicas agree with each other exactly (both ranks hold the same all_reduce result).
    for key in ref:
        assert torch.equal(results[0]["macfleet"]["state"][key], results[1]["macfleet"]["state"][key])


ONE_PROCESS_GROUP = """
import sys
{imports}
loaded = [m for m in ("zmq", "macfleet.comm.backend", "macfleet.comm.group") if m in sys.modules]
assert not loaded, f"registration loaded the engine: {{loaded}}"
dist.init_process_group("macfleet", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
t = torch.ones(3)
dist.all_reduce(t)
print(dist.get_backend(), t.tolist())
dist.destroy_process_group()
"""


@pytest.mark.parametrize("imports", [
    "import macfleet\nassert 'torch' not in sys.modules\nimport torch, torch.distributed as dist",
    "import torch, torch.distributed as dist\nimport macfleet",
])
def test_import_macfleet_registers_backend(imports):
    # Either import order; registering loads neither torch (when first) nor the engine.
    code = ONE_PROCESS_GROUP.format(imports=imports, port=free_ports(1)[0])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "macfleet [1.0, 1.0, 1.0]"


def _final_state(cmd: list[str], backend: str, tmp_path) -> dict:
    out_file = tmp_path / f"{backend}.pt"
    out = subprocess.run([*cmd, backend, str(out_file)], capture_output=True, text=True, timeout=240, env=ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return torch.load(out_file)


def _assert_same_states(cmd: list[str], tmp_path) -> None:
    ref = _final_state(cmd, "gloo", tmp_path)
    got = _final_state(cmd, "macfleet", tmp_path)
    assert ref.keys() == got.keys()
    for key, value in ref.items():
        assert torch.allclose(got[key], value, atol=1e-6), key


def test_torchrun_plain_ddp_script_matches_gloo(tmp_path):
    # The real torchrun, 2 processes, a script whose only MacFleet line is `import macfleet`.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    _assert_same_states([*torchrun, str(HERE / "plain_ddp.py")], tmp_path)


def test_lightning_ddp_strategy_matches_gloo(tmp_path):
    # Lightning launches its second process itself: DDPStrategy(process_group_backend="macfleet").
    _assert_same_states([sys.executable, str(HERE / "lightning_ddp.py")], tmp_path)


def _algorithm_of(rank: int, world_size: int, addrs: list[str], port: int) -> tuple[str, bool]:
    import torch.distributed as dist

    import macfleet  # noqa: F401 - registers "macfleet"

    # Only rank 0's setting counts: it publishes it, so the ranks can never mix algorithms.
    os.environ["MACFLEET_ALLREDUCE"] = "direct" if rank == 0 else "ring"
    dist.init_process_group("macfleet", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    t = torch.arange(3_000_000, dtype=torch.float32) * (rank + 1)  # 12 MB: the whole-tensor exchange
    dist.all_reduce(t)
    algorithm = dist.distributed_c10d._get_default_group().group.algorithm
    dist.destroy_process_group()
    return algorithm, torch.equal(t, torch.arange(3_000_000, dtype=torch.float32) * 3)


def test_rank_0_chooses_the_all_reduce_algorithm_for_every_rank():
    assert spawn_local(_algorithm_of, 2, (free_ports(1)[0],), timeout=120) == [("direct", True)] * 2
