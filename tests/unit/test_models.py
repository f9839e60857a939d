"""Model builders and the model/dataset config groups, composed from the real conf/."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from macfleet.config import register_configs
from macfleet.data import digits
from macfleet.errors import ConfigError, MacFleetError
from macfleet.models import cnn, gpt2, mlp, resnet

CONF = str(Path(__file__).resolve().parents[2] / "conf")
MODELS = ("digits_cnn", "mlp", "resnet18", "resnet50", "gpt2", "gpt2_tiny")
DATASETS = ("digits", "cifar10", "shapes", "text")


def compose_config(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_every_model_and_dataset_config_is_in_its_group():
    assert sorted(p.stem for p in Path(CONF, "model").glob("*.yaml")) == sorted(MODELS)
    assert sorted(p.stem for p in Path(CONF, "dataset").glob("*.yaml")) == sorted(DATASETS)


@pytest.mark.parametrize("name", MODELS)
def test_model_config_composes_and_instantiates(name):
    cfg = compose_config(f"model={name}")
    facts = {"vocab_size": 256} if name.startswith("gpt2") else {"num_classes": 10, "in_channels": 3}
    # The YAML leaves these null: the run fills them from the DatasetBundle.
    assert all(cfg.model[k] is None for k in facts)
    model = instantiate(cfg.model, **facts)
    assert isinstance(model, torch.nn.Module)
    with torch.no_grad():
        if name.startswith("gpt2"):
            out = model(torch.randint(0, 256, (1, 8)))
            assert type(out) is torch.Tensor and out.shape == (1, 8, 256)
        else:
            size = 8 if name in ("digits_cnn", "mlp") else 32
            assert model.eval()(torch.randn(2, 3, size, size)).shape == (2, 10)


@pytest.mark.parametrize("pools, size", [(0, 8), (1, 16), (2, 32), (4, 32)])
def test_digits_cnn_pools_keep_every_input_size_working(pools, size):
    model = instantiate(compose_config(f"model.pools={pools}").model, num_classes=10, in_channels=3)
    maxpools = sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert maxpools == pools  # pools=0 is the digits CNN as it always was
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_digits_cnn_pools_out_of_range_is_a_clear_error():
    with pytest.raises(ConfigError, match="model.pools=5: give 0 to 4"):
        cnn.build(pools=5)


def test_mlp_is_gradient_heavy_and_takes_any_image_size():
    """model=mlp: 17M parameters by default (68 MB of fp32 gradients a step), any input size."""
    assert 17e6 < sum(p.numel() for p in mlp.build(num_classes=10, in_channels=1).parameters()) < 17.2e6
    model = mlp.build(num_classes=10, in_channels=3)
    with torch.no_grad():
        for size in (8, 32, 5):
            assert model(torch.randn(2, 3, size, size)).shape == (2, 10)
    with pytest.raises(ConfigError, match="hidden=0, depth=2 and side=8 must all be >= 1"):
        mlp.build(hidden=0)


@pytest.mark.parametrize("name", ["digits", "shapes", "text"])
def test_offline_dataset_configs_build_bundles(name):
    bundle = instantiate(compose_config(f"dataset={name}").dataset)
    assert bundle.name == name and len(bundle.train) > 0 and bundle.test is not None
    x, y = bundle.train[0]
    assert tuple(x.shape) == bundle.input_shape


def test_cifar10_config_reports_missing_data(tmp_path, monkeypatch):
    monkeypatch.setenv("MACFLEET_DATA", str(tmp_path))
    cfg = compose_config("model=resnet50", "dataset=cifar10", "compression=topk_fp16", "cluster=single")
    assert cfg.dataset.root == str(tmp_path) and cfg.model.cifar_stem is True
    with pytest.raises(Exception) as err:
        instantiate(cfg.dataset)
    # Hydra wraps errors raised inside a target; the cause is ours and says what to do.
    cause = err.value if isinstance(err.value, MacFleetError) else err.value.__cause__
    assert isinstance(cause, MacFleetError) and "dataset.download=true" in str(cause)


def test_digits_cnn_learns_digits_to_95_percent():
    torch.manual_seed(0)
    bundle = digits.build()
    model = cnn.build(num_classes=bundle.num_classes, in_channels=bundle.in_channels)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=64, shuffle=True)
    for _ in range(4):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(bundle.test.inputs).argmax(1) == bundle.test.targets).float().mean().item()
    assert accuracy >= 0.95


def test_resnet_stems():
    cifar = resnet.resnet18(num_classes=10)
    imagenet = resnet.resnet18(num_classes=10, cifar_stem=False)
    assert cifar.conv1.kernel_size == (3, 3) and isinstance(cifar.maxpool, torch.nn.Identity)
    assert imagenet.conv1.kernel_size == (7, 7) and isinstance(imagenet.maxpool, torch.nn.MaxPool2d)
    gray = resnet.resnet18(num_classes=4, in_channels=1, cifar_stem=False)
    assert gray.eval()(torch.randn(1, 1, 64, 64)).shape == (1, 4)
    assert resnet.resnet50(num_classes=10).fc.out_features == 10


def test_gpt2_returns_logits_and_guards_its_context():
    model = gpt2.build(vocab_size=256, n_layer=1, n_head=2, n_embd=32, n_positions=16)
    logits = model(torch.randint(0, 256, (2, 16)))
    assert type(logits) is torch.Tensor and logits.shape == (2, 16, 256)
    with pytest.raises(ConfigError, match="block_size"):
        model(torch.randint(0, 256, (1, 17)))
    assert model.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=3).shape == (1, 7)
    with pytest.raises(ConfigError, match="divisible"):
        gpt2.build(vocab_size=256, n_head=3, n_embd=32)


def test_gpt2_pretrained_offline_says_how_to_get_weights():
    try:
        model = gpt2.build(pretrained=True, local_files_only=True)
    except MacFleetError as exc:
        assert "pretrained=false" in str(exc) and "cache" in str(exc)
    else:  # a machine whose Hugging Face cache holds GPT-2
        assert model.vocab_size == 50257


def test_hub_probe_sees_a_listening_endpoint_and_a_closed_one(monkeypatch):
    import socket

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        assert gpt2._hub_reachable(timeout=5.0)
    # Closed now: refused at once, so offline machines fail in seconds, not after retries.
    assert not gpt2._hub_reachable(timeout=5.0)
