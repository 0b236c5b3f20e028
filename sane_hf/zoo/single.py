"""One model at a time: evaluation, the plain per-model training loop, and fine-tuning.

:func:`evaluate_model` (accuracy and cross-entropy on a split), :func:`train_single` (the reference
loop the stacked path is tested against, and the path for architectures without one, e.g. ResNets
with BatchNorm) and :func:`fine_tune` (the recipe the sampling evaluation fine-tunes every model
with). Population training over many models is :mod:`sane_hf.zoo.train`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sane_hf.zoo.architectures import SeededDropout, create_model
from sane_hf.zoo.hyperparams import (
    ADAM_BETAS,
    ADAM_EPS,
    DEFAULT_TRAIN_EVAL_SAMPLES,
    OPTIMIZERS,
    SGD_MOMENTUM,
    CheckpointMetrics,
    CheckpointRecord,
    HyperParams,
    model_generators,
)
from sane_hf.zoo.tasks import TaskData

__all__ = ["evaluate_model", "train_single", "fine_tune", "native_cpu_kernels"]


def _model_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def _evaluate(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    device = _model_device(module)
    correct, loss = 0, 0.0
    for start in range(0, len(y), batch_size):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        logits = module(xb)
        loss += float(F.cross_entropy(logits.float(), yb, reduction="sum"))
        correct += int((logits.argmax(-1) == yb).sum())
    n = max(len(y), 1)
    return correct / n, loss / n


def evaluate_model(module: nn.Module, task: TaskData, split: str = "test", batch_size: int = 1000) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``module`` on ``task``'s ``split``, in eval mode.

    The module's train/eval mode is restored afterwards.
    """
    x, y = task.split(split)
    was_training = module.training
    module.eval()
    try:
        return _evaluate(module, x, y, batch_size)
    finally:
        module.train(was_training)


def _checkpoint_metrics(module: nn.Module, task: TaskData, train_eval_samples: int | None, batch_size: int) -> CheckpointMetrics:
    module.eval()
    n = len(task.y_train) if train_eval_samples is None else min(train_eval_samples, len(task.y_train))
    train_acc, train_loss = _evaluate(module, task.x_train[:n], task.y_train[:n], batch_size)
    val_acc, _ = _evaluate(module, task.x_val, task.y_val, batch_size)
    test_acc, test_loss = _evaluate(module, task.x_test, task.y_test, batch_size)
    return CheckpointMetrics(train_acc, val_acc, test_acc, train_loss, test_loss)


def _cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in module.state_dict().items():
        value = value.detach().to("cpu")
        out[key] = (value.float() if value.is_floating_point() else value).clone().contiguous()
    return out


def _make_optimizer(params: Iterable[torch.Tensor], optimizer: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {list(OPTIMIZERS)}")


def _set_dropout_generator(module: nn.Module, generator: torch.Generator | None) -> None:
    for m in module.modules():
        if isinstance(m, SeededDropout):
            m.generator = generator


def _checkpoint_epochs(epochs: int, checkpoint_epochs: Iterable[int] | None) -> list[int]:
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if checkpoint_epochs is None:
        return list(range(epochs + 1))
    ckpts = sorted({int(e) for e in checkpoint_epochs})
    bad = [e for e in ckpts if not 0 <= e <= epochs]
    if bad:
        raise ValueError(f"checkpoint_epochs {bad} are outside 0..{epochs}")
    return ckpts


def _build(arch: str, task: TaskData, hp: HyperParams, arch_kwargs: dict | None) -> nn.Module:
    return create_model(
        arch, in_channels=task.in_channels, image_size=task.image_size, num_classes=task.num_classes,
        activation=hp.activation, dropout=hp.dropout, init=hp.init, seed=hp.seed, **(arch_kwargs or {}),
    )


def train_single(
    arch: str,
    task: TaskData,
    hparams: HyperParams,
    *,
    epochs: int,
    checkpoint_epochs: Iterable[int] | None = None,
    arch_kwargs: dict | None = None,
    model_id: int = 0,
    train_eval_samples: int | None = DEFAULT_TRAIN_EVAL_SAMPLES,
    eval_batch_size: int = 1000,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[int], object] | None = None,
) -> Iterator[CheckpointRecord]:
    """Train one model with a plain loop (``nn.Module`` + ``torch.optim``) and yield its checkpoints.

    The reference the batched path is tested against, and the path for architectures without a
    batched implementation (ResNets with BatchNorm: buffers are in the checkpoints). Epoch 0 is
    the initialisation; records come in ascending epoch. ``on_epoch(1)`` is called after every
    epoch (progress). Initialisation, data order and dropout masks use their own generators
    (:func:`model_generators`); torch's global RNG is not used by the zoo architectures.
    """
    ckpts = set(_checkpoint_epochs(epochs, checkpoint_epochs))
    data_gen, dropout_gen = model_generators(hparams.seed)
    model = _build(arch, task, hparams, arch_kwargs).to(device)
    _set_dropout_generator(model, dropout_gen)
    opt = _make_optimizer(model.parameters(), hparams.optimizer, hparams.lr, hparams.weight_decay)
    x, y = task.x_train.to(device), task.y_train.to(device)
    n, bs = len(y), hparams.batch_size

    def record(epoch: int) -> CheckpointRecord:
        metrics = _checkpoint_metrics(model, task, train_eval_samples, eval_batch_size)
        return CheckpointRecord(model_id, epoch, hparams, metrics, _cpu_state_dict(model))

    if 0 in ckpts:
        yield record(0)
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=data_gen).to(device)
        for start in range(0, n, bs):
            idx = perm[start:start + bs]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(1)
        if epoch in ckpts:
            yield record(epoch)


@contextlib.contextmanager
def native_cpu_kernels(device: torch.device) -> Iterator[None]:
    """oneDNN (mkldnn) off while training on the CPU; restored afterwards.

    With torch 2.13's CPU wheel, backward through the small convolutions of a width-4 ResNet-18
    (BatchNorm, 8×8 inputs, batch 32) corrupted the heap and killed the process ("corrupted
    double-linked list"; 5 of 5 runs here, 0 of 3 with oneDNN off). Fine-tuning therefore runs on
    torch's native CPU kernels; other devices are untouched.
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def fine_tune(
    module: nn.Module,
    task: TaskData,
    *,
    epochs: int,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    batch_size: int = 32,
    seed: int = 0,
    eval_split: str = "test",
) -> list[float]:
    """Train ``module`` in place on ``task``'s train split; return the ``eval_split`` accuracy after each epoch.

    ``result[i]`` is the accuracy after epoch ``i + 1`` (use :func:`evaluate_model` for epoch 0).
    The module trains in train mode (BatchNorm statistics update) and is evaluated in eval mode.
    Data order and dropout are seeded by ``seed``; torch's global RNG is left untouched.
    """
    device = _model_device(module)
    data_gen, dropout_gen = model_generators(seed)
    accs: list[float] = []
    with torch.random.fork_rng(devices=[]), native_cpu_kernels(device):
        torch.manual_seed(seed)
        _set_dropout_generator(module, dropout_gen)
        opt = _make_optimizer(module.parameters(), optimizer, lr, weight_decay)
        x, y = task.x_train.to(device), task.y_train.to(device)
        try:
            for _ in range(epochs):
                module.train()
                perm = torch.randperm(len(y), generator=data_gen).to(device)
                for start in range(0, len(y), batch_size):
                    idx = perm[start:start + batch_size]
                    loss = F.cross_entropy(module(x[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                accs.append(evaluate_model(module, task, eval_split)[0])
        finally:
            _set_dropout_generator(module, None)
            module.eval()
    return accs
