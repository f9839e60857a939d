"""Every config group composes from the real conf/ and instantiates; bad input fails early."""

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from macfleet.config import ClusterConfig, CompressionConfig, LoggerConfig, NodeRole, TrainingConfig, to_dataclass
from macfleet.errors import ConfigError, DatasetMissingError
from tests.conftest import CONF, compose

GROUPS = ["trainer", "model", "dataset", "optimizer", "compression", "cluster", "logger"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in GROUPS:
        assert _options(group), f"conf/{group}/ has no options"
    assert {"digits_cnn", "resnet18", "resnet50", "gpt2", "gpt2_tiny"} <= set(_options("model"))
    assert {"digits", "cifar10", "text"} <= set(_options("dataset"))
    assert {"none", "fp16", "topk", "topk_fp16"} <= set(_options("compression"))
    assert {"sgd", "adamw"} <= set(_options("optimizer"))
    assert {"none", "wandb"} <= set(_options("logger"))


@pytest.mark.parametrize("group", ["trainer", "compression", "cluster", "logger"])
def test_typed_groups_compose_into_their_dataclass(group):
    cls = {"trainer": TrainingConfig, "compression": CompressionConfig, "cluster": ClusterConfig, "logger": LoggerConfig}[group]
    for option in _options(group):
        cfg = compose([f"{group}={option}"])
        obj = to_dataclass(cls, cfg[group])
        assert isinstance(obj, cls)


def test_trainer_follows_the_compression_group():
    cfg = compose(["compression=topk_fp16", "compression.ratio=0.01"])
    tc = to_dataclass(TrainingConfig, cfg.trainer)
    assert (tc.compression, tc.topk_ratio) == ("topk_fp16", 0.01)


def test_optimizers_instantiate():
    import torch

    p = [torch.nn.Parameter(torch.zeros(3))]
    for option in _options("optimizer"):
        cfg = compose([f"optimizer={option}", "trainer.learning_rate=0.3"])
        opt = instantiate(cfg.optimizer)(p)
        assert opt.param_groups[0]["lr"] == 0.3


@pytest.mark.parametrize("model", ["digits_cnn", "resnet18", "resnet50", "gpt2_tiny", "gpt2"])
def test_models_instantiate(model):
    from macfleet.run import build_model

    cfg = compose([f"model={model}"])
    dataset = "text" if model.startswith("gpt2") else "digits"
    bundle = instantiate(compose([f"dataset={dataset}"]).dataset)
    m = build_model(cfg.model, bundle)
    n = sum(p.numel() for p in m.parameters())
    expected = {"resnet50": 23e6, "gpt2": 80e6, "resnet18": 10e6}.get(model, 1e4)
    assert n > expected


def test_datasets_instantiate_offline():
    for ds in ("digits", "text"):
        bundle = instantiate(compose([f"dataset={ds}"]).dataset)
        assert len(bundle.train) > 0 and bundle.test is not None


def test_cifar10_missing_is_a_clear_error(tmp_path):
    from macfleet.run import build

    cfg = compose(["dataset=cifar10", f"dataset.root={tmp_path}"])
    with pytest.raises(DatasetMissingError, match="cifar-10-batches-py"):
        build(cfg.dataset)


def test_schema_rejects_typos_and_wrong_types():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose(["trainer.epochz=3"])
    with pytest.raises(ConfigCompositionException):
        compose(["trainer.epochs=three"])
    with pytest.raises(ConfigCompositionException):
        compose(["compression=zip"])


def test_dataclass_checks_say_what_to_do():
    with pytest.raises(ConfigError, match="choose one of"):
        TrainingConfig(device="tpu")
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        CompressionConfig(name="topk", ratio=0.0)
    with pytest.raises(ConfigError, match="master or worker"):
        ClusterConfig(role="boss")
    with pytest.raises(ConfigError, match="choose auto, ring or direct"):
        ClusterConfig(allreduce="tree")
    assert ClusterConfig(role="worker").role is NodeRole.WORKER
    assert ClusterConfig(role=NodeRole.MASTER).role is NodeRole.MASTER


def test_every_yaml_is_valid_and_resolves():
    for path in Path(CONF).rglob("*.yaml"):
        OmegaConf.load(path)  # syntax
    cfg = compose(["cluster=pro_air"])
    assert cfg.cluster.master_addr == "10.0.0.1" and cfg.cluster.master_port == 50051 and cfg.cluster.tensor_port == 50052
    assert list(cfg.cluster.weights) == [0.62, 0.38]


def test_experiments_compose_and_say_how_to_run():
    names = _options("experiment")
    assert {"resnet50_cifar10", "gpt2_text", "gpt2_tiny_smoke"} <= set(names)
    for name in names:
        text = (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()
        assert text[0] == "# @package _global_" and text[1].startswith("# python train.py")
        cfg = compose([f"experiment={name}"])
        assert cfg.model._target_ and cfg.dataset._target_


def test_default_job_is_a_two_node_compressed_fleet():
    cfg = compose([])
    assert (cfg.cluster.mode, cfg.cluster.nodes, cfg.compression.name) == ("local", 2, "topk_fp16")
    assert cfg.dataset._target_ == "macfleet.data.digits.build"


def test_every_option_and_experiment_passes_the_key_check():
    from macfleet.config import check_keys

    for group in GROUPS:
        for option in _options(group):
            check_keys(compose([f"{group}={option}"]))
    for name in _options("experiment"):
        check_keys(compose([f"experiment={name}"]))


@pytest.mark.parametrize("override,line", [
    ("+trainer.epoch=2", "trainer.epoch is not an option; did you mean trainer.epochs?"),
    ("+cluster.nodse=3", "cluster.nodse is not an option; did you mean cluster.nodes?"),
    ("+model.widht=8", "model.widht is not an option; did you mean model.width?"),
    ("+optimizer.momentun=0.5", "optimizer.momentun is not an option; did you mean optimizer.momentum?"),
])
def test_an_added_key_no_component_takes_names_the_closest_option(override, line):
    from macfleet.config import check_keys

    with pytest.raises(ConfigError, match=line.replace(".", r"\.").replace("?", r"\?")):
        check_keys(compose([override]))
