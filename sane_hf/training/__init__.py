"""Training SANE with Accelerate: :class:`SaneTrainingConfig` and :func:`train_sane`.

One loop runs everywhere Accelerate does — a laptop CPU, one GPU, ``accelerate launch
--multi_gpu --num_processes N`` on GPUs or on CPUs (gloo) — with mixed precision, gradient
accumulation, gradient clipping, periodic validation, atomic checkpoints and exact resume.

What a run writes (``output_dir``)::

    output_dir/
    ├── config.json, model.safetensors        the trained SaneModel (SaneModel.from_pretrained(output_dir))
    ├── configuration_sane.py, modeling_sane.py   remote code (AutoModel, trust_remote_code=True)
    ├── weight_tokenizer.json                 its WeightTokenizer (WeightTokenizer.from_pretrained(output_dir))
    ├── training_config.json                  the SaneTrainingConfig
    ├── zoo_config.json                       the zoo's ZooConfig, when the zoo had one
    ├── metrics.json                          final losses, R², steps, time, tokens/s, eval history (written last)
    ├── checkpoints/checkpoint_<step>/        resumable training state (safetensors + JSON, no pickle), the newest few
    └── logs/                                 tracker output (TensorBoard), when a tracker is set

Atomicity. A checkpoint is written to ``checkpoints/.tmp_checkpoint_<step>`` by every process
and renamed into place by the main process once complete; a folder
named ``checkpoint_<step>`` is therefore always whole. The final model is written to a temporary
folder and its files are then moved into ``output_dir`` one by one with ``os.replace`` (each
atomic), ``metrics.json`` last: a folder with ``metrics.json`` holds a complete final model.

Exact resume. Everything random is either restored or a pure function of the step:

- model (``model.safetensors``), optimizer (AdamW moments in ``optimizer.safetensors``, the rest
  in ``optimizer.json``), grad scaler, the learning-rate schedule and the loop state (epoch,
  batches consumed in the epoch, step, time, losses) are saved as safetensors + JSON, and so are
  the RNG states of every process (python, numpy, torch CPU/CUDA: ``rng_state_<rank>.*``), so
  dropout continues where it stopped. Nothing is pickled and nothing is unpickled on resume:
  files other tools put into a checkpoint (``*.pkl``, ``*.bin``) are never read, and a folder
  written by Accelerate's ``save_state`` is refused. ``checkpoint.json`` (written last) holds the
  format version, the number of processes and a fingerprint of the zoo, which must match to resume;
- the order of an epoch is a permutation seeded by ``(seed, epoch)`` (:class:`~sane_hf.data.EpochSampler`,
  nothing drawn from the global RNG), and each window's offset, views and noise are seeded by
  ``(seed, epoch, index)`` (:class:`~sane_hf.data.ZooWindowDataset`);
- on resume the current epoch is re-entered with ``Accelerator.skip_first_batches`` past the
  batches already consumed.

A run killed after checkpoint ``k`` and resumed therefore performs the same steps on the same
data with the same dropout masks and reaches the same parameters as an uninterrupted run
(bit-equal on one CPU process; see ``tests/test_training.py``).

Example::

    >>> from sane_hf.training import SaneTrainingConfig, sane_config_preset, train_sane  # doctest: +SKIP
    >>> out = train_sane(sane_config_preset("small", token_size=64), "zoos/digits-cnn",
    ...                  SaneTrainingConfig(output_dir="runs/sane-digits", max_steps=500))
    >>> SaneModel.from_pretrained(out), WeightTokenizer.from_pretrained(out)

Layout: :mod:`~sane_hf.training.config` (presets, :class:`SaneTrainingConfig`),
:mod:`~sane_hf.training.inputs` (zoo, tokenizer and permutation-spec checks),
:mod:`~sane_hf.training.validation` (validation loss and R²),
:mod:`~sane_hf.training.checkpoints` (the checkpoint format, atomic saves, resume checks) and
:mod:`~sane_hf.training.loop` (:func:`train_sane`); every public name is importable from
``sane_hf.training``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sane_hf._lazy import lazy_exports
from sane_hf.constants import METRICS_FILE, TRAINING_CONFIG_FILE

# imported on first use: `sane_hf.training.config` (what `sane-hf train --help` reads) stays free of torch
_LAZY: dict[str, str] = {
    "PRESETS": "sane_hf.training.config",
    "DEFAULT_PRESET": "sane_hf.training.config",
    "SaneTrainingConfig": "sane_hf.training.config",
    "sane_config_preset": "sane_hf.training.config",
    "StepInfo": "sane_hf.training.loop",
    "TrainingInterrupted": "sane_hf.training.loop",
    "train_sane": "sane_hf.training.loop",
    "latest_checkpoint": "sane_hf.training.checkpoints",
    "CHECKPOINTS_DIR": "sane_hf.training.checkpoints",
    "CHECKPOINT_MANIFEST": "sane_hf.training.checkpoints",
    "check_checkpoint_format": "sane_hf.training.checkpoints",
}

__all__ = [
    "PRESETS",
    "DEFAULT_PRESET",
    "SaneTrainingConfig",
    "StepInfo",
    "TrainingInterrupted",
    "sane_config_preset",
    "train_sane",
    "latest_checkpoint",
    "TRAINING_CONFIG_FILE",
    "METRICS_FILE",
    "CHECKPOINTS_DIR",
    "CHECKPOINT_MANIFEST",
    "check_checkpoint_format",
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from sane_hf.training.checkpoints import (
        CHECKPOINT_MANIFEST,
        CHECKPOINTS_DIR,
        check_checkpoint_format,
        latest_checkpoint,
    )
    from sane_hf.training.config import DEFAULT_PRESET, PRESETS, SaneTrainingConfig, sane_config_preset
    from sane_hf.training.loop import StepInfo, TrainingInterrupted, train_sane
