"""The Python API as README shows it: an explicit role forms a fleet, and data that does not fit
the default loss is refused with a message (or trained with the user's `loss_fn`)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from macfleet import ClusterConfig, NodeRole, Trainer, TrainingConfig
from macfleet.comm.launch import free_ports, spawn_local
from macfleet.errors import ConfigError, MacFleetError

TOKEN = "api-test-token"


def _seed_snippet_node(rank: int, world_size: int, addrs: list[str], port: int, out: str) -> dict:
    """README's snippet, one per Mac: only role, master address and ports (no mode, no nodes)."""
    from macfleet.data.digits import build as digits
    from macfleet.models.cnn import build as cnn

    torch.manual_seed(0)
    tc = TrainingConfig(epochs=1, batch_size=64, learning_rate=0.05, max_steps=4, progress=False,
                        output_dir=out, device="cpu")
    cc = ClusterConfig(role=NodeRole.MASTER if rank == 0 else NodeRole.WORKER, master_addr="127.0.0.1",
                       master_port=port, tensor_port=int(addrs[rank].rsplit(":", 1)[1]), discovery_enabled=False,
                       token=TOKEN, wait_timeout=60)
    metrics = Trainer(cnn(num_classes=10, in_channels=1), digits(), tc, cc).fit()
    return {"world_size": metrics["world_size"], "mode": cc.mode, "nodes": cc.nodes}


def test_seed_snippet_as_master_and_worker_forms_one_fleet(tmp_path):
    ranks = spawn_local(_seed_snippet_node, 2, (free_ports(1)[0], str(tmp_path)), timeout=120)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["mode"] == "direct" and ranks[0]["nodes"] == 2


def test_config_defaults_follow_the_role():
    assert (ClusterConfig().mode, ClusterConfig().nodes) == ("single", 1)  # no role: one process
    master = ClusterConfig(role=NodeRole.MASTER)
    assert (master.mode, master.nodes) == ("direct", 2)
    assert ClusterConfig(role="worker").mode == "direct"
    assert ClusterConfig(role=NodeRole.MASTER, nodes=1).nodes == 1  # asked to train alone
    assert ClusterConfig(mode="local").nodes == 2


def test_master_without_workers_says_what_to_start(tmp_path):
    from macfleet.data.digits import build as digits
    from macfleet.models.cnn import build as cnn

    port, tport = free_ports(2)
    tc = TrainingConfig(epochs=1, batch_size=64, max_steps=1, progress=False, output_dir=str(tmp_path), device="cpu")
    cc = ClusterConfig(role=NodeRole.MASTER, master_addr="127.0.0.1", master_port=port, tensor_port=tport,
                       token=TOKEN, wait_timeout=1.5)
    with pytest.raises(MacFleetError) as err:
        Trainer(cnn(num_classes=10, in_channels=1), digits(), tc, cc).fit()
    msg = str(err.value)
    assert "only 1 of cluster.nodes=2" in msg and "worker" in msg and "nodes=1 trains alone" in msg


def _regression_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
    return TensorDataset(x, y)


def _tc(tmp_path, **kw) -> TrainingConfig:
    return TrainingConfig(epochs=kw.pop("epochs", 1), batch_size=32, learning_rate=0.05, progress=False,
                          output_dir=str(tmp_path), device="cpu", **kw)


def test_float_targets_without_loss_fn_are_refused(tmp_path):
    with pytest.raises(ConfigError) as err:
        Trainer(torch.nn.Linear(4, 1), _regression_data(64, 0), _tc(tmp_path))
    msg = str(err.value)
    assert "torch.float32 targets" in msg and "loss_fn=" in msg and "mse_loss" in msg


def test_loss_fn_and_val_dataset_train_a_regression(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    val = _regression_data(128, 1)
    with torch.no_grad():
        before = float(torch.nn.functional.mse_loss(model(val.tensors[0]), val.tensors[1]))
    metrics = Trainer(model, _regression_data(512, 0), _tc(tmp_path, epochs=3),
                      loss_fn=torch.nn.functional.mse_loss, val_dataset=val).fit()
    assert "test_accuracy" not in metrics  # no accuracy for a regression
    assert metrics["test_loss"] < 0.05 * before, (metrics["test_loss"], before)


def test_labels_beyond_the_model_outputs_are_refused(tmp_path):
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 10, (64,)))
    with pytest.raises(ConfigError, match="labels run from 0 to 9, but the model has 3 outputs"):
        Trainer(torch.nn.Linear(4, 3), data, _tc(tmp_path, max_steps=1)).fit()


def test_items_that_are_not_pairs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"items must be \(input, target\) pairs"):
        Trainer(torch.nn.Linear(4, 3), TensorDataset(torch.randn(8, 4)), _tc(tmp_path))
