"""Validation during training: mean loss and reconstruction R² of the clean first view over real values.

The numbers ``metrics.json`` and the eval history report (``val_loss``,
``val_reconstruction_loss``, ``val_reconstruction_r2``), summed over every process with
``gather_for_metrics`` so that they do not depend on the number of processes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator

__all__: list[str] = []  # internal to the training loop


_MODEL_INPUTS = ("tokens", "positions", "mask", "attention_mask", "tokens_2", "labels", "labels_2")


def _model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: batch[k] for k in _MODEL_INPUTS if k in batch}


@torch.no_grad()
def _evaluate(model: nn.Module, loader: Any, accelerator: Accelerator) -> dict[str, float]:
    """Mean validation loss and reconstruction R² of the clean first view over real values."""
    was_training = model.training
    model.eval()
    if hasattr(loader, "set_epoch"):  # the same windows at every evaluation (Accelerate counts iterations)
        loader.set_epoch(0)
    rows = []
    for batch in loader:
        out = model(**_model_inputs(batch))
        labels = batch["labels"].float()  # (B, W, d)
        real = batch["mask"].bool()
        if "attention_mask" in batch:
            real = real & batch["attention_mask"].bool()[..., None]
        real_f = real.to(torch.float64)
        err = (out.reconstruction.double() - labels.double()).pow(2) * real_f
        y = labels.double() * real_f
        per_window = torch.stack(
            [
                err.sum(dim=(1, 2)),  # SSE
                y.sum(dim=(1, 2)),  # Σy
                (y * y).sum(dim=(1, 2)),  # Σy²
                real_f.sum(dim=(1, 2)),  # n
                out.loss.detach().double().expand(labels.shape[0]),  # the batch loss, once per window
                out.reconstruction_loss.detach().double().expand(labels.shape[0]),
            ],
            dim=1,
        )  # (B, 6)
        rows.append(accelerator.gather_for_metrics(per_window))
    if was_training:
        model.train()
    stats = torch.cat(rows).sum(dim=0) if rows else torch.zeros(6, dtype=torch.float64)
    count_windows = sum(r.shape[0] for r in rows)
    sse, sum_y, sum_y2, n, loss_sum, rec_sum = stats.tolist()
    sst = sum_y2 - sum_y * sum_y / max(n, 1.0)
    return {
        "val_loss": loss_sum / max(count_windows, 1),
        "val_reconstruction_loss": rec_sum / max(count_windows, 1),
        "val_reconstruction_r2": 1.0 - sse / sst if sst > 0 else float("nan"),
    }


