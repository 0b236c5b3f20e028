"""Permutation specs derived from module graphs, function-preserving permutations, weight matching."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from sane_hf.alignment import (
    PermutationAxis,
    PermutationGroup,
    PermutationSpec,
    UnsupportedOperationError,
    align_to,
    apply_permutation,
    invert_permutations,
    permutation_spec,
    random_permutation,
    random_permutations,
    state_dict_distance,
)
from sane_hf.zoo.architectures import create_model, permutation_spec_for_arch


@dataclass(frozen=True)
class ArchCase:
    id: str
    arch: str
    kwargs: dict
    groups: dict[str, int]  # expected group name -> size, in order
    flatten: tuple[str, int] | None = None  # (linear weight key, block) fed by the conv flatten
    fixed_bias: str = ""  # bias of the output layer: never permuted
    extra: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        c = self.kwargs.get("in_channels", 1)
        s = self.kwargs.get("image_size", 8)
        return (5, c, s, s)


def _resnet_groups(width: int) -> dict[str, int]:
    # 4 residual streams (stem + each stage's conv2/downsample/next blocks) + 8 block-internal groups
    groups = {"conv1": width, "layer1.0.conv1": width, "layer1.1.conv1": width}
    for stage, w in ((2, 2 * width), (3, 4 * width), (4, 8 * width)):
        groups |= {f"layer{stage}.0.conv1": w, f"layer{stage}.0.conv2": w, f"layer{stage}.1.conv1": w}
    return groups


CASES = [
    ArchCase("mlp", "mlp", {}, {"fc1": 32, "fc2": 16}, None, "fc3.bias"),
    ArchCase("cnn-s-8", "cnn-s", {"image_size": 8},
             {"conv1": 8, "conv2": 6, "conv3": 4, "fc1": 20}, ("fc1.weight", 2 * 2), "fc2.bias"),
    ArchCase("cnn-s-28", "cnn-s", {"image_size": 28},
             {"conv1": 8, "conv2": 6, "conv3": 4, "fc1": 20}, ("fc1.weight", 3 * 3), "fc2.bias"),
    ArchCase("cnn-m-28", "cnn-m", {"image_size": 28},
             {"conv1": 16, "conv2": 32, "conv3": 15, "fc1": 20}, ("fc1.weight", 3 * 3), "fc2.bias"),
    ArchCase("resnet18", "resnet18", {"in_channels": 3, "image_size": 16, "width": 8},
             _resnet_groups(8), None, "fc.bias"),
]  # fmt: skip
CASE_IDS = [c.id for c in CASES]


def _build(case: ArchCase, seed: int = 0) -> nn.Module:
    model = create_model(case.arch, seed=seed, **case.kwargs)
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        # non-trivial running stats and affine parameters, so BN's channel ties matter
        torch.manual_seed(seed)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
            model.train()
            for _ in range(2):
                model(torch.randn(*case.input_shape))
    return model.eval()


def _outputs(model: nn.Module, sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    model.load_state_dict(sd)
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def specs() -> dict[str, PermutationSpec]:
    return {c.id: permutation_spec_for_arch(c.arch, **c.kwargs) for c in CASES}


# ------------------------------------------------------------------------------------------
# derived specs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_spec_has_expected_groups(case: ArchCase, specs):
    spec = specs[case.id]
    assert {g.name: g.size for g in spec.groups} == case.groups
    assert case.fixed_bias in spec.invariant_keys
    assert all(k in spec.invariant_keys for k, _ in spec.shapes if k.endswith("num_batches_tracked"))
    model = _build(case)
    spec.validate(model.state_dict())
    if case.flatten is not None:
        key, block = case.flatten
        [axis] = [a for g in spec.groups for a in g.axes if a.key == key and a.axis == 1]
        assert axis.block == block
    # the guessed example input gives the same spec as the explicit one
    assert permutation_spec(model) == spec


def test_resnet18_residual_streams_are_shared(specs):
    spec = specs["resnet18"]
    members = {name: {(a.key, a.axis) for a in spec.group(name).axes} for name in spec.group_names}
    # stage 1: the stem and both blocks' conv2/bn2 outputs are one stream (no downsample)
    assert {("conv1.weight", 0), ("bn1.running_var", 0), ("layer1.0.conv2.weight", 0),
            ("layer1.1.bn2.weight", 0), ("layer1.0.conv1.weight", 1), ("layer2.0.downsample.0.weight", 1)} <= members["conv1"]  # fmt: skip
    # stages 2-4: the first block's conv2 output is tied to its downsample branch and the second block
    for stage in (2, 3, 4):
        stream = members[f"layer{stage}.0.conv2"]
        assert {(f"layer{stage}.0.downsample.0.weight", 0), (f"layer{stage}.0.downsample.1.running_mean", 0),
                (f"layer{stage}.1.conv2.weight", 0), (f"layer{stage}.1.conv1.weight", 1)} <= stream  # fmt: skip
    assert ("fc.weight", 1) in members["layer4.0.conv2"]
    # block-internal groups: conv1 out + bn1 + conv2 in
    assert members["layer3.1.conv1"] == {
        ("layer3.1.conv1.weight", 0), ("layer3.1.bn1.weight", 0), ("layer3.1.bn1.bias", 0),
        ("layer3.1.bn1.running_mean", 0), ("layer3.1.bn1.running_var", 0), ("layer3.1.conv2.weight", 1),
    }  # fmt: skip
    assert len(spec.groups) == 4 + 8


def test_spec_leaves_module_untouched(cnn_bn):
    cnn_bn.train()
    before = {k: v.clone() for k, v in cnn_bn.state_dict().items()}
    permutation_spec(cnn_bn, torch.randn(4, 1, 8, 8))
    assert cnn_bn.training
    assert all(torch.equal(before[k], v) for k, v in cnn_bn.state_dict().items())


@pytest.mark.parametrize("case", CASES[:2] + CASES[-1:], ids=[c.id for c in CASES[:2] + CASES[-1:]])
def test_spec_json_round_trip(case: ArchCase, specs):
    spec = specs[case.id]
    restored = PermutationSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert restored == spec
    assert hash(restored) == hash(spec)


def test_spec_rejects_inconsistent_groups():
    axis = PermutationAxis("w", 0)
    with pytest.raises(ValueError, match="is in groups"):
        PermutationSpec(groups=(PermutationGroup("a", 3, (axis,)), PermutationGroup("b", 3, (axis,))))
    with pytest.raises(ValueError, match="does not fit"):
        PermutationSpec(groups=(PermutationGroup("a", 3, (axis,)),), shapes=(("w", (4, 2)),))


# ------------------------------------------------------------------------------------------
# random permutations preserve the function
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_random_permutation_preserves_function(case: ArchCase, specs):
    spec = specs[case.id]
    model = _build(case)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(*case.input_shape, generator=torch.Generator().manual_seed(1))
    y = _outputs(model, sd, x)

    perms = random_permutations(spec, torch.Generator().manual_seed(2))
    permuted = apply_permutation(sd, spec, perms)
    assert list(permuted) == list(sd)
    torch.testing.assert_close(_outputs(model, permuted, x), y, atol=1e-5, rtol=1e-5)
    for g in spec.groups:  # every group's tensors actually moved
        assert any(not torch.equal(permuted[k], sd[k]) for k in g.keys), g.name
    for key in spec.invariant_keys:
        assert permuted[key] is sd[key]
    # inverse undoes it exactly; the one-call form agrees with the two-step form
    restored = apply_permutation(permuted, spec, invert_permutations(perms))
    assert all(torch.equal(restored[k], sd[k]) for k in sd)
    again = random_permutation(sd, spec, torch.Generator().manual_seed(2))
    assert all(torch.equal(again[k], permuted[k]) for k in sd)


def test_apply_permutation_checks_sizes(specs):
    spec = specs["mlp"]
    sd = create_model("mlp", seed=0).state_dict()
    with pytest.raises(ValueError, match="expected"):
        apply_permutation(sd, spec, {"fc1": torch.arange(5)})
    with pytest.raises(KeyError):
        apply_permutation(sd, spec, {"nope": torch.arange(5)})


# ------------------------------------------------------------------------------------------
# weight matching
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_align_recovers_permuted_copy(case: ArchCase, specs):
    spec = specs[case.id]
    reference = _build(case).state_dict()
    permuted = random_permutation(reference, spec, torch.Generator().manual_seed(3))
    assert state_dict_distance(permuted, reference) > 1.0
    aligned, perms = align_to(permuted, reference, spec)
    assert state_dict_distance(aligned, reference) < 1e-6
    assert set(perms) == set(spec.group_names)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_align_reduces_distance_and_keeps_function(case: ArchCase, specs):
    spec = specs[case.id]
    reference = _build(case, seed=0).state_dict()
    model = _build(case, seed=1)
    sd = model.state_dict()
    aligned, perms = align_to(sd, reference, spec)
    assert state_dict_distance(aligned, reference) < state_dict_distance(sd, reference)
    assert all(
        torch.equal(a, b) for a, b in zip(aligned.values(), apply_permutation(sd, spec, perms).values())
    )
    x = torch.randn(*case.input_shape, generator=torch.Generator().manual_seed(4))
    y = _outputs(model, sd, x)
    torch.testing.assert_close(_outputs(model, aligned, x), y, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# graphs beyond the zoo: functional idioms, weight sharing, unsupported ops
# ------------------------------------------------------------------------------------------


class FunctionalIdioms(nn.Module):
    """view(size(0), -1) flatten, F.relu, scalar arithmetic, spatial mean, LayerNorm, BN1d, PReLU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 4 * 4, 7)
        self.norm = nn.LayerNorm(7)
        self.bn = nn.BatchNorm1d(7)
        self.prelu = nn.PReLU(7)
        self.head = nn.Linear(7, 3)
        self.gate = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.nn.functional.relu(self.conv(x)) * 0.5  # (B, 5, 4, 4)
        h = h + torch.tanh(self.conv2(h))  # residual
        pooled = h.mean(dim=(2, 3))  # (B, 5)
        z = self.prelu(self.bn(self.norm(self.fc(h.view(h.size(0), -1)))))  # (B, 7)
        return self.head(z) + self.gate(pooled)


