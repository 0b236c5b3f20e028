"""Stacked training: a group of models of one architecture and batch size trained as one model.

For ``mlp`` and the ``cnn-*`` family the parameters of M models are stacked along a model axis
(linear layers as ``bmm``, convolutions as one grouped convolution in channels-last layout) and
updated by one hand-written Adam/SGD step with per-model learning rate, weight decay and optimizer.
A model trained in a group equals the same model trained alone by
:func:`~sane_hf.zoo.single.train_single` to float round-off, dropout included (tested).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sane_hf.zoo.architectures import ACTIVATIONS, MLP, SmallCNN, create_model
from sane_hf.zoo.hyperparams import (
    ADAM_BETAS,
    ADAM_EPS,
    SGD_MOMENTUM,
    CheckpointMetrics,
    CheckpointRecord,
    HyperParams,
    model_generators,
)
from sane_hf.zoo.single import _build, _checkpoint_epochs
from sane_hf.zoo.tasks import TaskData

if TYPE_CHECKING:  # pragma: no cover
    from sane_hf.zoo.train import _RunSpec

__all__ = ["supports_batched_training"]


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
