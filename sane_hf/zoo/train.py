"""Population training: many small models with varied hyperparameters, trained at once.

The unit of work is a *group*: models of one architecture and batch size. For ``mlp``, ``cnn-s``
and ``cnn-m`` a group trains as one stacked model — parameters stacked along a model axis,
linear layers as ``bmm``, convolutions as one grouped convolution (``groups=M``) in channels-last
layout, and one hand-written Adam/SGD update over the stacked parameters with per-model learning
rate, weight decay and optimizer. Other architectures (``resnet18``, anything registered later)
train with the plain per-model loop :func:`train_single`. Groups are spread over worker processes
(``num_workers``, spawn, one torch thread each on a 2-core machine); several machines split the
population with :func:`shard_for_process` under ``accelerate launch``.

This module owns the population: jobs, worker processes and shards. The pieces live beside it and
are re-exported here: :mod:`sane_hf.zoo.hyperparams` (:class:`HyperParams`, :func:`sample_grid`,
records), :mod:`sane_hf.zoo.single` (:func:`evaluate_model`, :func:`train_single`,
:func:`fine_tune`) and :mod:`sane_hf.zoo.batched` (stacked groups).

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
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields

import safetensors.torch
import torch

from sane_hf.state_dict_io import safetensors_metadata
from sane_hf.zoo.batched import _train_group, supports_batched_training
from sane_hf.zoo.hyperparams import ADAM_BETAS as ADAM_BETAS  # the dataset card reads these from here
from sane_hf.zoo.hyperparams import ADAM_EPS as ADAM_EPS
from sane_hf.zoo.hyperparams import (
    DEFAULT_TRAIN_EVAL_SAMPLES,
    OPTIMIZERS,
    CheckpointMetrics,
    CheckpointRecord,
    HyperParams,
    model_generators,
    sample_grid,
)
from sane_hf.zoo.hyperparams import SGD_MOMENTUM as SGD_MOMENTUM
from sane_hf.zoo.single import _checkpoint_epochs, evaluate_model, fine_tune, native_cpu_kernels, train_single
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
    "native_cpu_kernels",
]



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