class SharedLinear(nn.Module):
    """The same hidden Linear applied twice: its in- and out-groups must be one."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.relu(self.shared(torch.relu(self.shared(torch.relu(self.inp(x)))))))


class WithCat(nn.Module):
    """A channel concat: unsupported; the groups touching it must be fixed in non-strict mode."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 3, 3, padding=1)
        self.b = nn.Conv2d(1, 4, 3, padding=1)
        self.c = nn.Conv2d(7, 5, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.relu(torch.cat([self.a(x), self.b(x)], dim=1))
        return self.fc(torch.relu(self.c(h)).mean((2, 3)))


def _check_function_preserved(model: nn.Module, spec: PermutationSpec, x: torch.Tensor) -> None:
    model.eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    y = _outputs(model, sd, x)
    permuted = random_permutation(sd, spec, torch.Generator().manual_seed(5))
    torch.testing.assert_close(_outputs(model, permuted, x), y, atol=1e-5, rtol=1e-5)


def test_functional_idioms():
    torch.manual_seed(0)
    model = FunctionalIdioms()
    x = torch.randn(3, 2, 4, 4)
    spec = permutation_spec(model, x)
    sizes = {g.name: g.size for g in spec.groups}
    assert sizes == {"conv": 5, "fc": 7}  # conv and conv2 are tied by the residual add
    fc = spec.group("fc")
    assert {(a.key, a.axis) for a in fc.axes} >= {
        ("norm.weight", 0),
        ("bn.running_var", 0),
        ("prelu.weight", 0),
    }
    [flat] = [a for a in spec.group("conv").axes if a.key == "fc.weight"]
    assert flat.block == 16
    _check_function_preserved(model, spec, x)


def test_tiny_cnn_bn_spatial_mean(cnn_bn):
    spec = permutation_spec(cnn_bn, torch.randn(2, 1, 8, 8))
    assert {g.name: g.size for g in spec.groups} == {"conv1": 4, "conv2": 6}
    _check_function_preserved(cnn_bn, spec, torch.randn(3, 1, 8, 8))


def test_weight_sharing_unifies_groups():
    torch.manual_seed(0)
    model = SharedLinear()
    spec = permutation_spec(model, torch.randn(2, 4))
    assert [g.name for g in spec.groups] == ["inp"]
    assert {(a.key, a.axis) for a in spec.groups[0].axes} == {
        ("inp.weight", 0), ("inp.bias", 0), ("shared.weight", 1), ("shared.weight", 0), ("shared.bias", 0),
        ("out.weight", 1),
    }  # fmt: skip
    _check_function_preserved(model, spec, torch.randn(3, 4))
    sd = model.state_dict()
    aligned, _ = align_to(random_permutation(sd, spec, torch.Generator().manual_seed(0)), sd, spec)
    assert state_dict_distance(aligned, sd) < 1e-6


def test_unsupported_op_strict_and_conservative():
    torch.manual_seed(0)
    model = WithCat()
    x = torch.randn(2, 1, 6, 6)
    with pytest.raises(UnsupportedOperationError, match="cat"):
        permutation_spec(model, x)
    spec = permutation_spec(model, x, strict=False)
    assert [g.name for g in spec.groups] == ["c"]  # a, b feed the concat: fixed
    assert {"a.weight", "a.bias", "b.weight", "b.bias", "fc.bias"} <= set(spec.invariant_keys)
    _check_function_preserved(model, spec, x)


def test_untraceable_module_gives_clear_error():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(UnsupportedOperationError, match="symbolic_trace"):
        permutation_spec(DataDependent(), torch.randn(2, 3))
