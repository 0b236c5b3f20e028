"""The training loop: :func:`train_sane` and the final model folder it writes.

Owns the Accelerator, the data loaders, the optimizer and learning-rate schedule, the step loop
(accumulation, clipping, logging, periodic validation and checkpoints, ``step_callback``) and the
atomic final folder. Configuration is :mod:`sane_hf.training.config`, the checkpoint format
:mod:`sane_hf.training.checkpoints`, the input checks :mod:`sane_hf.training.inputs` and
validation :mod:`sane_hf.training.validation`; the package docstring (:mod:`sane_hf.training`)
describes what a run writes and why resuming is exact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sane_hf.constants import METRICS_FILE, TRAINING_CONFIG_FILE, ZOO_CONFIG_FILE
from sane_hf.serialization import json_default
from sane_hf.training.checkpoints import (
    _TMP_PREFIX,
    CHECKPOINTS_DIR,
    _check_resume_compatible,
    _load_training_state,
    _LoopState,
    _save_checkpoint,
    _zoo_fingerprint,
    check_checkpoint_format,
    latest_checkpoint,
)
from sane_hf.training.config import SaneTrainingConfig
from sane_hf.training.inputs import _check_model_fits, _permutation_spec, _prepare_zoo, _PreparedZoo
from sane_hf.training.validation import _evaluate, _model_inputs

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    from accelerate import Accelerator

    from sane_hf.alignment import PermutationSpec
    from sane_hf.configuration_sane import SaneConfig
    from sane_hf.modeling_sane import SaneModel
    from sane_hf.tokenization_sane import WeightTokenizer
    from sane_hf.zoo.dataset import ZooConfig

__all__ = ["StepInfo", "TrainingInterrupted", "train_sane"]

logger = logging.getLogger(__name__)


class TrainingInterrupted(RuntimeError):
    """Raise this from a ``step_callback`` to stop a run as if it were killed (no final model)."""


@dataclass
class StepInfo:
    """What a ``step_callback`` sees after every optimizer step (on every process)."""

    step: int
    epoch: int
    loss: float  # this process's training loss of the step (mean over accumulated batches)
    learning_rate: float
    model: nn.Module  # unwrapped
    accelerator: Accelerator


def _schedule(kind: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier per step (a picklable-free closure; LambdaLR stores only its step count)."""

    def onecycle(step: int) -> float:
        # torch OneCycleLR's shape (anneal_strategy='cos', div_factor=25, final_div_factor=1e4)
        initial, final = 1.0 / 25.0, 1.0 / 25.0 / 1e4
        if step < warmup_steps:
            pct = step / max(1, warmup_steps)
            return final_lr(initial, 1.0, pct)
        pct = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return final_lr(1.0, final, min(1.0, pct))

    def final_lr(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)

    def cosine(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        pct = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, pct)))

    def constant(step: int) -> float:
        return (step + 1) / (warmup_steps + 1) if step < warmup_steps else 1.0

    return {"onecycle": onecycle, "cosine": cosine, "constant": constant}[kind]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on >= 2-dim parameters only (not on biases, LayerNorm or 1-dim vectors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------
# the final model folder
# ----------------------------------------------------------------------------------------------


def _clear_output_dir(output_dir: Path) -> None:
    from sane_hf.hub import remote_code_files

    for name in (CHECKPOINTS_DIR, "logs"):
        shutil.rmtree(output_dir / name, ignore_errors=True)
    for name in (METRICS_FILE, "config.json", "model.safetensors", "weight_tokenizer.json", TRAINING_CONFIG_FILE,
                 ZOO_CONFIG_FILE, "generation_config.json", "README.md", *remote_code_files()):
        (output_dir / name).unlink(missing_ok=True)


def _write_final(
    output_dir: Path,
    model: SaneModel,
    tokenizer: WeightTokenizer,
    training_config: SaneTrainingConfig,
    zoo: _PreparedZoo,
    metrics: Mapping[str, Any],
) -> None:
    """Write the final folder into a temp dir, then move each file into ``output_dir`` (metrics.json last).

    The folder is pipeline-ready (:func:`sane_hf.hub.save_model_folder`: remote code,
    ``custom_pipelines`` for ``weight-sampling`` and ``weight-embedding``, and the model card).
    """
    from sane_hf.cards import write_model_card
    from sane_hf.hub import save_model_folder

    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}final_", dir=output_dir))
    try:
        save_model_folder(model, tokenizer, tmp, card=False)
        training_config.to_json_file(tmp / TRAINING_CONFIG_FILE)
        if zoo.zoo_config_path is not None:
            shutil.copyfile(zoo.zoo_config_path, tmp / ZOO_CONFIG_FILE)
        elif zoo.zoo_config is not None:
            zoo.zoo_config.to_json_file(tmp / ZOO_CONFIG_FILE)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=json_default) + "\n")
        write_model_card(tmp, model_name=output_dir.resolve().name)
        (output_dir / METRICS_FILE).unlink(missing_ok=True)  # the folder is incomplete until it is back
        names = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != METRICS_FILE)
        for name in [*names, METRICS_FILE]:
            os.replace(tmp / name, output_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


def train_sane(
    model_or_config: SaneModel | SaneConfig,
    zoo: str | os.PathLike | datasets.DatasetDict,
    training_config: SaneTrainingConfig | None = None,
    tokenizer: WeightTokenizer | str | os.PathLike | None = None,
    *,
    zoo_config: ZooConfig | None = None,
    permutation_spec: PermutationSpec | None = None,
    step_callback: Callable[[StepInfo], None] | None = None,
) -> Path:
    """Train SANE on a zoo with Accelerate; returns ``output_dir`` holding the final model (see module docs).

    Args:
        model_or_config: a :class:`SaneConfig` (a fresh model is initialised with ``seed``) or a
            :class:`SaneModel` to continue training. Its ``token_size`` must match the tokens and
            its ``window_size`` is the training window.
        zoo: a zoo folder (raw, as ``sane-hf zoo build`` writes it, or a tokenized ``save_to_disk``
            folder with its ``weight_tokenizer.json``), a raw ``DatasetDict`` (a tokenizer is built
            for its architecture with ``token_size = config.token_size`` and fitted on the train
            split), or a tokenized ``DatasetDict`` (then ``tokenizer`` is required).
        training_config: how to train (default :class:`SaneTrainingConfig` ()).
        tokenizer: a :class:`WeightTokenizer` (or a folder holding one) for the zoo; fitted on the
            train split if it is not fitted yet. Saved into ``output_dir``.
        zoo_config: the zoo's :class:`ZooConfig` when ``zoo`` is a DatasetDict (read from
            ``zoo_config.json`` for a folder); names the architecture for permutation views and is
            copied to ``output_dir``.
        permutation_spec: the architecture's :class:`PermutationSpec`; derived from ``zoo_config``
            when None. Without either, permutation views are turned off with a warning.
        step_callback: called with a :class:`StepInfo` after every optimizer step on every
            process; raising :class:`TrainingInterrupted` stops the run as a kill would.

    Raises:
        ValueError: before any training, for inputs that cannot work: token sizes that disagree,
            a zoo mixing architectures, an empty split, a window longer than the sequences,
            an output folder with another run (without ``resume``/``overwrite_output_dir``).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from sane_hf.configuration_sane import SaneConfig
    from sane_hf.modeling_sane import SaneModel
    from sane_hf.tokenization_sane import WeightTokenizer

    cfg = training_config if training_config is not None else SaneTrainingConfig()
    if isinstance(model_or_config, SaneConfig):
        model_config = model_or_config
    elif isinstance(model_or_config, SaneModel):
        model_config = model_or_config.config
    else:
        raise TypeError(f"model_or_config must be a SaneModel or a SaneConfig, got {type(model_or_config).__name__}")
    output_dir = Path(cfg.output_dir)
    if cfg.tracker == "tensorboard":
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            raise ValueError("tracker='tensorboard' needs the tensorboard package: pip install tensorboard")

    # -- output folder ------------------------------------------------------------------------
    from sane_hf.serialization import check_output_folder

    own = (output_dir / TRAINING_CONFIG_FILE).is_file() or latest_checkpoint(output_dir) is not None
    check_output_folder(output_dir, kind="train", own=own, overwrite=cfg.overwrite_output_dir,
                        flag="overwrite_output_dir=True (--overwrite)")  # fmt: skip
    resume_from = latest_checkpoint(output_dir) if cfg.resume else None
    if resume_from is not None:
        check_checkpoint_format(resume_from)  # refuses pickled (old Accelerate) checkpoints before anything runs
    if not cfg.resume and not cfg.overwrite_output_dir:
        if latest_checkpoint(output_dir) is not None or (output_dir / METRICS_FILE).exists():
            raise ValueError(
                f"{str(output_dir)!r} already holds a training run; pass resume=True (--resume) to continue it or "
                "overwrite_output_dir=True (--overwrite_output_dir) to start over"
            )

    _allow_new_accelerator_settings(cfg.mixed_precision, cfg.cpu)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=cfg.cpu,
        log_with="tensorboard" if cfg.tracker == "tensorboard" else None,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs"), automatic_checkpoint_naming=False
        ),
    )
    on_cpu = accelerator.device.type == "cpu"
    if on_cpu and cfg.mixed_precision != "no":
        warnings.warn(
            f"mixed_precision={cfg.mixed_precision!r} on CPU: bf16 runs ~7x slower than fp32 on typical CPUs and "
            "fp16 is ignored by Accelerate on CPU; use mixed precision on GPUs",
            stacklevel=2,
        )
    previous_threads = torch.get_num_threads()
    if on_cpu:
        torch.set_num_threads(cfg.num_threads)
    lock = contextlib.ExitStack()
    try:
        from sane_hf.serialization import (
            FolderLockedError,
            folder_lock,
            read_owner_marker,
            write_owner_marker,
        )

        locked_out: FolderLockedError | None = None
        if accelerator.is_main_process:  # one writer per run folder; the other processes of a launch follow
            try:
                lock.enter_context(folder_lock(output_dir, "sane-hf train"))
                if (read_owner_marker(output_dir) or {}).get("kind") != "train":
                    write_owner_marker(output_dir, "train")
            except FolderLockedError as err:
                locked_out = err
        if accelerator.num_processes > 1:  # every process stops, not only the main one
            from accelerate.utils import broadcast

            flag = torch.tensor([int(locked_out is not None)], device=accelerator.device)
            if broadcast(flag, from_process=0).item() and locked_out is None:
                raise FolderLockedError(f"{output_dir} is being written by another process (see the main process)")
        if locked_out is not None:
            raise locked_out
        if resume_from is not None and tokenizer is None and (resume_from / "weight_tokenizer.json").is_file():
            tokenizer = WeightTokenizer.from_pretrained(resume_from)  # the exact normalisation of the run
        return _train(
            accelerator, cfg, model_or_config, model_config, zoo, tokenizer, zoo_config, permutation_spec,
            step_callback, resume_from, output_dir,
        )  # fmt: skip
    finally:
        lock.close()
        if on_cpu:
            torch.set_num_threads(previous_threads)
        # not accelerator.end_training(): it would also destroy the process group, which the caller may still use
        for tracker in accelerator.trackers:
            tracker.finish()


def _allow_new_accelerator_settings(mixed_precision: str, cpu: bool) -> None:
    """Let a second ``train_sane`` in one process use other mixed-precision/CPU settings.

    Accelerate keeps one ``AcceleratorState`` per process and refuses a new ``Accelerator`` with a
    different ``mixed_precision`` (or ``cpu=True`` after a GPU run). Only in that case, where
    creating the Accelerator would fail anyway, the state is reset; the process group (held by
    ``PartialState``) is kept.
    """
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if not shared:
        return
    device = shared.get("device")
    changed_precision = shared.get("_mixed_precision") not in (None, mixed_precision)
    changed_device = cpu and device is not None and torch.device(device).type != "cpu"
    if changed_precision or changed_device:
        AcceleratorState._reset_state(reset_partial_state=False)


def _train(
    accelerator: Accelerator,
    cfg: SaneTrainingConfig,
    model_or_config: SaneModel | SaneConfig,
    model_config: SaneConfig,
    zoo: Any,
    tokenizer: WeightTokenizer | str | os.PathLike | None,
    zoo_config: ZooConfig | None,
    permutation_spec: PermutationSpec | None,
    step_callback: Callable[[StepInfo], None] | None,
    resume_from: Path | None,
    output_dir: Path,
) -> Path:
    """The body of :func:`train_sane` once the Accelerator exists."""
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from sane_hf.data import Augmentation, EpochSampler, PermutationBank, ZooWindowDataset, collate_windows
    from sane_hf.modeling_sane import SaneModel

    # -- data (all checks happen here, before any training) -----------------------------------
    prepared = _prepare_zoo(zoo, tokenizer, model_config.token_size, zoo_config, cfg, accelerator)
    tokenizer = prepared.tokenizer
    _check_model_fits(model_config, tokenizer, prepared.num_tokens)
    fingerprint = _zoo_fingerprint(prepared.zoo)
    if resume_from is not None:
        _check_resume_compatible(resume_from, cfg, model_config, fingerprint)

    bank = None
    if cfg.permutation:
        spec, why = (permutation_spec, "") if permutation_spec is not None else _permutation_spec(prepared.zoo_config)
        if spec is None:
            warnings.warn(f"permutation views are off: {why}", stacklevel=3)
        else:
            bank = PermutationBank.build(tokenizer, spec, cfg.permutation_bank_size, seed=cfg.seed)
    augmentation = Augmentation(noise_std=cfg.noise_std, erase_prob=cfg.erase_prob,
                                permutation_prob=1.0 if bank is not None else 0.0)  # fmt: skip
    window = model_config.window_size
    train_set = ZooWindowDataset(
        prepared.zoo["train"], window, cfg.windows_per_sample, augmentation, bank, seed=cfg.seed
    )
    world = accelerator.num_processes
    if len(train_set) < cfg.batch_size * world:
        raise ValueError(
            f"the train split gives {len(train_set)} windows ({train_set.num_samples} checkpoints x "
            f"{cfg.windows_per_sample} windows_per_sample), fewer than one batch of {cfg.batch_size} per process "
            f"x {world} process(es); lower batch_size or raise windows_per_sample"
        )
    sampler = EpochSampler(len(train_set), seed=cfg.seed, shuffle=True)
    loader_kwargs = dict(
        collate_fn=collate_windows, num_workers=cfg.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )  # fmt: skip
    train_loader = DataLoader(
        train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed), **loader_kwargs,
    )  # fmt: skip
    val_loader = None
    if cfg.eval_split is not None:
        val_set = ZooWindowDataset(
            prepared.zoo[cfg.eval_split], window, cfg.windows_per_sample, augmentation, bank,
            clean_first_view=True, seed=cfg.seed + 1,
        )  # fmt: skip
        val_loader = DataLoader(
            val_set, batch_size=cfg.eval_batch_size or cfg.batch_size, shuffle=False,
            generator=torch.Generator().manual_seed(cfg.seed), **loader_kwargs,
        )  # fmt: skip

    # -- inputs are valid: from here on the output folder changes ------------------------------
    if cfg.overwrite_output_dir and accelerator.is_main_process:
        _clear_output_dir(output_dir)
    accelerator.wait_for_everyone()

    # -- model, optimizer, schedule -------------------------------------------------------------
    set_seed(cfg.seed)
    model = model_or_config if isinstance(model_or_config, SaneModel) else SaneModel(model_config)
    model.train()
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2)
    )
    if val_loader is not None:
        model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    batches_per_epoch = len(train_loader)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.num_epochs * steps_per_epoch
    warmup_steps = int(round(cfg.warmup_ratio * total_steps))
    # not prepared: Accelerate would step it once per process; it is stepped once per optimizer step here
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg.lr_scheduler, total_steps, warmup_steps))
    state = _LoopState()
    training_objects = (model, optimizer, scheduler, state)
    manifest_extra = {"zoo_fingerprint": fingerprint}

    if resume_from is not None:
        _load_training_state(accelerator, resume_from, model, optimizer, scheduler, state)
        logger.info("resumed from %s at step %d", resume_from, state.global_step)
        if state.batches_in_epoch >= batches_per_epoch:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    elif cfg.resume and accelerator.is_main_process:
        logger.warning("resume=True but %s holds no checkpoint: starting from scratch", output_dir)

    extra_files = {
        "sane_config.json": model_config.to_json_string(),
        TRAINING_CONFIG_FILE: json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n",
        "weight_tokenizer.json": json.dumps(tokenizer.to_dict(), indent=1) + "\n",
    }
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.tracker is not None:
        tracker_config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.to_dict().items()}
        accelerator.init_trackers("sane", config=tracker_config)

    tokens_per_batch = cfg.batch_size * window * world
    unwrapped = accelerator.unwrap_model(model)
    last_eval: dict[str, float] = {}
    last_saved = state.global_step if resume_from is not None else -1

    def evaluate() -> dict[str, float]:
        if val_loader is None:
            return {}
        result = _evaluate(model, val_loader, accelerator)
        state.history.append({"step": state.global_step, **result})
        accelerator.log(result, step=state.global_step)
        return result

    if cfg.eval_on_start and state.global_step == 0 and not state.history:
        last_eval = evaluate()

    bar = tqdm(
        total=total_steps, initial=state.global_step, desc="train SANE", unit="step", dynamic_ncols=True,
        disable=not (cfg.progress and accelerator.is_local_main_process),
    )  # fmt: skip
    step_losses: list[torch.Tensor] = []
    run_start = time.perf_counter()
    seconds_before = state.train_seconds
    throughput = 0.0
    while state.global_step < total_steps:
        train_set.set_epoch(state.epoch)
        train_loader.set_epoch(state.epoch)  # Accelerate's loader sets the sampler's and dataset's epoch
        loader = train_loader
        if state.batches_in_epoch > 0:
            loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
            loader.set_epoch(state.epoch)
        finished = False
        for batch in loader:
            with accelerator.accumulate(model):
                out = model(**_model_inputs(batch))
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            state.tokens_seen += tokens_per_batch
            step_losses.append(out.loss.detach())
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            state.global_step += 1
            local_loss = torch.stack(step_losses).float().mean()  # mean over the accumulated batches
            step_losses.clear()
            step_loss = local_loss.item()
            # the mean over processes (one scalar all-reduce): every process logs and checkpoints the same numbers
            state.recent_losses.append(accelerator.reduce(local_loss, reduction="mean").item() if world > 1 else step_loss)
            state.train_seconds = seconds_before + time.perf_counter() - run_start
            throughput = state.tokens_seen / max(state.train_seconds, 1e-9)
            lr = scheduler.get_last_lr()[0]
            bar.update(1)
            if state.global_step % cfg.logging_steps == 0 or state.global_step == total_steps:
                state.last_logged_loss = sum(state.recent_losses) / len(state.recent_losses)
                state.recent_losses = []
                bar.set_postfix(loss=f"{state.last_logged_loss:.4f}", tok_s=f"{throughput:,.0f}", lr=f"{lr:.2e}")
                accelerator.log(
                    {"train_loss": state.last_logged_loss, "learning_rate": lr, "tokens_per_second": throughput},
                    step=state.global_step,
                )
            if cfg.eval_steps and state.global_step % cfg.eval_steps == 0 and state.global_step < total_steps:
                last_eval = evaluate()
                bar.set_postfix(loss=f"{state.last_logged_loss or step_loss:.4f}",
                                val=f"{last_eval.get('val_loss', float('nan')):.4f}", tok_s=f"{throughput:,.0f}")  # fmt: skip
            if cfg.save_steps and state.global_step % cfg.save_steps == 0:
                _save_checkpoint(accelerator, output_dir, state.global_step, extra_files, cfg.save_total_limit,
                                 training_objects, manifest_extra)
                last_saved = state.global_step
            if step_callback is not None:
                step_callback(StepInfo(state.global_step, state.epoch, step_loss, lr, unwrapped, accelerator))
            if state.global_step >= total_steps:
                break
        else:
            finished = True
        if finished or state.batches_in_epoch >= batches_per_epoch:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    bar.close()

    # -- the end: final evaluation, checkpoint and model folder ---------------------------------
    if val_loader is not None:
        if not state.history or state.history[-1]["step"] != state.global_step:
            last_eval = evaluate()
        else:
            last_eval = {k: v for k, v in state.history[-1].items() if k != "step"}
    if cfg.save_steps and last_saved != state.global_step:
        _save_checkpoint(accelerator, output_dir, state.global_step, extra_files, cfg.save_total_limit,
                                 training_objects, manifest_extra)
    metrics = {
        "train_loss": state.last_logged_loss,
        "val_loss": last_eval.get("val_loss"),
        "val_reconstruction_loss": last_eval.get("val_reconstruction_loss"),
        "val_reconstruction_r2": last_eval.get("val_reconstruction_r2"),
        "initial_val_loss": state.history[0]["val_loss"] if state.history and state.history[0]["step"] == 0 else None,
        "steps": state.global_step,
        "epochs": round(state.global_step / max(steps_per_epoch, 1), 4),
        "train_seconds": round(state.train_seconds, 3),
        "tokens_per_second": round(state.tokens_seen / max(state.train_seconds, 1e-9), 1),
        "tokens_seen": state.tokens_seen,
        "num_parameters": sum(p.numel() for p in unwrapped.parameters()),
        "num_processes": world,
        "train_windows_per_epoch": len(train_set),
        "train_checkpoints": train_set.num_samples,
        "num_tokens_per_checkpoint": prepared.num_tokens,
        "window_size": window,
        "permutation_views": bank is not None,
        "eval_history": state.history,
    }
    if accelerator.is_main_process:
        _write_final(output_dir, unwrapped, tokenizer, cfg, prepared, metrics)
    accelerator.wait_for_everyone()
    return output_dir
