"""Population training: many small models with varied hyperparameters, trained at once.

The unit of work is a *group*: models of one architecture and batch size. For ``mlp``, ``cnn-s``
and ``cnn-m`` a group trains as one stacked model — parameters stacked along a model axis,
linear layers as ``bmm``, convolutions as one grouped convolution (``groups=M``) in channels-last
layout, and one hand-written Adam/SGD update over the stacked parameters with per-model learning
rate, weight decay and optimizer. Other architectures (``resnet18``, anything registered later)
train with the plain per-model loop :func:`train_single`. Groups are spread over worker processes
(``num_workers``, spawn, one torch thread each on a 2-core machine); several machines split the
population with :func:`shard_for_process` under ``accelerate launch``.

Every model is reproducible from its :class:`HyperParams` alone, whichever path trains it: the
initialisation comes from ``create_model(..., seed=hp.seed)``, the data order and the dropout masks
from two generators derived from ``hp.seed`` (see :func:`model_generators`). A model trained in a
group equals the same model trained alone by :func:`train_single` to float round-off, dropout
included (tested).

>>> from sane_hf.zoo.tasks import load_task
>>> task = load_task("digits")
>>> grid = sample_grid(4, seed=0)
>>> records = list(train_population("cnn-s", task, grid, epochs=2, progress=False))
>>> len(records), records[0].epoch
(12, 0)
"""

from __future__ import annotations

import atexit
import json
import math
import multiprocessing as mp
import os
import queue as queue_module
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from sane_hf.state_dict_io import safetensors_metadata
from sane_hf.zoo.architectures import (
    ACTIVATIONS,
    INITS,
    MLP,
    SeededDropout,
    SmallCNN,
    create_model,
)
from sane_hf.zoo.tasks import TaskData, load_task

__all__ = [
    "OPTIMIZERS",
    "HyperParams",
    "CheckpointMetrics",
    "CheckpointRecord",
    "sample_grid",
    "model_generators",
    "train_single",
    "train_population",
    "supports_batched_training",
    "shard_for_process",
    "shutdown_workers",
    "evaluate_model",
    "fine_tune",
]

OPTIMIZERS = ("adam", "sgd")
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam defaults
ADAM_EPS = 1e-8
SGD_MOMENTUM = 0.9
DEFAULT_TRAIN_EVAL_SAMPLES = 10_000  # train_acc/train_loss on at most this many (fixed) train images


# --------------------------------------------------------------------------------------------
# hyperparameters and records


