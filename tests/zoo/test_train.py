"""Population training: batched == per-model, records, grid, evaluation, fine-tuning, sharding."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sane_hf.zoo.architectures import create_model
from sane_hf.zoo.tasks import load_task
from sane_hf.zoo.train import (
    CheckpointMetrics,
    HyperParams,
    evaluate_model,
    fine_tune,
    sample_grid,
    shard_for_process,
    shutdown_workers,
    supports_batched_training,
    train_population,
    train_single,
)


@pytest.fixture(scope="module")
def task():
    return load_task("digits", train_subset=160, eval_subset=120)


# every optimizer, several activations, dropout on most models, weight decay on some
MIXED = [
    HyperParams(seed=11, lr=3e-3, weight_decay=1e-3, optimizer="adam", activation="relu", dropout=0.3, init="kaiming-normal"),
    HyperParams(seed=12, lr=2e-2, weight_decay=0.0, optimizer="sgd", activation="tanh", dropout=0.1, init="xavier"),
    HyperParams(seed=13, lr=1e-3, weight_decay=1e-4, optimizer="adam", activation="gelu", dropout=0.0, init="uniform"),
    HyperParams(seed=14, lr=5e-3, weight_decay=1e-4, optimizer="sgd", activation="relu", dropout=0.3),
]


def by_key(records):
    return {(r.model_id, r.epoch): r for r in records}


@pytest.mark.parametrize("arch", ["mlp", "cnn-s"])
def test_batched_equals_single_model_training(task, arch):
    assert supports_batched_training(arch, task=task)
    batched = by_key(train_population(arch, task, MIXED, epochs=2, progress=False, batched=True))
    for model_id, hp in enumerate(MIXED):
        for rec in train_single(arch, task, hp, epochs=2, model_id=model_id):
            other = batched[(model_id, rec.epoch)]
            assert other.state_dict.keys() == rec.state_dict.keys()
            for key, value in rec.state_dict.items():
                torch.testing.assert_close(other.state_dict[key], value, rtol=1e-4, atol=1e-5, msg=key)
            for name, value in dataclasses.asdict(rec.metrics).items():
                assert getattr(other.metrics, name) == pytest.approx(value, abs=1e-4), name
    # dropout mattered: the same model without dropout ends elsewhere
    no_drop = dataclasses.replace(MIXED[0], dropout=0.0)
    plain = list(train_single(arch, task, no_drop, epochs=1, checkpoint_epochs=[1]))[0]
    assert not torch.allclose(plain.state_dict["fc1.weight"], batched[(0, 1)].state_dict["fc1.weight"])


def test_records_cover_every_model_and_epoch(task):
    grid = sample_grid(3, seed=5)
    records = list(train_population("cnn-s", task, grid, model_ids=[10, 20, 30], epochs=2, progress=False))
    assert sorted((r.model_id, r.epoch) for r in records) == [(m, e) for m in (10, 20, 30) for e in range(3)]
    keys = list(create_model("cnn-s", image_size=8).state_dict())
    for rec in records:
        m = rec.metrics
        values = [m.train_acc, m.val_acc, m.test_acc, m.train_loss, m.test_loss]
        assert all(math.isfinite(v) for v in values)
        assert 0.0 <= m.train_acc <= 1.0 and 0.0 <= m.test_acc <= 1.0 and m.train_loss > 0
        assert m.ggap == pytest.approx(m.train_acc - m.test_acc)
        assert m.to_dict()["ggap"] == m.ggap
        assert list(rec.state_dict) == keys
        assert all(v.dtype == torch.float32 and v.is_contiguous() and v.device.type == "cpu" for v in rec.state_dict.values())
        assert rec.hparams == grid[[10, 20, 30].index(rec.model_id)]
    # each model's checkpoints come in ascending epoch
    for model_id in (10, 20, 30):
        assert [r.epoch for r in records if r.model_id == model_id] == [0, 1, 2]
    # epoch 0 is the initialisation
    init = create_model("cnn-s", image_size=8, activation=grid[0].activation, init=grid[0].init, seed=grid[0].seed)
    first = next(r for r in records if r.model_id == 10 and r.epoch == 0)
    assert torch.equal(first.state_dict["conv1.weight"], init.conv1.weight.detach())


def test_checkpoint_epochs(task):
    records = list(train_population("mlp", task, sample_grid(2, seed=1), epochs=3, checkpoint_epochs=[3, 1], progress=False))
    assert sorted({r.epoch for r in records}) == [1, 3]
    with pytest.raises(ValueError, match="outside"):
        list(train_population("mlp", task, sample_grid(1), epochs=2, checkpoint_epochs=[5], progress=False))


def test_training_beats_chance():
    digits = load_task("digits")
    hp = HyperParams(seed=0, lr=3e-3, optimizer="adam", activation="relu")
    last = list(train_population("mlp", digits, [hp], epochs=3, checkpoint_epochs=[0, 3], progress=False))
    assert last[0].metrics.test_acc < 0.35  # the init is near chance
    assert last[1].metrics.test_acc > 0.8 and last[1].metrics.train_acc > 0.8


def test_sample_grid_is_reproducible_and_covers_options():
    grid = sample_grid(64, seed=3)
    assert grid == sample_grid(64, seed=3) and grid != sample_grid(64, seed=4)
    assert len({hp.seed for hp in grid}) == 64
    assert all(1e-4 <= hp.lr <= 1e-2 for hp in grid)
    assert {hp.optimizer for hp in grid} == {"adam", "sgd"}
    assert {hp.activation for hp in grid} == {"relu", "tanh", "gelu", "sigmoid"}
    assert {hp.init for hp in grid} == {"kaiming-uniform", "kaiming-normal", "xavier", "uniform"}
    assert {hp.dropout for hp in grid} == {0.0, 0.1, 0.2}
    assert {hp.weight_decay for hp in grid} == {0.0, 1e-4, 1e-3}
    narrow = sample_grid(8, seed=0, optimizers=["sgd"], lr_range=(0.1, 0.1), batch_sizes=[16])
    assert all(hp.optimizer == "sgd" and hp.lr == pytest.approx(0.1) and hp.batch_size == 16 for hp in narrow)
    assert sample_grid(0) == []


def test_hyperparams_validation():
    with pytest.raises(ValueError, match="optimizer"):
        HyperParams(optimizer="lbfgs")
    with pytest.raises(ValueError, match="activation"):
        HyperParams(activation="swish9")
    with pytest.raises(ValueError, match="init"):
        HyperParams(init="zeros")
    with pytest.raises(ValueError, match="dropout"):
        HyperParams(dropout=1.5)
    assert HyperParams().to_dict()["optimizer"] == "adam"
    assert CheckpointMetrics(0.9, 0.8, 0.7, 0.1, 0.2).ggap == pytest.approx(0.2)


def test_mixed_batch_sizes_make_separate_groups(task):
    grid = [dataclasses.replace(hp, batch_size=bs) for hp, bs in zip(sample_grid(3, seed=2), (16, 32, 16))]
    batched = by_key(train_population("mlp", task, grid, epochs=1, checkpoint_epochs=[1], progress=False))
    single = list(train_single("mlp", task, grid[1], epochs=1, checkpoint_epochs=[1], model_id=1))[0]
    torch.testing.assert_close(batched[(1, 1)].state_dict["fc1.weight"], single.state_dict["fc1.weight"], rtol=1e-4, atol=1e-5)


def test_resnet_trains_per_model_with_bn_buffers():
    tiny = load_task("digits", train_subset=64, eval_subset=32)
    assert not supports_batched_training("resnet18", {"width": 4}, tiny)
    with pytest.raises(ValueError, match="batched"):
        list(train_population("resnet18", tiny, sample_grid(1), epochs=1, arch_kwargs={"width": 4}, batched=True, progress=False))
    grid = [HyperParams(seed=1, lr=1e-2), HyperParams(seed=2, lr=1e-3, optimizer="sgd")]
    records = list(train_population("resnet18", tiny, grid, epochs=1, arch_kwargs={"width": 4}, progress=False))
    assert len(records) == 4
    last = [r for r in records if r.epoch == 1][0]
    assert last.state_dict["bn1.num_batches_tracked"].dtype == torch.int64
    assert int(last.state_dict["bn1.num_batches_tracked"]) == 2  # 64 images, batch 32
    first = [r for r in records if r.epoch == 0][0]
    assert not torch.equal(first.state_dict["bn1.running_mean"], last.state_dict["bn1.running_mean"])


def test_evaluate_and_fine_tune():
    digits = load_task("digits")
    model = create_model("mlp", seed=0)
    acc0, loss0 = evaluate_model(model, digits, "test")
    assert 0.0 <= acc0 < 0.35 and loss0 > 1.5 and model.training  # mode restored
    accs = fine_tune(model, digits, epochs=2, lr=3e-3, seed=0)
    assert len(accs) == 2 and accs[-1] > 0.7
    assert evaluate_model(model, digits, "test")[0] == pytest.approx(accs[-1])
    # seeded: the same fine-tune from the same start gives the same result
    again = create_model("mlp", seed=0)
    assert fine_tune(again, digits, epochs=2, lr=3e-3, seed=0) == accs
    # BatchNorm models fine-tune in train mode: running stats move
    resnet = create_model("resnet18", in_channels=1, image_size=8, width=4, seed=0)
    before = resnet.bn1.running_mean.clone()
    small = load_task("digits", train_subset=64, eval_subset=32)
    fine_tune(resnet, small, epochs=1, optimizer="sgd", lr=1e-2)
    assert not torch.equal(before, resnet.bn1.running_mean) and not resnet.training


def test_shard_for_process():
    items = list(range(10))
    shards = [shard_for_process(items, i, 3) for i in range(3)]
    assert shards == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert shard_for_process(items) == items  # one process (accelerate PartialState)
    assert shard_for_process([], 0, 2) == []
    with pytest.raises(ValueError):
        shard_for_process(items, 3, 3)


def test_worker_processes_give_the_same_records(task):
    grid = sample_grid(4, seed=9)
    local = by_key(train_population("cnn-s", task, grid, epochs=1, progress=False))
    try:
        remote = list(train_population("cnn-s", task, grid, epochs=1, progress=False, num_workers=2))
    finally:
        shutdown_workers()
    assert len(remote) == len(local) == 8
    for rec in remote:
        ref = local[(rec.model_id, rec.epoch)]
        for key, value in ref.state_dict.items():
            torch.testing.assert_close(rec.state_dict[key], value, rtol=1e-5, atol=1e-6)
        assert rec.metrics.test_acc == pytest.approx(ref.metrics.test_acc, abs=1e-6)
