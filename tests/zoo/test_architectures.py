"""Zoo architectures: registry, parameter counts, forward shapes, init options, seeded dropout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sane_hf.zoo.architectures import (
    ACTIVATIONS,
    INITS,
    SeededDropout,
    create_model,
    dropout_mask,
    list_architectures,
    register_architecture,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# (arch, builder kwargs, input shape, expected parameter count)
CASES = [
    ("mlp", dict(image_size=8), (5, 1, 8, 8), 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10),
    ("mlp", dict(image_size=8, hidden=(8, 4)), (5, 1, 8, 8), 64 * 8 + 8 + 8 * 4 + 4 + 4 * 10 + 10),
    ("cnn-s", dict(image_size=8), (5, 1, 8, 8), 1096),
    ("cnn-s", dict(image_size=14), (5, 1, 14, 14), None),
    ("cnn-s", dict(image_size=28), (5, 1, 28, 28), 2464),
    ("cnn-m", dict(image_size=28), (5, 1, 28, 28), None),
    ("cnn-s", dict(image_size=32, in_channels=3), (5, 3, 32, 32), None),
    ("resnet18", dict(image_size=16, in_channels=3, width=4), (2, 3, 16, 16), None),
]


def test_registry():
    assert {"mlp", "cnn-s", "cnn-m", "resnet18"} <= set(list_architectures())
    with pytest.raises(ValueError, match="registered"):
        create_model("transformer-xxl")
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("mlp")(lambda **kw: nn.Linear(1, 1))


@pytest.mark.parametrize("arch,kwargs,shape,count", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_forward_shapes_and_param_counts(arch, kwargs, shape, count):
    model = create_model(arch, num_classes=7, seed=0, **kwargs)
    out = model(torch.randn(*shape))
    assert out.shape == (shape[0], 7)
    if count is not None:
        # the documented counts are for 10 classes
        model10 = create_model(arch, num_classes=10, seed=0, **kwargs)
        assert n_params(model10) == count


def test_resnet18_standard_size_and_bn_buffers():
    model = create_model("resnet18", in_channels=3, image_size=32, width=64)
    assert n_params(model) == 11_173_962  # CIFAR ResNet-18, 10 classes
    keys = model.state_dict().keys()
    assert {"bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked", "layer2.0.downsample.1.weight"} <= set(keys)


def test_state_dict_keys_are_stable():
    assert list(create_model("cnn-s", image_size=8).state_dict()) == [
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "conv3.weight", "conv3.bias",
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
    ]
    assert list(create_model("mlp").state_dict()) == [
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias",
    ]


@pytest.mark.parametrize("init", INITS)
def test_init_options_are_seeded(init):
    a = create_model("cnn-s", image_size=8, init=init, seed=3)
    b = create_model("cnn-s", image_size=8, init=init, seed=3)
    if init != "default":  # 'default' keeps torch's own init (global RNG)
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(va, vb), k
        c = create_model("cnn-s", image_size=8, init=init, seed=4)
        assert not torch.equal(a.conv1.weight, c.conv1.weight)
        assert float(a.fc1.bias.detach().abs().sum()) == 0.0


def test_inits_differ_in_scale():
    std = {i: float(create_model("mlp", init=i, seed=0).fc1.weight.detach().std()) for i in ("kaiming-uniform", "xavier", "uniform")}
    assert std["kaiming-uniform"] == pytest.approx((2.0 / 64) ** 0.5, rel=0.1)
    assert std["uniform"] == pytest.approx(0.2 / 12**0.5, rel=0.1)
    assert len(set(round(v, 4) for v in std.values())) == 3


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_activations(activation):
    model = create_model("cnn-s", image_size=8, activation=activation, seed=0)
    assert isinstance(model.act, ACTIVATIONS[activation])
    assert torch.isfinite(model(torch.randn(2, 1, 8, 8))).all()


def test_unknown_activation_init_and_bad_dropout():
    with pytest.raises(ValueError, match="activation"):
        create_model("mlp", activation="swishy")
    with pytest.raises(ValueError, match="init"):
        create_model("mlp", init="orthogonal-ish")
    with pytest.raises(ValueError, match="dropout"):
        create_model("mlp", dropout=1.0)
    with pytest.raises(ValueError, match="too small"):
        create_model("cnn-s", image_size=2)


def test_seeded_dropout():
    drop = SeededDropout(0.3)
    assert isinstance(drop, nn.Dropout)
    x = torch.ones(4, 50)
    drop.generator = torch.Generator().manual_seed(0)
    out = drop(x)
    expected = dropout_mask((4, 50), 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(out, expected)
    values = out.unique()
    assert len(values) == 2 and float(values[0]) == 0.0 and float(values[1]) == pytest.approx(1 / 0.7)
    drop.eval()
    assert torch.equal(drop(x), x)
    # no generator: plain nn.Dropout behaviour, and nothing new in the state_dict
    drop.train()
    drop.generator = None
    assert drop(x).shape == x.shape
    assert create_model("mlp", dropout=0.3).state_dict().keys() == create_model("mlp").state_dict().keys()