@dataclass(frozen=True)
class HyperParams:
    """One model's training recipe; with the architecture and task it fixes the model exactly."""

    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    activation: str = "relu"
    init: str = "kaiming-uniform"
    dropout: float = 0.0
    batch_size: int = 32

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {list(OPTIMIZERS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose one of {list(INITS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CheckpointMetrics:
    """Measured properties of one checkpoint (accuracies in [0, 1], mean cross-entropy losses)."""

    train_acc: float
    val_acc: float
    test_acc: float
    train_loss: float
    test_loss: float

    @property
    def ggap(self) -> float:
        """Generalisation gap ``train_acc - test_acc``."""
        return self.train_acc - self.test_acc

    def to_dict(self) -> dict:
        return {**asdict(self), "ggap": self.ggap}


@dataclass
class CheckpointRecord:
    """One checkpoint: model ``model_id`` after ``epoch`` epochs (0 = the initialisation).

    ``state_dict`` holds contiguous CPU clones with the architecture's keys (float32 for
    parameters and float buffers; integer buffers such as ``num_batches_tracked`` keep int64).
    """

    model_id: int
    epoch: int
    hparams: HyperParams
    metrics: CheckpointMetrics
    state_dict: dict[str, torch.Tensor] = field(repr=False)


def sample_grid(
    num_models: int,
    seed: int = 0,
    *,
    lr_range: tuple[float, float] = (1e-4, 1e-2),
    weight_decays: Sequence[float] = (0.0, 1e-4, 1e-3),
    dropouts: Sequence[float] = (0.0, 0.1, 0.2),
    optimizers: Sequence[str] = OPTIMIZERS,
    activations: Sequence[str] = ("relu", "tanh", "gelu", "sigmoid"),
    inits: Sequence[str] = ("kaiming-uniform", "kaiming-normal", "xavier", "uniform"),
    batch_sizes: Sequence[int] = (16,),
) -> list[HyperParams]:
    """Draw ``num_models`` recipes: lr log-uniform in ``lr_range``, the rest uniformly from the lists.

    The grid is wide on purpose (sigmoid + SGD at lr 1e-4 stays near chance, ReLU + Adam at 1e-3
    trains well) so that the zoo's accuracies spread. Model seeds are distinct. The same
    arguments always give the same list.

    Defaults measured on digits ``cnn-s`` (48 models, 10 epochs, see the zoo tests):
    batch 32 and dropout up to 0.3 left ~2/3 of the zoo below 50 % test accuracy (quartiles
    0.08 / 0.24 / 0.65); batch 16 and dropout ≤ 0.2 give quartiles 0.08 / 0.47 / 0.78, max 0.96 —
    still from chance to near-best, with fewer dead models.
    """
    if num_models < 0:
        raise ValueError(f"num_models must be >= 0, got {num_models}")
    lo, hi = lr_range
    if not 0 < lo <= hi:
        raise ValueError(f"lr_range must satisfy 0 < low <= high, got {lr_range}")
    rng = np.random.default_rng(seed)
    seeds = rng.choice(2**31 - 1, size=num_models, replace=False)
    lrs = np.exp(rng.uniform(math.log(lo), math.log(hi), size=num_models))

    def pick(options: Sequence) -> list:
        options = list(options)
        if not options:
            raise ValueError("every option list needs at least one value")
        return [options[i] for i in rng.integers(0, len(options), size=num_models)]

    wds, drops, opts, acts, ins, bss = (
        pick(weight_decays), pick(dropouts), pick(optimizers), pick(activations), pick(inits), pick(batch_sizes)
    )
    return [
        HyperParams(
            seed=int(seeds[i]), lr=float(lrs[i]), weight_decay=float(wds[i]), optimizer=str(opts[i]),
            activation=str(acts[i]), init=str(ins[i]), dropout=float(drops[i]), batch_size=int(bss[i]),
        )
        for i in range(num_models)
    ]


def model_generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """The model's ``(data_order, dropout)`` generators, derived from ``seed`` (init uses ``seed`` itself)."""
    data_seed, dropout_seed = np.random.SeedSequence([int(seed), 0x5A4E]).generate_state(2, np.uint64)
    return (
        torch.Generator().manual_seed(int(data_seed)),
        torch.Generator().manual_seed(int(dropout_seed)),
    )


# --------------------------------------------------------------------------------------------
# evaluation, the per-model loop, fine-tuning


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
    with torch.random.fork_rng(devices=[]):
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


# --------------------------------------------------------------------------------------------
# the batched path: one stacked model per group


def supports_batched_training(arch: str, arch_kwargs: dict | None = None, task: TaskData | None = None) -> bool:
    """Whether ``arch`` trains as a stacked group (``mlp`` and the ``cnn-*`` family) or per model."""
    image_size = task.image_size if task is not None else 8
    in_channels = task.in_channels if task is not None else 1
    try:
        model = create_model(arch, in_channels=in_channels, image_size=image_size, **(arch_kwargs or {}))
    except (TypeError, ValueError):
        return False
    return type(model) in (MLP, SmallCNN)


class _Stacked:
    """Parameters of M models as one flat leaf tensor, laid out parameter-major.

    Block ``i`` holds parameter ``i`` of all models as ``(M, *shape)``, so every view is free and
    one split gives all of them; the optimizer runs over the whole flat tensor at once.
    """

    def __init__(self, modules: Sequence[nn.Module], device: torch.device):
        ref = modules[0]
        self.names = [name for name, _ in ref.named_parameters()]
        self.keys = list(ref.state_dict().keys())
        if sorted(self.keys) != sorted(self.names):
            raise ValueError("the batched path supports modules whose state_dict holds parameters only")
        self.shapes = [p.shape for _, p in ref.named_parameters()]
        self.numels = [p.numel() for _, p in ref.named_parameters()]
        self.num_models = len(modules)
        blocks = []
        for name in self.names:
            blocks.append(torch.stack([dict(m.named_parameters())[name].detach() for m in modules]).reshape(-1))
        self.flat = torch.cat(blocks).to(device=device, dtype=torch.float32).requires_grad_(True)

    def views(self, detach: bool = False) -> dict[str, torch.Tensor]:
        flat = self.flat.detach() if detach else self.flat
        pieces = flat.split([self.num_models * n for n in self.numels])
        return {name: piece.view(self.num_models, *shape) for name, piece, shape in zip(self.names, pieces, self.shapes)}

    def per_element(self, per_model: torch.Tensor) -> torch.Tensor:
        """Expand a ``(M,)`` vector to the flat layout (one value per parameter element)."""
        return torch.cat([per_model.repeat_interleave(n) for n in self.numels])

    def state_dict(self, index: int) -> dict[str, torch.Tensor]:
        views = self.views(detach=True)
        return {key: views[key][index].to("cpu").clone().contiguous() for key in self.keys}


class _StackedOptimizer:
    """Adam (torch's L2 weight decay, no AMSGrad) and SGD with momentum 0.9, per model, one update.

    Every per-model setting is expanded to one value per parameter element, so one pass of ~12
    in-place elementwise ops updates all models, whatever their optimizer, lr and weight decay:
    ``buf = decay*buf + gain*g`` is Adam's first moment (decay b1, gain 1-b1) or SGD's momentum
    buffer (decay 0.9, gain 1); the step ``lr_t * buf / (a_t*sqrt(v) + c)`` is Adam's with
    ``a_t = 1/sqrt(bc2)``, ``c = eps`` and ``lr_t = lr/bc1``, and SGD's with ``a_t = 0``, ``c = 1``.
    """

    def __init__(self, stacked: _Stacked, hparams: Sequence[HyperParams]):
        device = stacked.flat.device

        def per_element(values) -> torch.Tensor:
            return stacked.per_element(torch.tensor(values, dtype=torch.float32)).to(device)

        b1, _ = ADAM_BETAS
        adam = [hp.optimizer == "adam" for hp in hparams]
        self.stacked = stacked
        self.any_adam = any(adam)
        self.wd = per_element([hp.weight_decay for hp in hparams]) if any(hp.weight_decay for hp in hparams) else None
        self.lr_adam = per_element([hp.lr if a else 0.0 for hp, a in zip(hparams, adam)])
        self.lr_sgd = per_element([0.0 if a else hp.lr for hp, a in zip(hparams, adam)])
        self.adam = per_element([float(a) for a in adam])
        self.decay = per_element([b1 if a else SGD_MOMENTUM for a in adam])
        self.gain = per_element([1.0 - b1 if a else 1.0 for a in adam])
        self.denom_offset = per_element([ADAM_EPS if a else 1.0 for a in adam])
        self.exp_avg = torch.zeros_like(stacked.flat)
        self.exp_avg_sq = torch.zeros_like(stacked.flat) if self.any_adam else None
        # scratch buffers: no allocation per step
        self.grad_buf, self.step_buf, self.denom_buf = (torch.empty_like(stacked.flat) for _ in range(3))
        self.step_count = 0

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        param, grad = self.stacked.flat, self.stacked.flat.grad
        if self.wd is not None:
            grad = torch.addcmul(grad, param, self.wd, out=self.grad_buf)  # L2: g + wd * p
        self.exp_avg.mul_(self.decay).addcmul_(grad, self.gain)
        if not self.any_adam:
            param.addcmul_(self.exp_avg, self.lr_sgd, value=-1.0)
            return
        b1, b2 = ADAM_BETAS
        self.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
        bc1 = 1.0 - b1**self.step_count
        bc2_sqrt = (1.0 - b2**self.step_count) ** 0.5
        step = torch.add(self.lr_sgd, self.lr_adam, alpha=1.0 / bc1, out=self.step_buf).mul_(self.exp_avg)
        denom = torch.sqrt(self.exp_avg_sq, out=self.denom_buf).mul_(self.adam).mul_(1.0 / bc2_sqrt)
        param.addcdiv_(step, denom.add_(self.denom_offset), value=-1.0)


def _activation_runs(hparams: Sequence[HyperParams]) -> list[tuple[int, int, nn.Module]]:
    """Contiguous runs ``(start, stop, activation)`` of models with equal activation (models are sorted)."""
    runs, start = [], 0
    for i in range(1, len(hparams) + 1):
        if i == len(hparams) or hparams[i].activation != hparams[start].activation:
            runs.append((start, i, ACTIVATIONS[hparams[start].activation]()))
            start = i
    return runs


class _BatchedGroup:
    """M models of one architecture trained as one: the forward passes of ``MLP`` and ``SmallCNN``
    rewritten over stacked parameters.

    Layouts: linear layers work on ``(M, B, F)``; convolutions on ``(B, M*C, H, W)`` in
    channels-last memory (grouped convolutions, and max-pooling that is ~20× faster than in NCHW
    on CPU).
    """

    def __init__(self, arch: str, task: TaskData, hparams: Sequence[HyperParams], arch_kwargs: dict | None, device):
        self.device = torch.device(device)
        self.hparams = list(hparams)
        modules = [_build(arch, task, hp, arch_kwargs) for hp in self.hparams]
        self.ref = modules[0]
        self.kind = "mlp" if type(self.ref) is MLP else "cnn"
        self.num_models = len(modules)
        self.stacked = _Stacked(modules, self.device)
        self.optimizer = _StackedOptimizer(self.stacked, self.hparams)
        self.runs = _activation_runs(self.hparams)
        self.generators = [model_generators(hp.seed) for hp in self.hparams]
        self.dropout_models = [m for m, hp in enumerate(self.hparams) if hp.dropout > 0]
        self.drop_p = torch.tensor([[hp.dropout] for hp in self.hparams], dtype=torch.float32)
        self.drop_scale = torch.tensor([[1.0 / (1.0 - hp.dropout)] for hp in self.hparams], dtype=torch.float32)
        self._mask_buffer: torch.Tensor | None = None
        self.ref_input = (task.in_channels, task.image_size)
        if self.kind == "cnn":
            self.convs = [(m.stride, m.padding, m.dilation) for m in (self.ref.conv1, self.ref.conv2, self.ref.conv3)]
            self.channels = [self.ref.conv1.out_channels, self.ref.conv2.out_channels, self.ref.conv3.out_channels]
            self.pool = (self.ref.pool.kernel_size, self.ref.pool.stride)
        self.sites = self._mask_sites() if self.dropout_models else []

    # -- pieces of the forward pass ------------------------------------------------------------
    def _act(self, h: torch.Tensor, dim: int, width: int) -> torch.Tensor:
        if len(self.runs) == 1:
            return self.runs[0][2](h)
        # one split and one cat (their backward passes are one cat and one split); narrow would
        # make every run's backward write a full-size zero tensor
        parts = h.split([(stop - start) * width for start, stop, _ in self.runs], dim)
        return torch.cat([act(part) for part, (_, _, act) in zip(parts, self.runs)], dim)

    def _drop(self, h: torch.Tensor, model_dim: int, masks) -> torch.Tensor:
        """Apply the next dropout mask; ``masks`` is None (no dropout), an iterator of masks, or a
        list that records each site's ``(model_dim, per-sample shape)`` (see :meth:`_mask_sites`)."""
        if masks is None:
            return h
        if isinstance(masks, list):
            rest = h.shape[2:] if model_dim == 0 else (h.shape[1] // self.num_models, *h.shape[2:])
            masks.append((model_dim, tuple(rest)))
            return h
        return h * next(masks)

    def _mask_sites(self) -> list[tuple[int, tuple[int, ...]]]:
        """``(model_dim, per-sample shape)`` of every dropout site, in forward order (a dry run)."""
        sites: list = []
        with torch.no_grad():
            C, H = self.ref_input
            x = torch.zeros((self.num_models, 1, C * H * H) if self.kind == "mlp" else (1, self.num_models * C, H, H))
            self.forward(x.to(self.device), self.stacked.views(detach=True), sites, False)
        return sites

    def _draw_masks(self, batch: int) -> Iterator[torch.Tensor]:
        """Every model's dropout masks for one step, laid out for the stacked forward pass.

        Model m's masks for the step are one ``uniform_`` draw from its dropout generator, split
        over the sites in forward order: the same numbers ``SeededDropout`` draws with one
        ``torch.rand(shape)`` per site, since torch's CPU generator yields one value per element
        in order (checked by the batched == single test). Models without dropout draw nothing.
        """
        M = self.num_models
        sizes = [batch * math.prod(rest) for _, rest in self.sites]
        total = sum(sizes)
        if self._mask_buffer is None or self._mask_buffer.shape[1] != total:
            self._mask_buffer = torch.ones(M, total)  # rows of models without dropout stay 1 (kept)
        buf = self._mask_buffer
        for m in self.dropout_models:
            buf[m].uniform_(generator=self.generators[m][1])
        mask = (buf >= self.drop_p).to(torch.float32).mul_(self.drop_scale).to(self.device)  # (M, total)
        out, offset = [], 0
        for (model_dim, rest), n in zip(self.sites, sizes):
            piece = mask[:, offset:offset + n].view(M, batch, *rest)  # model m: its (B, *rest) mask
            offset += n
            if model_dim == 1:  # -> (B, M*C, H, W) in channels-last memory
                C, H, W = rest
                piece = piece.permute(1, 3, 4, 0, 2).reshape(batch, H, W, M * C).permute(0, 3, 1, 2)
            out.append(piece)
        return iter(out)

    def _conv(self, h: torch.Tensor, i: int, params: dict, shared_input: bool) -> torch.Tensor:
        w, b = params[f"conv{i + 1}.weight"], params[f"conv{i + 1}.bias"]
        stride, padding, dilation = self.convs[i]
        if h.stride(1) != 1 or not h.is_contiguous(memory_format=torch.channels_last):
            # explicit NHWC strides: with one channel, .contiguous(channels_last) may keep NCHW
            # strides, and oneDNN then picks NCHW, whose max-pooling is ~20x slower on CPU
            h = h.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format).permute(0, 3, 1, 2)
        groups = 1 if shared_input else self.num_models
        return F.conv2d(h, w.reshape(-1, *w.shape[2:]), b.reshape(-1), stride, padding, dilation, groups)

    def forward(self, x: torch.Tensor, params: dict, masks, shared_input: bool) -> torch.Tensor:
        """Logits ``(M, B, classes)``; ``masks``: dropout masks from :meth:`_draw_masks`, or None.

        ``shared_input``: ``x`` is one batch ``(B, C, H, W)`` seen by every model (evaluation);
        otherwise per-model batches, ``(M, B, F)`` for the MLP, ``(B, M*C, H, W)`` for CNNs.
        """
        M = self.num_models
        if self.kind == "mlp":
            w1, b1 = params["fc1.weight"], params["fc1.bias"]
            if shared_input:  # one GEMM for all models: (B, F) @ (F, M*H) -> (M, B, H)
                h = F.linear(x.flatten(1), w1.reshape(-1, w1.shape[-1]), b1.reshape(-1))
                h = h.view(x.shape[0], M, -1).transpose(0, 1)
            else:
                h = torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2))  # (M, B, F) -> (M, B, H1)
            h = self._drop(self._act(h, 0, 1), 0, masks)
            h = torch.baddbmm(params["fc2.bias"].unsqueeze(1), h, params["fc2.weight"].transpose(1, 2))
            h = self._drop(self._act(h, 0, 1), 0, masks)
            return torch.baddbmm(params["fc3.bias"].unsqueeze(1), h, params["fc3.weight"].transpose(1, 2))

        kernel, stride = self.pool
        h = self._conv(x, 0, params, shared_input)  # -> (B, M*c1, H, W)
        h = self._drop(self._act(F.max_pool2d(h, kernel, stride), 1, self.channels[0]), 1, masks)
        h = self._conv(h, 1, params, False)  # -> (B, M*c2, H/2, W/2)
        h = self._drop(self._act(F.max_pool2d(h, kernel, stride), 1, self.channels[1]), 1, masks)
        h = self._conv(h, 2, params, False)  # -> (B, M*c3, h, w)
        h = self._drop(self._act(h, 1, self.channels[2]), 1, masks)
        h = h.reshape(h.shape[0], M, -1).transpose(0, 1)  # -> (M, B, c3*h*w), each model's flatten order
        h = torch.baddbmm(params["fc1.bias"].unsqueeze(1), h, params["fc1.weight"].transpose(1, 2))
        h = self._drop(self._act(h, 0, 1), 0, masks)
        return torch.baddbmm(params["fc2.bias"].unsqueeze(1), h, params["fc2.weight"].transpose(1, 2))

    # -- data ------------------------------------------------------------------------------------
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Training images in the layout batches are gathered from."""
        if self.kind == "mlp":
            return x.flatten(1).to(self.device)  # (N, F)
        return x.permute(0, 2, 3, 1).contiguous().to(self.device)  # (N, H, W, C)

    def gather(self, data: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Per-model batches ``idx`` ``(M, B)`` from :meth:`prepare`'s output."""
        if self.kind == "mlp":
            return data[idx]  # (M, B, F)
        xb = data[idx.t()]  # (B, M, H, W, C)
        B, M, H, W, C = xb.shape
        xb = xb.permute(0, 2, 3, 1, 4).reshape(B, H, W, M * C)  # channels-last memory
        return xb.permute(0, 3, 1, 2)  # (B, M*C, H, W)

    # -- training and evaluation -----------------------------------------------------------------
    def train_epoch(self, data: torch.Tensor, y: torch.Tensor) -> None:
        n, bs = len(y), self.hparams[0].batch_size
        perms = torch.stack([torch.randperm(n, generator=data_gen) for data_gen, _ in self.generators]).to(self.device)
        for start in range(0, n, bs):
            idx = perms[:, start:start + bs]  # (M, B)
            masks = self._draw_masks(idx.shape[1]) if self.dropout_models else None
            logits = self.forward(self.gather(data, idx), self.stacked.views(), masks, False)  # (M, B, K)
            # the sum over models of each model's mean loss: every model gets its own gradient
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[idx].reshape(-1), reduction="sum")
            self.stacked.flat.grad = None
            (loss / idx.shape[1]).backward()
            self.optimizer.step()

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-model ``(accuracy, mean loss)`` arrays on a split shared by all models."""
        params = self.stacked.views(detach=True)
        M = self.num_models
        correct = torch.zeros(M, dtype=torch.float64)
        loss = torch.zeros(M, dtype=torch.float64)
        chunk = max(32, min(batch_size, 4096 // M))  # ~128 images x 32 models stays in cache
        for start in range(0, len(y), chunk):
            xb, yb = x[start:start + chunk].to(self.device), y[start:start + chunk].to(self.device)
            logits = self.forward(xb, params, None, True)  # (M, n, K)
            yy = yb.unsqueeze(0).expand(M, -1)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yy.reshape(-1), reduction="none")
            loss += ce.view(M, -1).sum(1).double().cpu()
            correct += (logits.argmax(-1) == yy).sum(1).double().cpu()
        n = max(len(y), 1)
        return (correct / n).numpy(), (loss / n).numpy()


def _train_group(
    arch: str, task: TaskData, items: Sequence[tuple[int, HyperParams]], run: _RunSpec, on_epoch=None
) -> Iterator[CheckpointRecord]:
    """Train one group as a stacked model; yield epoch by epoch, models in ``items`` order."""
    order = sorted(range(len(items)), key=lambda i: (items[i][1].activation,))  # runs of equal activation
    hparams = [items[i][1] for i in order]
    ckpts = set(_checkpoint_epochs(run.epochs, run.checkpoint_epochs))
    group = _BatchedGroup(arch, task, hparams, run.arch_kwargs, run.device)
    data, y = group.prepare(task.x_train), task.y_train.to(group.device)
    n_train_eval = len(task.y_train) if run.train_eval_samples is None else min(run.train_eval_samples, len(task.y_train))
    position = {item_index: slot for slot, item_index in enumerate(order)}

    def records(epoch: int) -> Iterator[CheckpointRecord]:
        tr_acc, tr_loss = group.evaluate(task.x_train[:n_train_eval], task.y_train[:n_train_eval], run.eval_batch_size)
        va_acc, _ = group.evaluate(task.x_val, task.y_val, run.eval_batch_size)
        te_acc, te_loss = group.evaluate(task.x_test, task.y_test, run.eval_batch_size)
        for i, (model_id, hp) in enumerate(items):
            k = position[i]
            metrics = CheckpointMetrics(
                float(tr_acc[k]), float(va_acc[k]), float(te_acc[k]), float(tr_loss[k]), float(te_loss[k])
            )
            yield CheckpointRecord(model_id, epoch, hp, metrics, group.stacked.state_dict(k))

    if 0 in ckpts:
        yield from records(0)
    for epoch in range(1, run.epochs + 1):
        group.train_epoch(data, y)
        if on_epoch is not None:
            on_epoch(len(items))
        if epoch in ckpts:
            yield from records(epoch)


# --------------------------------------------------------------------------------------------
# the population: groups, workers, shards


@dataclass(frozen=True)
class _RunSpec:
    arch: str
    arch_kwargs: dict | None
    epochs: int
    checkpoint_epochs: tuple[int, ...] | None
    train_eval_samples: int | None
    eval_batch_size: int
    batched: bool
    device: str


def _run_job(task: TaskData, items: Sequence[tuple[int, HyperParams]], run: _RunSpec, on_epoch=None) -> Iterator[CheckpointRecord]:
    if run.batched:
        yield from _train_group(run.arch, task, items, run, on_epoch)
        return
    for model_id, hp in items:
        yield from train_single(
            run.arch, task, hp, epochs=run.epochs, checkpoint_epochs=run.checkpoint_epochs,
            arch_kwargs=run.arch_kwargs, model_id=model_id, train_eval_samples=run.train_eval_samples,
            eval_batch_size=run.eval_batch_size, device=run.device, on_epoch=on_epoch,
        )


def _plan_jobs(items: list[tuple[int, HyperParams]], batched: bool, max_group_size: int, num_workers: int) -> list[list]:
    """Split the population into jobs: stacked groups (same batch size, balanced, contiguous) or single models."""
    if not batched:
        return [[item] for item in items]
    by_batch: dict[int, list] = {}
    for item in items:
        by_batch.setdefault(item[1].batch_size, []).append(item)
    target = max(1, min(max_group_size, math.ceil(len(items) / max(1, num_workers))))
    jobs = []
    for members in by_batch.values():
        n_jobs = math.ceil(len(members) / target)
        bounds = [round(j * len(members) / n_jobs) for j in range(n_jobs + 1)]
        jobs.extend(members[bounds[j]:bounds[j + 1]] for j in range(n_jobs))
    return jobs


# worker processes: one spawn pool per (workers, threads), kept for the next call, so that a zoo
# built in many chunks starts its workers once
_WORKER: dict = {}
_POOL: dict = {}


def _worker_init(progress_queue, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["queue"] = progress_queue


def _worker_run(call_id: str, task_blob: bytes, run: _RunSpec, items: list[tuple[int, HyperParams]]) -> list[tuple]:
    if _WORKER.get("task_id") != call_id:  # the task is unpickled once per call and worker
        _WORKER["task"] = _task_from_blob(task_blob)
        _WORKER["task_id"] = call_id
    progress_queue = _WORKER["queue"]
    out = []
    for rec in _run_job(_WORKER["task"], items, run, on_epoch=lambda n: progress_queue.put((call_id, n))):
        state = {k: v.numpy() for k, v in rec.state_dict.items()}  # numpy: no shared-memory handles
        out.append((rec.model_id, rec.epoch, rec.hparams, rec.metrics, state))
    return out


def _pool(num_workers: int, threads: int) -> tuple[ProcessPoolExecutor, object]:
    key = (num_workers, threads)
    executor = _POOL.get("executor")
    if executor is None or _POOL.get("key") != key or getattr(executor, "_broken", False):
        shutdown_workers()
        ctx = mp.get_context("spawn")
        progress_queue = ctx.Queue()
        executor = ProcessPoolExecutor(
            max_workers=num_workers, mp_context=ctx, initializer=_worker_init, initargs=(progress_queue, threads)
        )
        _POOL.update(executor=executor, key=key, queue=progress_queue)
    return executor, _POOL["queue"]


def shutdown_workers() -> None:
    """Stop the worker processes kept by :func:`train_population` (they are also stopped at exit)."""
    executor = _POOL.pop("executor", None)
    progress_queue = _POOL.pop("queue", None)
    _POOL.pop("key", None)
    if executor is not None:
        executor.shutdown(wait=True, cancel_futures=True)
    if progress_queue is not None:
        progress_queue.close()


atexit.register(shutdown_workers)


def _task_blob(task: TaskData) -> bytes:
    """The task as safetensors bytes (tensors) with its other fields as JSON metadata — no pickle."""
    tensors = {f.name: v.contiguous() for f in fields(task) if isinstance(v := getattr(task, f.name), torch.Tensor)}
    meta = {f.name: getattr(task, f.name) for f in fields(task) if f.name not in tensors}
    return safetensors.torch.save(tensors, metadata={"fields": json.dumps(meta)})


def _task_from_blob(blob: bytes) -> TaskData:
    tensors = safetensors.torch.load(blob)
    meta = json.loads(safetensors_metadata(blob)["fields"])
    meta = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()}
    return TaskData(**tensors, **meta)


def train_population(
    arch: str,
    task: TaskData | str,
    hparams: Sequence[HyperParams],
    *,
    model_ids: Sequence[int] | None = None,
    epochs: int,
    checkpoint_epochs: Iterable[int] | None = None,
    arch_kwargs: dict | None = None,
    num_workers: int = 1,
    progress: bool = True,
    batched: bool | None = None,
    max_group_size: int = 32,
    train_eval_samples: int | None = DEFAULT_TRAIN_EVAL_SAMPLES,
    eval_batch_size: int = 1000,
    threads_per_worker: int | None = None,
    device: str = "cpu",
) -> Iterator[CheckpointRecord]:
    """Train a population of models and yield a :class:`CheckpointRecord` per (model, checkpoint epoch).

    Args:
        arch: architecture name (see ``list_architectures()``).
        task: a :class:`TaskData` or a task name (loaded with defaults).
        hparams: one :class:`HyperParams` per model (e.g. from :func:`sample_grid`).
        model_ids: ids stored in the records (default ``0..len(hparams)-1``); keep them global
            when training a shard.
        epochs: training epochs per model.
        checkpoint_epochs: epochs to record (default every epoch ``0..epochs``; 0 = the init).
        arch_kwargs: extra builder arguments (e.g. ``hidden`` for ``mlp``, ``width`` for ``resnet18``).
        num_workers: worker processes (spawn, kept alive for the next call; see
            :func:`shutdown_workers`); ``1`` trains in this process. On a 2-core machine ``2``
            with one thread each is fastest.
        progress: show a tqdm bar over model-epochs.
        batched: stack each group into one model (default: whenever the architecture supports it,
            see :func:`supports_batched_training`); ``False`` forces the per-model loop.
        max_group_size: most models in one stacked group.
        train_eval_samples: ``train_acc``/``train_loss`` use the first N train images (fixed).
        threads_per_worker: torch threads in each worker (default ``cpu_count // num_workers``).
        device: where to train (``"cpu"``; a CUDA device works as well).

    Order of the records: the population is cut into jobs — stacked groups (models with the same
    batch size, contiguous in input order, at most ``max_group_size``, and at least
    ``num_workers`` groups when there are enough models) or single models on the per-model path —
    and jobs are yielded in order. Within a group, records come epoch by epoch, the group's models
    in input order at each epoch; every model's checkpoints come in ascending epoch. The records
    themselves (weights, metrics) do not depend on the grouping or on ``num_workers`` (up to float
    round-off); sort by ``(model_id, epoch)`` for a canonical order.
    """
    if isinstance(task, str):
        task = load_task(task)
    hparams = list(hparams)
    ids = list(range(len(hparams))) if model_ids is None else [int(i) for i in model_ids]
    if len(ids) != len(hparams):
        raise ValueError(f"got {len(ids)} model_ids for {len(hparams)} hparams")
    ckpts = tuple(_checkpoint_epochs(epochs, checkpoint_epochs))
    if batched is None:
        batched = supports_batched_training(arch, arch_kwargs, task)
    elif batched and not supports_batched_training(arch, arch_kwargs, task):
        raise ValueError(f"architecture {arch!r} has no batched implementation; use batched=False")
    items = list(zip(ids, hparams))
    if not items:
        return
    num_workers = max(1, int(num_workers))
    run = _RunSpec(arch, dict(arch_kwargs or {}) or None, epochs, ckpts, train_eval_samples, eval_batch_size, batched, str(device))
    jobs = _plan_jobs(items, batched, max_group_size, num_workers)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(items) * epochs, unit="model-epoch", desc=f"training {arch}", disable=not progress)
    try:
        if num_workers == 1 or len(jobs) == 1:
            for job in jobs:
                yield from _run_job(task, job, run, on_epoch=bar.update)
            return
        yield from _run_in_workers(task, jobs, run, num_workers, threads_per_worker, bar)
    finally:
        bar.close()


def _run_in_workers(task: TaskData, jobs: list, run: _RunSpec, num_workers: int, threads: int | None, bar) -> Iterator[CheckpointRecord]:
    threads = threads or max(1, (os.cpu_count() or 1) // num_workers)
    executor, progress_queue = _pool(num_workers, threads)
    call_id = uuid.uuid4().hex
    task_blob = _task_blob(task)  # serialised once per call

    def drain(block_until=None) -> None:
        while True:
            try:
                message_id, n = progress_queue.get(timeout=0.2 if block_until is not None else 0.0)
                if message_id == call_id:
                    bar.update(n)
            except queue_module.Empty:
                if block_until is None or block_until.done():
                    return

    futures = []
    try:
        futures = [executor.submit(_worker_run, call_id, task_blob, run, job) for job in jobs]
        for future in futures:
            drain(block_until=future)
            for model_id, epoch, hp, metrics, state in future.result():
                yield CheckpointRecord(model_id, epoch, hp, metrics, {k: torch.from_numpy(v) for k, v in state.items()})
        drain()
    finally:
        for future in futures:
            future.cancel()


def shard_for_process(items: Sequence, process_index: int | None = None, num_processes: int | None = None) -> list:
    """This process's contiguous share of ``items`` (balanced to within one item).

    Under ``accelerate launch --num_processes N`` the index and count come from
    ``accelerate.PartialState()``, so every process trains its own share of a population:

    >>> shard_for_process(list(range(10)), process_index=1, num_processes=3)
    [3, 4, 5]
    """
    if process_index is None or num_processes is None:
        from accelerate import PartialState

        state = PartialState()
        process_index = state.process_index if process_index is None else process_index
        num_processes = state.num_processes if num_processes is None else num_processes
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} is outside 0..{num_processes - 1}")
    items = list(items)
    start = process_index * len(items) // num_processes
    stop = (process_index + 1) * len(items) // num_processes
    return items[start:stop]
