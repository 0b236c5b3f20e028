"""Building a zoo: rows, the part store of finished pieces (resume), model-level splits, assembly of
the parquet shards with the summary and the dataset card, and :func:`build_zoo` (population
training, one process or several under ``accelerate launch``)."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from datasets import DatasetDict

from sane_hf.cards.dataset_card import render_zoo_card
from sane_hf.constants import CARD_FILE, PARTIAL_DIR, ZOO_CONFIG_FILE, ZOO_SUMMARY_FILE
from sane_hf.serialization import (
    atomic_path,
    atomic_write_text,
    check_output_folder,
    folder_lock,
    read_owner_marker,
    remove_if_only_bookkeeping,
    write_owner_marker,
)
from sane_hf.state_dict_io import state_dict_from_bytes, state_dict_to_bytes
from sane_hf.zoo.loading import load_zoo
from sane_hf.zoo.schema import (
    _UNKNOWN,
    HPARAM_COLUMNS,
    PROPERTY_COLUMNS,
    SPLITS,
    ZOO_FEATURES,
    ZooConfig,
    _fmt,
    _is_finite_number,
    _is_finite_state_dict,
    _is_unknown_value,
    _versions,
)

__all__ = ["build_zoo", "split_model_ids"]

_REQUEST_FILE = "request.json"


# ---------------------------------------------------------------------------------------------
# rows, parts and splits (shared by build_zoo and the importers)
# ---------------------------------------------------------------------------------------------


def _make_row(values: Mapping[str, Any]) -> dict[str, Any]:
    """A full zoo row from ``values``: unknown columns get their "unknown" default, ggap is derived."""
    row: dict[str, Any] = {}
    for name, feat in ZOO_FEATURES.items():
        if name == "weights":
            continue
        value = values.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value) and feat.dtype.startswith("int")):
            value = _UNKNOWN[feat.dtype]
        elif feat.dtype.startswith("int"):
            value = int(value)
        elif feat.dtype.startswith("float"):
            value = float(value)
        else:
            value = str(value)
        row[name] = value
    if values.get("ggap") is None:
        row["ggap"] = row["train_acc"] - row["test_acc"]  # NaN when either is unknown
    row["weights"] = values["weights"]
    return row


def _write_parquet_atomic(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(list(rows), schema=ZOO_FEATURES.arrow_schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


class _PartStore:
    """Resumable part files in ``out_dir/.partial``: ``<name>.parquet`` then ``<name>.json`` (the marker)."""

    def __init__(self, out_dir: Path):
        self.dir = out_dir / PARTIAL_DIR

    def done(self, name: str) -> bool:
        return (self.dir / f"{name}.json").exists()

    def write(self, name: str, rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any]) -> None:
        if rows:
            _write_parquet_atomic(self.dir / f"{name}.parquet", rows)
        info = {**info, "rows": len(rows)}
        atomic_write_text(self.dir / f"{name}.json", json.dumps(info, sort_keys=True) + "\n")

    def infos(self) -> dict[str, dict[str, Any]]:
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.dir.glob("*.json")) if p.name != _REQUEST_FILE}

    def tables(self) -> Iterator[pa.Table]:
        for name, info in self.infos().items():
            if info["rows"]:
                yield pq.read_table(self.dir / f"{name}.parquet", schema=ZOO_FEATURES.arrow_schema)

    def check_request(self, request: Mapping[str, Any]) -> None:
        """Store ``request`` on first use; refuse to resume a partial build of something else."""
        path = self.dir / _REQUEST_FILE
        if path.exists():
            previous = json.loads(path.read_text())
            if previous != json.loads(json.dumps(request)):
                diff = sorted(k for k in set(previous) | set(request) if previous.get(k) != request.get(k))
                raise ValueError(
                    f"{self.dir.parent} holds an unfinished zoo made with different settings "
                    f"(differing: {diff}); rerun with the same settings to resume, pass overwrite=True "
                    "to start over, or choose another output folder"
                )
        else:
            atomic_write_text(path, json.dumps(request, indent=2, sort_keys=True) + "\n")

    def remove(self) -> None:
        if self.dir.exists():
            trash = self.dir.with_name(f"{PARTIAL_DIR}-delete-{os.getpid()}")
            _note_temp_dirs(self.dir.parent, [trash.name])
            os.replace(self.dir, trash)
            shutil.rmtree(trash, ignore_errors=True)
        _remove_own_temp_dirs(self.dir.parent)


# temp folders this zoo's writers made, so that a rerun deletes exactly those (never another tool's)
_TEMP_JOURNAL = ".sane-hf-temp.json"


def _note_temp_dirs(out_dir: Path, names: Sequence[str]) -> None:
    journal = out_dir / _TEMP_JOURNAL
    known = json.loads(journal.read_text()) if journal.is_file() else []
    atomic_write_text(journal, json.dumps(sorted(set(known) | set(names))) + "\n")


def _remove_own_temp_dirs(out_dir: Path) -> None:
    """Delete the temp folders listed in this zoo's journal (left by a writer killed mid-way)."""
    journal = out_dir / _TEMP_JOURNAL
    if not journal.is_file():
        return
    for name in json.loads(journal.read_text()):
        if isinstance(name, str) and name.startswith(".") and "/" not in name and name not in (".", ".."):
            shutil.rmtree(out_dir / name, ignore_errors=True)
    journal.unlink(missing_ok=True)


