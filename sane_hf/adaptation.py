"""Adapting a model (e.g. a sample) to data: BatchNorm conditioning and a new classification head.

:func:`condition_batchnorm` re-estimates BatchNorm running statistics on data;
:func:`reset_head` re-initialises or resizes a classification head for a new task. Both are
re-exported by :mod:`sane_hf.sampling`.

This module travels to the Hub as remote code with ``sampling.py``: it imports only torch and numpy.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["condition_batchnorm", "reset_head", "last_linear"]


def _check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (TypeError / ValueError naming ``name`` otherwise; shared with sampling)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _batches(data: Any, batch_size: int) -> Iterable[Tensor]:
    if isinstance(data, Tensor):
        for start in range(0, len(data), batch_size):
            yield data[start : start + batch_size]
        return
    for batch in data:
        if isinstance(batch, Mapping):
            for name in ("x", "input", "inputs", "pixel_values", "image"):
                if name in batch:
                    batch = batch[name]
                    break
            else:
                raise TypeError(f"a dict batch needs an 'x'/'inputs'/'pixel_values' entry, got keys {sorted(batch)}")
        elif isinstance(batch, (tuple, list)):
            batch = batch[0]  # (inputs, labels)
        if not isinstance(batch, Tensor):
            raise TypeError(f"batches must be tensors or (inputs, labels) pairs, got {type(batch).__name__}")
        yield batch


@torch.no_grad()
def condition_batchnorm(
    module: nn.Module, data: Any, steps: int | None = None, *, batch_size: int = 128
) -> nn.Module:
    """Re-estimate the running statistics of every BatchNorm layer of ``module`` on ``data``.

    Decoded models carry running statistics that were themselves sampled (or, with a tokenizer
    built with ``include_norm_stats=False``, fresh ones); they rarely match the model's actual
    activations. This resets every ``_BatchNorm`` with ``track_running_stats`` (stats and
    ``num_batches_tracked``), switches it to a cumulative average (``momentum=None``) in train
    mode, runs forward passes without gradients, then restores each layer's momentum and every
    submodule's training flag. Only the BatchNorm layers are in train mode during the passes
    (dropout stays off), and no parameter changes.

    Args:
        module: the network (modified in place and returned).
        data: an input tensor ``(n, ...)`` split into batches of ``batch_size``, or an iterable
            of batches (tensors, ``(inputs, labels)`` pairs, or dicts with an ``"x"``/``"inputs"``
            entry), e.g. a ``DataLoader``.
        steps: at most this many batches (None = all of ``data``).
        batch_size: batch size when ``data`` is a tensor.
    """
    if steps is not None:
        steps = _check_int("steps", steps, 1)
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return module
    flags = {m: m.training for m in module.modules()}
    momenta = {m: m.momentum for m in norms}
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    seen = 0
    try:
        module.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for batch in _batches(data, batch_size):
            if steps is not None and seen >= steps:
                break
            module(batch.to(device))
            seen += 1
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, flag in flags.items():
            m.training = flag
    if seen == 0:
        raise ValueError("condition_batchnorm: data yielded no batches; BatchNorm statistics were reset")
    return module


def _find_head(sd: Mapping[str, Tensor], head_key: str | None) -> tuple[str, str | None]:
    """``(weight key, bias key or None)`` of the classification head in a state_dict."""
    if head_key is not None:
        key = head_key if head_key in sd else f"{head_key}.weight"
        if key not in sd:
            raise KeyError(f"head_key {head_key!r} is neither a key nor a module prefix of the state_dict")
    else:
        matrices = [k for k, v in sd.items() if isinstance(v, Tensor) and v.is_floating_point() and v.dim() == 2]
        if not matrices:
            raise ValueError("the state_dict has no 2-D weight to reset; pass head_key")
        key = matrices[-1]  # the last linear layer in registration (= forward) order
    weight = sd[key]
    if not (isinstance(weight, Tensor) and weight.is_floating_point() and weight.dim() == 2):
        raise ValueError(f"the head {key!r} must be a 2-D float weight (a Linear layer), got shape {tuple(weight.shape)}")
    prefix, _, suffix = key.rpartition(".")
    bias_suffix = suffix.replace("weight", "bias") if "weight" in suffix else None
    bias_key = f"{prefix}.{bias_suffix}" if prefix and bias_suffix else bias_suffix
    if bias_key is not None:
        bias = sd.get(bias_key)
        if not (isinstance(bias, Tensor) and bias.dim() == 1 and bias.shape[0] == weight.shape[0]):
            bias_key = None
    return key, bias_key


def _init_linear(out_features: int, in_features: int, bias: bool, seed: int, like: Tensor) -> tuple[Tensor, Tensor | None]:
    """``nn.Linear``'s default initialisation (uniform ±1/√fan_in for weight and bias), seeded."""
    generator = torch.Generator().manual_seed(int(seed))
    bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
    weight = (torch.rand(out_features, in_features, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    b = (torch.rand(out_features, generator=generator, dtype=torch.float64) * 2 - 1) * bound if bias else None
    weight = weight.to(dtype=like.dtype, device=like.device)
    return weight, (b.to(dtype=like.dtype, device=like.device) if b is not None else None)


def last_linear(module: nn.Module) -> tuple[str, nn.Linear] | None:
    """``(name, module)`` of the last ``nn.Linear`` of ``module`` in registration order — its
    classification head by default — or None when it has none."""
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def reset_head(
    state_dict_or_module: Mapping[str, Tensor] | nn.Module,
    num_classes: int | None = None,
    head_key: str | None = None,
    seed: int = 0,
) -> Any:
    """Re-initialise (and optionally resize) the classification head, e.g. for a new task.

    The head is the last linear layer: the last ``nn.Linear`` of a module (in registration
    order), or the last 2-D float tensor of a state_dict (with its bias partner, the same key with
    ``weight`` → ``bias``, when present). ``head_key`` names it explicitly (``"fc2"`` or
    ``"fc2.weight"``). The new weights follow ``nn.Linear``'s default initialisation (uniform
    ``±1/√fan_in``) drawn from ``torch.Generator().manual_seed(seed)``; torch's global RNG is untouched.

    Args:
        state_dict_or_module: a state_dict (a new ``OrderedDict`` is returned, the input is not
            modified) or an ``nn.Module`` (its head is replaced in place; the module is returned).
        num_classes: new number of outputs (None = keep the current one).
        head_key: the head's module name or weight key (default: found as above).
        seed: seed of the new weights.
    """
    if num_classes is not None:
        num_classes = _check_int("num_classes", num_classes, 1)
    if isinstance(state_dict_or_module, nn.Module):
        module = state_dict_or_module
        if head_key is not None:
            name = head_key.removesuffix(".weight")
            try:
                head = module.get_submodule(name)
            except AttributeError as err:
                raise KeyError(f"head_key {head_key!r} names no submodule") from err
        else:
            found = last_linear(module)
            if found is None:
                raise ValueError(f"{type(module).__name__} has no nn.Linear head to reset; pass head_key")
            name, head = found
        if not isinstance(head, nn.Linear):
            raise ValueError(f"the head {name!r} is a {type(head).__name__}, not an nn.Linear")
        out_features = num_classes if num_classes is not None else head.out_features
        weight, bias = _init_linear(out_features, head.in_features, head.bias is not None, seed, head.weight)
        new = nn.Linear(head.in_features, out_features, bias=head.bias is not None, device="meta")
        new.weight = nn.Parameter(weight, requires_grad=head.weight.requires_grad)
        if bias is not None:
            new.bias = nn.Parameter(bias, requires_grad=head.bias.requires_grad)
        new.train(head.training)
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, new)
        return module

    if not isinstance(state_dict_or_module, Mapping):
        raise TypeError(f"reset_head takes a state_dict or an nn.Module, got {type(state_dict_or_module).__name__}")
    sd = state_dict_or_module
    key, bias_key = _find_head(sd, head_key)
    old = sd[key]
    out_features = num_classes if num_classes is not None else old.shape[0]
    weight, bias = _init_linear(out_features, old.shape[1], bias_key is not None, seed, old)
    out: OrderedDict[str, Tensor] = OrderedDict(sd)
    out[key] = weight
    if bias_key is not None:
        out[bias_key] = bias
    return out
