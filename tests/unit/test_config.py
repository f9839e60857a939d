"""Every config group composes from the real conf/ and instantiates; bad input fails early."""

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from macfleet.config import (
    ClusterConfig,
    CompressionConfig,
    LoggerConfig,
    NodeRole,
    SchedulerConfig,
    TrainingConfig,
    check_keys,
    to_dataclass,
)
from macfleet.errors import ConfigError, DatasetMissingError
from tests.conftest import CONF, compose

GROUPS = ["trainer", "model", "dataset", "optimizer", "scheduler", "compression", "cluster", "logger"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in GROUPS:
        assert _options(group), f"conf/{group}/ has no options"
    assert {"digits_cnn", "resnet18", "resnet50", "gpt2", "gpt2_tiny"} <= set(_options("model"))
    assert {"digits", "cifar10", "text"} <= set(_options("dataset"))
    assert {"none", "fp16", "int8", "topk", "topk_fp16"} <= set(_options("compression"))
    assert {"sgd", "adamw"} <= set(_options("optimizer"))
    assert {"constant", "cosine", "step"} <= set(_options("scheduler"))
    assert {"none", "wandb"} <= set(_options("logger"))


@pytest.mark.parametrize("group", ["trainer", "compression", "scheduler", "cluster", "logger"])
def test_typed_groups_compose_into_their_dataclass(group):
    cls = {"trainer": TrainingConfig, "compression": CompressionConfig, "scheduler": SchedulerConfig,
           "cluster": ClusterConfig, "logger": LoggerConfig}[group]
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


@pytest.mark.parametrize("model", ["digits_cnn", "mlp", "resnet18", "resnet50", "gpt2_tiny", "gpt2"])
def test_models_instantiate(model):
    from macfleet.run import build_model

    cfg = compose([f"model={model}"])
    dataset = "text" if model.startswith("gpt2") else "digits"
    bundle = instantiate(compose([f"dataset={dataset}"]).dataset)
    m = build_model(cfg.model, bundle)
    n = sum(p.numel() for p in m.parameters())
    expected = {"resnet50": 23e6, "gpt2": 80e6, "resnet18": 10e6, "mlp": 17e6}.get(model, 1e4)
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
    with pytest.raises(ConfigError, match=r"bucket_cap_mb=0 must be > 0 \(MB per gradient bucket"):
        ClusterConfig(bucket_cap_mb=0)
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
    with pytest.raises(ConfigError, match=line.replace(".", r"\.").replace("?", r"\?")):
        check_keys(compose([override]))


def _lrs(schedule: SchedulerConfig, total: int) -> list[float]:
    """The LR multiplier at each of `total` steps, from the builder the trainer calls."""
    import torch

    from macfleet.trainer import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, schedule, total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_the_schedule_group_and_the_api_fields_build_one_schedule():
    import torch
    from torch.utils.data import TensorDataset

    from macfleet.trainer import Trainer

    cfg = compose(["scheduler=step", "scheduler.warmup_steps=2"])
    group = to_dataclass(SchedulerConfig, cfg.scheduler)
    assert group == SchedulerConfig(name="step", warmup_steps=2)
    tc = to_dataclass(TrainingConfig, cfg.trainer)  # the API's fields follow the group
    assert (tc.lr_schedule, tc.warmup_steps) == ("step", 2)
    data = TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    api = Trainer(torch.nn.Linear(2, 2), data, TrainingConfig(lr_schedule="step", warmup_steps=2)).schedule
    assert api == group
    # Warm-up, then x0.1 at 50% and x0.01 at 75% of the 8 steps after it.
    assert _lrs(group, 10) == pytest.approx([0.5, 1.0, 1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    assert _lrs(to_dataclass(SchedulerConfig, compose(["scheduler=constant"]).scheduler), 5) == [1.0] * 5
    cosine = _lrs(to_dataclass(SchedulerConfig, compose([]).scheduler), 5)  # the default
    assert cosine[0] == 1.0 and cosine == sorted(cosine, reverse=True) and cosine[-1] < 0.1
    with pytest.raises(ConfigError, match="scheduler.warmup_steps must be >= 0"):
        SchedulerConfig(warmup_steps=-1)


def test_train_py_hands_the_trainer_the_schedule_group(monkeypatch):
    from macfleet.run import run

    seen = {}

    class Recorder:
        def __init__(self, *args, **kwargs):
            seen.update(kwargs, tc=args[2])

        def fit(self):
            return {"test_accuracy": 0.5}

    monkeypatch.setattr("macfleet.trainer.Trainer", Recorder)
    assert run(compose(["cluster=single", "scheduler=constant", "scheduler.warmup_steps=7"])) == 0.5
    assert seen["scheduler_config"] == SchedulerConfig(name="constant", warmup_steps=7)
    assert (seen["tc"].lr_schedule, seen["tc"].warmup_steps, seen["tc"].optimizer) == ("constant", 7, None)


@pytest.mark.parametrize("override,line", [
    ("trainer.lr_schedule=step", "trainer.lr_schedule=step disagrees with scheduler.name=cosine: the scheduler "
                                 "group sets it; use scheduler=step"),
    ("trainer.warmup_steps=100", "trainer.warmup_steps=100 disagrees with scheduler.warmup_steps=0: the scheduler "
                                 "group sets it; use scheduler.warmup_steps=100"),
    ("trainer.compression=fp16", "trainer.compression=fp16 disagrees with compression.name=topk_fp16: the "
                                 "compression group sets it; use compression=fp16"),
    ("trainer.optimizer=adamw", "trainer.optimizer=adamw: the optimizer group builds the optimizer; "
                                "use optimizer=adamw"),
])
def test_a_trainer_field_set_apart_from_its_group_names_the_option(override, line):
    with pytest.raises(ConfigError) as err:
        check_keys(compose([override]))
    assert str(err.value) == line


def test_a_trainer_field_that_agrees_with_its_group_still_works():
    check_keys(compose(["scheduler=step", "trainer.lr_schedule=step", "trainer.compression=topk_fp16"]))


def test_conf_local_is_merged_when_present(tmp_path):
    # A search path stands in for the repository's git-ignored conf/local/ (never written by tests).
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "default.yaml").write_text(
        "# @package _global_\ncluster:\n  master_addr: 10.1.2.3\nlogger:\n  entity: my-team\n")
    (tmp_path / "local" / "air.yaml").write_text("# @package _global_\ncluster:\n  master_addr: 10.9.9.9\n")
    here = f"hydra.searchpath=[file://{tmp_path}]"
    cfg = compose([here, "cluster=pro_air"])
    assert (cfg.cluster.master_addr, cfg.cluster.master_port, cfg.logger.entity) == ("10.1.2.3", 50051, "my-team")
    check_keys(cfg)
    assert compose([here, "cluster=pro_air", "cluster.master_addr=10.0.0.7"]).cluster.master_addr == "10.0.0.7"
    assert compose([here, "cluster=pro_air", "local=air"]).cluster.master_addr == "10.9.9.9"
    assert compose([here, "cluster=pro_air", "~local"]).cluster.master_addr == "10.0.0.1"
    assert compose(["cluster=pro_air"]).cluster.master_addr == "10.0.0.1"  # none there: nothing merged


def test_bucket_size_composes_and_every_node_must_agree_on_it():
    """cluster.bucket_cap_mb sets how gradients are split into collectives: nodes that disagree
    would pair collectives of different sizes, so it is part of the join fingerprint."""
    from macfleet.fingerprint import diff, fingerprint

    cfg = compose(["cluster=local", "cluster.bucket_cap_mb=8"])
    assert cfg.cluster.bucket_cap_mb == 8
    a = fingerprint({"cluster": {"bucket_cap_mb": 25.0, "weight": 1.0}})
    b = fingerprint({"cluster": {"bucket_cap_mb": 8, "weight": 2.0}})
    assert diff(a, b) == ["cluster.bucket_cap_mb: master 25, this node 8"]  # cluster.weight is per node