def split_model_ids(
    model_ids: Iterable[int], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, list[int]]:
    """Assign models to ``train``/``validation``/``test`` by a seeded permutation.

    Counts are ``round(fraction * n)`` for validation and test (at least one each when the
    fraction is positive and ``n >= 3``); train gets the rest. Each list is sorted.
    """
    ids = sorted(set(int(i) for i in model_ids))
    n = len(ids)
    perm = np.random.default_rng(seed).permutation(n)
    counts = []
    for frac in fractions[1:]:
        c = int(round(frac * n))
        if frac > 0 and n >= 3:
            c = max(c, 1)
        counts.append(c)
    n_val, n_test = counts
    while n_val + n_test > n:
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    n_train = n - n_val - n_test
    shuffled = [ids[i] for i in perm]
    return {
        "train": sorted(shuffled[:n_train]),
        "validation": sorted(shuffled[n_train : n_train + n_val]),
        "test": sorted(shuffled[n_train + n_val :]),
    }


def _meta(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "weights"}


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _stats(values: Iterable[float]) -> dict[str, Any]:
    """``{n, min, mean, max}`` of the finite values (None when there are none)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"n": 0, "min": None, "mean": None, "max": None}
    return {"n": len(finite), "min": min(finite), "mean": float(np.mean(finite)), "max": max(finite)}


def _summarise(metas: list[dict[str, Any]], splits: Mapping[str, list[int]]) -> dict[str, Any]:
    rows_per_split = {s: 0 for s in SPLITS}
    split_of = {m: s for s, ids in splits.items() for m in ids}
    for m in metas:
        rows_per_split[split_of[m["model_id"]]] += 1
    by_epoch: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for m in metas:
        by_epoch[m["epoch"]].append(m)
    per_epoch = {}
    properties_per_epoch: dict[str, dict[str, Any]] = {prop: {} for prop in PROPERTY_COLUMNS}
    for epoch in sorted(by_epoch):
        rows = by_epoch[epoch]
        acc = _stats(r["test_acc"] for r in rows)
        per_epoch[str(epoch)] = {
            "checkpoints": len(rows),
            "test_acc_min": acc["min"],
            "test_acc_mean": acc["mean"],
            "test_acc_max": acc["max"],
        }
        for prop in PROPERTY_COLUMNS:
            properties_per_epoch[prop][str(epoch)] = _stats(r[prop] for r in rows)
    final: dict[int, dict[str, Any]] = {}
    for m in metas:
        if m["model_id"] not in final or m["epoch"] > final[m["model_id"]]["epoch"]:
            final[m["model_id"]] = m
    final_acc = _stats(m["test_acc"] for m in final.values())
    # hyperparameter values counted per model (each model has one recipe)
    hparam_counts: dict[str, dict[str, int]] = {}
    for col in HPARAM_COLUMNS:
        counts: dict[str, int] = defaultdict(int)
        for m in final.values():
            counts["unknown" if _is_unknown_value(col, m[col]) else _fmt(m[col])] += 1
        hparam_counts[col] = dict(sorted(counts.items()))
    return {
        "num_models": len({m["model_id"] for m in metas}),
        "num_checkpoints": len(metas),
        "models_per_split": {s: len([i for i in splits[s] if i in final]) for s in SPLITS},
        "checkpoints_per_split": rows_per_split,
        "final_test_acc": {"min": final_acc["min"], "mean": final_acc["mean"], "max": final_acc["max"]},
        "test_acc_per_epoch": per_epoch,
        "properties_per_epoch": properties_per_epoch,
        "hparam_counts": hparam_counts,
    }


def _assemble(
    out_dir: Path,
    store: _PartStore,
    config: ZooConfig,
    *,
    transform: Callable[[pa.Table], pa.Table] | None = None,
    notes: Sequence[str] = (),
    extra_summary: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge the part files into ``data/<split>-XXXXX-of-XXXXX.parquet``, write card, config, summary.

    ``transform`` is applied to each part table (e.g. alignment). Parts are streamed one at a time,
    so memory holds one part, not the zoo. Returns the summary dict.
    """
    start = time.perf_counter()
    metas: list[dict[str, Any]] = []
    for table in store.tables():
        metas.extend(table.drop_columns(["weights"]).to_pylist())
    model_ids = sorted({m["model_id"] for m in metas})
    if not model_ids:
        raise RuntimeError(
            f"no checkpoints to write in {out_dir}: every checkpoint was dropped (see warnings) or none was produced"
        )
    splits = split_model_ids(range(config.num_models), config.split_fractions, config.seed)
    split_of = {m: s for s, ids in splits.items() for m in ids}
    missing = [m for m in model_ids if m not in split_of]
    if missing:  # pragma: no cover - importers size num_models from their sources
        raise RuntimeError(f"model ids {missing[:5]} are outside 0..{config.num_models - 1}")

    _remove_own_temp_dirs(out_dir)  # left by a run killed while assembling (only ours: see the journal)
    tmp_data = out_dir / f".data-tmp-{os.getpid()}"
    old = out_dir / f".data-old-{os.getpid()}"
    _note_temp_dirs(out_dir, [tmp_data.name, old.name])
    tmp_data.mkdir(parents=True)
    shard_files: dict[str, list[Path]] = {s: [] for s in SPLITS}
    split_nbytes: dict[str, int] = {s: 0 for s in SPLITS}  # in-memory (arrow) bytes: SplitInfo.num_bytes
    writers: dict[str, tuple[pq.ParquetWriter, int]] = {}
    first_weights: bytes | None = None

    def close(split: str) -> None:
        if split in writers:
            writers.pop(split)[0].close()

    try:
        for table in store.tables():
            if transform is not None:
                table = transform(table)
            table = table.sort_by([("model_id", "ascending"), ("epoch", "ascending")])
            if first_weights is None and table.num_rows:
                first_weights = table.column("weights")[0].as_py()
            ids = table.column("model_id").to_pylist()
            for split in SPLITS:
                mask = pa.array([split_of[i] == split for i in ids])
                part = table.filter(mask)
                if part.num_rows == 0:
                    continue
                if split in writers and writers[split][1] + part.nbytes > config.max_shard_bytes:
                    close(split)
                if split not in writers:
                    path = tmp_data / f"{split}-{len(shard_files[split]):05d}.parquet"
                    shard_files[split].append(path)
                    writers[split] = (pq.ParquetWriter(path, ZOO_FEATURES.arrow_schema), 0)
                writer, size = writers[split]
                writer.write_table(part, row_group_size=64)
                writers[split] = (writer, size + part.nbytes)
                split_nbytes[split] += part.nbytes
        for split in SPLITS:
            close(split)
    finally:
        for writer, _ in writers.values():
            writer.close()
    # rows of one split must be sorted across parts as well: parts are per chunk of model ids,
    # written in chunk order, so concatenation is already sorted by (model_id, epoch).
    data_files: dict[str, str] = {}
    for split in SPLITS:
        n = len(shard_files[split])
        for i, path in enumerate(shard_files[split]):
            path.rename(tmp_data / f"{split}-{i:05d}-of-{n:05d}.parquet")
        if n:
            data_files[split] = f"data/{split}-*"
    data_dir = out_dir / "data"
    if data_dir.exists():
        os.replace(data_dir, old)
    os.replace(tmp_data, data_dir)
    shutil.rmtree(old, ignore_errors=True)

    summary = _summarise(metas, splits)
    summary.update(extra_summary or {})
    summary["assemble_seconds"] = round(time.perf_counter() - start, 3)
    if "build_seconds" in summary:  # the caller's time so far + assembly
        summary["build_seconds"] = round(summary["build_seconds"] + summary["assemble_seconds"], 3)
    summary["notes"] = list(notes)
    summary["data_files"] = data_files
    summary["num_bytes"] = {s: int(split_nbytes[s]) for s in SPLITS}
    summary["download_bytes"] = {
        s: sum(p.stat().st_size for p in data_dir.glob(f"{s}-*.parquet")) for s in SPLITS
    }
    summary["versions"] = _versions()
    # an imported zoo's options name local folders: keep only names relative to the source
    config = ZooConfig.from_dict({**config.to_dict(), "import_options": _public_import_options(config.import_options)})
    card = render_zoo_card(config, summary, metas, first_weights, data_files, notes, name=out_dir.resolve().name)
    atomic_write_text(out_dir / CARD_FILE, card)
    atomic_write_text(out_dir / ZOO_SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    config.to_json_file(out_dir / ZOO_CONFIG_FILE)  # last: its presence (without .partial) marks a complete zoo
    return summary


# ---------------------------------------------------------------------------------------------
# provenance recorded in the summary and the card
# ---------------------------------------------------------------------------------------------

def _is_local_path(value: Any) -> bool:
    return isinstance(value, str) and len(value) > 1 and (
        os.path.isabs(value) or value.startswith(("/", "\\\\", "~")) or value[1:3] in (":\\", ":/")
    )


def _path_name(value: str) -> str:
    return value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _public_import_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Import options without local folders: ``src`` becomes the source folder's name and other
    absolute paths become relative to the source folder (else just their file name).

    >>> _public_import_options({"src": "/home/me/zoos/cnn", "properties": "/home/me/zoos/cnn/p.csv", "x": 1})
    {'src': 'cnn', 'properties': 'p.csv', 'x': 1}
    """
    out = dict(options)
    src = out.get("src")
    if isinstance(src, str) and src:
        out["src"] = _path_name(src) if _is_local_path(src) else src
    for key, value in options.items():
        if key == "src" or not _is_local_path(value):
            continue
        rel = None
        if _is_local_path(src):
            try:
                rel = Path(value).relative_to(Path(src)).as_posix()
            except ValueError:
                rel = None
        out[key] = rel if rel else _path_name(value)
    return out


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------


def _is_complete(out_dir: Path) -> bool:
    return (out_dir / ZOO_CONFIG_FILE).exists() and not (out_dir / PARTIAL_DIR).exists()


def _prepare_out_dir(out_dir: Path, identity: Mapping[str, Any], overwrite: bool, what: str) -> bool:
    """Handle an existing ``out_dir``; True when it already holds this exact complete zoo."""
    if overwrite:
        _remove_own_temp_dirs(out_dir)
        for name in ("data", PARTIAL_DIR, CARD_FILE, ZOO_CONFIG_FILE, ZOO_SUMMARY_FILE):
            path = out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        return False
    if _is_complete(out_dir):
        existing = json.loads((out_dir / ZOO_CONFIG_FILE).read_text())
        wanted = json.loads(json.dumps(identity))
        for data in (existing, wanted):  # the written config keeps only public (relative) import paths
            if isinstance(data.get("import_options"), dict):
                data["import_options"] = _public_import_options(data["import_options"])
        if {k: existing.get(k) for k in wanted} == wanted:
            return True
        raise ValueError(
            f"{out_dir} already holds a different zoo; pass overwrite=True (--overwrite) to replace it "
            f"or choose another folder ({what})"
        )
    return False


def _writes_zoo(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a zoo writer taking ``out_dir`` and ``overwrite``: refuse a folder that is not a zoo (unless
    ``overwrite``), hold the folder's lock for the whole call (rank 0 of a launch), and mark the folder as a zoo."""
    import functools
    import inspect

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            out_dir = Path(bound.arguments["out_dir"])
            if os.environ.get("RANK", "0") != "0":  # other processes of a launch follow rank 0
                return fn(*args, **kwargs)
            own = (out_dir / ZOO_CONFIG_FILE).is_file() or (out_dir / PARTIAL_DIR).is_dir()
            check_output_folder(out_dir, kind="zoo", own=own, overwrite=bool(bound.arguments.get("overwrite")))
            existed = out_dir.exists()
            try:
                with folder_lock(out_dir, what):
                    if (read_owner_marker(out_dir) or {}).get("kind") != "zoo":
                        write_owner_marker(out_dir, "zoo")
                    return fn(*args, **kwargs)
            except BaseException:
                if not existed:  # failed before writing anything: leave no empty folder behind
                    remove_if_only_bookkeeping(out_dir)
                raise

        return wrapper

    return decorate


def _distributed_state():
    """``accelerate.PartialState`` (1 process unless launched with ``accelerate launch`` / ``torchrun``).

    Without a GPU the state is created with ``cpu=True``: accelerate only sets up multi-process
    CPU runs (gloo) when asked for the CPU explicitly.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def _chunks(ids: Sequence[int], size: int) -> list[list[int]]:
    return [list(ids[i : i + size]) for i in range(0, len(ids), size)]


def _chunk_name(index: int) -> str:
    return f"chunk-{index:05d}"


@_writes_zoo("sane-hf zoo build")
def build_zoo(
    config: ZooConfig,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
    overwrite: bool = False,
    cache_dir: str | None = None,
) -> DatasetDict:
    """Train a population of models and write it as a Hugging Face dataset (see the module docs).

    Models are trained in chunks of ``config.models_per_chunk`` by ``train_population``; each
    finished chunk is written to ``out_dir/.partial``, so an interrupted build resumes where it
    stopped when run again with the same config (the result equals an uninterrupted build).
    Under ``accelerate launch --num_processes N`` each process trains its share of the chunks
    and the main process assembles the splits.

    Checkpoints with NaN/Inf weights or losses are dropped with a warning and a note in the card.
    With ``config.align`` every model is permutation-aligned to the final checkpoint of the lowest
    model id (model 0) and the same permutation is applied to all its epochs.

    Args:
        config: what to build.
        out_dir: the zoo folder (created).
        progress: show progress bars.
        overwrite: discard whatever ``out_dir`` holds (partial or complete) first.
        cache_dir: ``datasets`` cache used to load the result.

    Returns:
        The zoo, as :func:`load_zoo` reads it back from ``out_dir``.
    """
    from sane_hf.zoo import train as train_mod
    from sane_hf.zoo.tasks import load_task

    out_dir = Path(out_dir)
    state = _distributed_state()
    identity = config._identity()
    complete = False
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        complete = _prepare_out_dir(out_dir, identity, overwrite, "build_zoo")
        if not complete:
            _PartStore(out_dir).check_request(identity)
    state.wait_for_everyone()
    if _is_complete(out_dir) and (complete or not state.is_main_process):
        return load_zoo(out_dir, cache_dir=cache_dir)

    start = time.perf_counter()
    store = _PartStore(out_dir)
    task = load_task(
        config.task,
        image_size=config.image_size,
        train_subset=config.train_subset,
        eval_subset=config.eval_subset,
        seed=config.seed,
    )
    resolved = ZooConfig.from_dict(
        {
            **config.to_dict(),
            "image_size": task.image_size,
            "in_channels": task.in_channels,
            "num_classes": task.num_classes,
        }
    )
    hparams = train_mod.sample_grid(config.num_models, config.seed, **config.grid)
    chunks = _chunks(list(range(config.num_models)), config.models_per_chunk)
    mine = list(train_mod.shard_for_process(list(range(len(chunks))), state.process_index, state.num_processes))
    todo = [c for c in mine if not store.done(_chunk_name(c))]
    show = progress and state.is_main_process
    device = str(state.device) if config.device == "auto" else config.device
    stored = set(resolved.stored_epochs)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="zoo chunks", unit="chunk", disable=not show)
    for c in todo:
        ids = chunks[c]
        rows: list[dict[str, Any]] = []
        dropped: list[list[int]] = []
        records = train_mod.train_population(
            config.arch,
            task,
            [hparams[i] for i in ids],
            model_ids=ids,
            epochs=config.epochs,
            checkpoint_epochs=config.checkpoint_epochs,
            arch_kwargs=config.arch_kwargs,
            num_workers=config.num_workers,
            progress=show,
            device=device,
        )
        for rec in records:
            if rec.epoch not in stored:
                continue
            row = _record_row(rec, config)
            if row is None:
                dropped.append([int(rec.model_id), int(rec.epoch)])
            else:
                rows.append(row)
        rows.sort(key=lambda r: (r["model_id"], r["epoch"]))
        store.write(_chunk_name(c), rows, {"model_ids": ids, "dropped": dropped})
        bar.update(1)
    bar.close()
    train_seconds = time.perf_counter() - start
    state.wait_for_everyone()

    if state.is_main_process:
        infos = store.infos()
        missing = [c for c in range(len(chunks)) if _chunk_name(c) not in infos]
        if missing:  # pragma: no cover - every process finished its chunks
            raise RuntimeError(f"chunks {missing} were not written; rerun build_zoo to resume")
        dropped_all = sorted(tuple(d) for info in infos.values() for d in info["dropped"])
        notes = []
        if dropped_all:
            msg = (
                f"dropped {len(dropped_all)} checkpoint(s) with NaN/Inf weights or losses "
                f"(model, epoch): {[list(d) for d in dropped_all[:20]]}{' …' if len(dropped_all) > 20 else ''}"
            )
            warnings.warn(msg, stacklevel=2)
            notes.append(msg)
        transform = None
        if config.align:
            transform = _make_aligner(resolved, store)
            notes.append("models are permutation-aligned (weight matching) to the final checkpoint of model "
                         f"{transform.reference_id}")
        _assemble(
            out_dir,
            store,
            resolved,
            transform=transform,
            notes=notes,
            extra_summary={
                "dropped_checkpoints": len(dropped_all),
                "build_seconds": round(time.perf_counter() - start, 3),
                "train_seconds": round(train_seconds, 3),
            },
        )
        store.remove()
    state.wait_for_everyone()
    return load_zoo(out_dir, cache_dir=cache_dir)


def _record_row(rec: Any, config: ZooConfig) -> dict[str, Any] | None:
    """A zoo row from a ``CheckpointRecord``; None when its weights or losses are not finite."""
    m = rec.metrics
    values = {
        "model_id": rec.model_id,
        "epoch": rec.epoch,
        "arch": config.arch,
        "task": config.task,
        "train_acc": m.train_acc,
        "val_acc": m.val_acc,
        "test_acc": m.test_acc,
        "train_loss": m.train_loss,
        "test_loss": m.test_loss,
    }
    for col in HPARAM_COLUMNS:
        values[col] = getattr(rec.hparams, col)
    numbers = [m.train_acc, m.val_acc, m.test_acc, m.train_loss, m.test_loss]
    if not all(_is_finite_number(x) for x in numbers) or not _is_finite_state_dict(rec.state_dict):
        return None
    values["weights"] = state_dict_to_bytes(rec.state_dict)
    return _make_row(values)


class _Aligner:
    """Applies each model's permutation (found on its final checkpoint) to all its checkpoints."""

    def __init__(self, spec: Any, reference: Mapping[str, torch.Tensor], reference_id: int, final_epoch: dict[int, int]):
        self.spec = spec
        self.reference = reference
        self.reference_id = reference_id
        self.final_epoch = final_epoch

    def __call__(self, table: pa.Table) -> pa.Table:
        from sane_hf.alignment import align_to, apply_permutation

        rows = table.to_pylist()
        by_model: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            by_model[row["model_id"]].append(row)
        for model_id, model_rows in by_model.items():
            if model_id == self.reference_id:
                continue
            final = max(model_rows, key=lambda r: r["epoch"])
            _, perms = align_to(state_dict_from_bytes(final["weights"]), self.reference, self.spec)
            for row in model_rows:
                sd = apply_permutation(state_dict_from_bytes(row["weights"]), self.spec, perms)
                row["weights"] = state_dict_to_bytes(sd)
        return pa.Table.from_pylist(rows, schema=ZOO_FEATURES.arrow_schema)


def _make_aligner(config: ZooConfig, store: _PartStore) -> _Aligner:
    from sane_hf.zoo.architectures import permutation_spec_for_arch

    reference: dict[str, Any] | None = None
    final_epoch: dict[int, int] = {}
    for table in store.tables():
        for m_id, epoch in zip(table.column("model_id").to_pylist(), table.column("epoch").to_pylist()):
            final_epoch[m_id] = max(epoch, final_epoch.get(m_id, epoch))
    reference_id = min(final_epoch)
    for table in store.tables():
        for row in table.filter(pc.equal(table.column("model_id"), reference_id)).to_pylist():
            if row["epoch"] == final_epoch[reference_id]:
                reference = row
    assert reference is not None
    spec = permutation_spec_for_arch(config.arch, **config.model_kwargs())
    return _Aligner(spec, state_dict_from_bytes(reference["weights"]), reference_id, final_epoch)


