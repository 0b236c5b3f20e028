"""Importers: existing model populations → the zoo dataset layout of :mod:`sane_hf.zoo.dataset`.

Every importer writes the same folder as :func:`~sane_hf.zoo.dataset.build_zoo` (parquet shards
per split, dataset card, ``zoo_config.json``, ``zoo_summary.json``) with the columns of
:data:`~sane_hf.zoo.dataset.ZOO_FEATURES`. What a source does not record is filled with
"unknown" values: ``-1`` for integer columns, NaN for float columns (hyperparameters and
properties), ``"unknown"`` for strings. Model ids are assigned in sorted order of the source's
model names (file stems, trial folders, ``modeldir`` values); ``zoo_summary.json`` lists them
under ``sources`` (index = model id). Splits are by model, seeded, 70/15/15 by default.

Checkpoints are only ever read as tensors: ``*.safetensors`` with safetensors, ``*.pt``/``*.pth``
and Model Zoos ``checkpoints`` files with ``torch.load(..., weights_only=True)`` (never a full
unpickle). Checkpoints with NaN/Inf weights are dropped and counted; missing properties are
filled with NaN and reported (warning, card note, summary).

Importing resumes: each model is converted into ``out_dir/.partial/model-XXXXXX.parquet``
(atomically, with a JSON marker); a rerun skips models already converted.

Formats
-------
``folder`` (:func:`import_folder`)
    Checkpoint files (one checkpoint each) anywhere below the folder (e.g.
    ``model_003/epoch_05.safetensors``; ``recursive=False`` reads the top level only) and an
    optional ``properties.csv`` or ``properties.json`` with one row per checkpoint, keyed by a
    ``path`` column relative to the folder (``model_003/epoch_05.safetensors``, suffix optional;
    ``file``/``name``/``stem`` columns, the file name, are still accepted where names are unique;
    JSON: an object ``{path: {column: value}}`` or a list of records). Columns named like zoo
    columns (``test_acc``, ``epoch``, ``lr``, ``model_id``, ...) are used, others are ignored.
    Model and epoch come from the ``model_id`` (or ``model``) and ``epoch`` columns, else from
    the layout: a file name ending in ``epoch_5``/``ep5``/``checkpoint-5``/``step_5`` is epoch 5
    of the model named by its folder (plus the name's prefix); other files are their own model
    with epoch ``-1`` (unknown). Rows naming no file or the same file twice, two files for one
    (model, epoch), and mixed architectures are errors that name them.

Every format takes ``arch="module:callable"`` / ``task="module:callable"`` (or ``build=``/``task=``
callables) for your own architecture and task (:mod:`sane_hf.zoo.custom`): the importer then
checks that every checkpoint loads strictly into your module and records both in
``zoo_config.json`` for ``train``, ``probe`` and ``sample``. This imports your code.
``modelzoos`` (:func:`import_modelzoos`)
    The Model Zoos layout (Schürholt et al. 2022): one folder per trained model (found anywhere
    below ``src`` by its ``params.json``) with ``params.json`` (flat ``"group::name"`` keys or
    nested objects), ``result.json`` (JSON lines, one per epoch) and
    ``checkpoint_<epoch>/checkpoints`` (a state_dict saved with ``torch.save``). Mapping:
    :data:`MODELZOOS_PARAMS`; the epoch of a result line is its ``epoch`` key, else its
    ``training_iteration``, and it is matched to ``checkpoint_<epoch>``.
``unterthiner`` (:func:`import_unterthiner`)
    The CNN zoo of Unterthiner et al. 2020 ("Predicting Neural Network Accuracy from Weights"):
    ``weights.npy`` (``[n_checkpoints, n_params]``), ``metrics.csv`` (row ``i`` describes weight row
    ``i``) and ``layout.csv`` (``varname,start_idx,end_idx,shape``; ``end_idx`` exclusive) or
    ``layout.json`` (a list of such records). Mapping: :data:`UNTERTHINER_COLUMNS`; models are the
    distinct ``modeldir`` values, the epoch is the ``epoch`` column, else ``step`` as stored.
    TensorFlow variable names become state_dict keys: the ``:0`` suffix and a prefix shared by
    all variables (e.g. ``sequential/``) are dropped, ``/`` becomes ``.``, and ``kernel``/``gamma``
    → ``weight``, ``beta`` → ``bias``, ``moving_mean``/``moving_variance`` →
    ``running_mean``/``running_var``. With ``torch_layout=True`` (default) kernels are transposed
    to PyTorch's layout: conv ``(h, w, in, out)`` → ``(out, in, h, w)``, dense ``(in, out)`` →
    ``(out, in)``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import struct
import time
import warnings
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import DatasetDict

from sane_hf.serialization import check_safetensors_header
from sane_hf.state_dict_io import state_dict_from_bytes, state_dict_to_bytes
from sane_hf.zoo.dataset import (
    PROPERTY_COLUMNS,
    ZOO_FEATURES,
    ZooConfig,
    _assemble,
    _is_finite_state_dict,
    _make_row,
    _PartStore,
    _prepare_out_dir,
    _writes_zoo,
    load_zoo,
)

__all__ = [
    "IMPORT_FORMATS",
    "MODELZOOS_PARAMS",
    "UNTERTHINER_COLUMNS",
    "import_zoo",
    "import_folder",
    "import_modelzoos",
    "import_unterthiner",
    "load_checkpoint_file",
]

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")
#: properties an importer tries to fill (``ggap`` is derived)
_MEASURED = tuple(p for p in PROPERTY_COLUMNS if p != "ggap")

#: Model Zoos ``params.json`` key → zoo column
MODELZOOS_PARAMS: dict[str, str] = {
    "seed": "seed",
    "optim::lr": "lr",
    "optim::wd": "weight_decay",
    "optim::optimizer": "optimizer",
    "model::nlin": "activation",
    "model::init_type": "init",
    "model::dropout": "dropout",
    "training::batchsize": "batch_size",
    "model::type": "arch",
}
#: result line key(s) → zoo column (first present wins)
_RESULT_KEYS: dict[str, tuple[str, ...]] = {
    "train_acc": ("train_acc", "train_accuracy"),
    "val_acc": ("val_acc", "validation_acc", "val_accuracy"),
    "test_acc": ("test_acc", "test_accuracy"),
    "train_loss": ("train_loss",),
    "test_loss": ("test_loss",),
}
#: Unterthiner ``metrics.csv`` column(s) → zoo column (first present wins)
UNTERTHINER_COLUMNS: dict[str, tuple[str, ...]] = {
    "train_acc": ("train_accuracy", "train_acc"),
    "val_acc": ("validation_accuracy", "val_accuracy", "val_acc"),
    "test_acc": ("test_accuracy", "test_acc"),
    "train_loss": ("train_loss",),
    "test_loss": ("test_loss",),
    "optimizer": ("config.optimizer",),
    "lr": ("config.learning_rate",),
    "activation": ("config.activation",),
    "init": ("config.w_init",),
    "dropout": ("config.dropout",),
    "weight_decay": ("config.l2reg",),
    "seed": ("config.random_seed", "config.seed"),
    "batch_size": ("config.batch_size",),
    "task": ("config.dataset",),
    "epoch": ("epoch", "step"),
}


# ---------------------------------------------------------------------------------------------
# reading checkpoints (never a full unpickle)
# ---------------------------------------------------------------------------------------------


def _extract_state_dict(obj: Any, where: str) -> OrderedDict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return OrderedDict((str(k), v) for k, v in obj.items())
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return OrderedDict((str(k), v) for k, v in inner.items())
    raise ValueError(
        f"{where} does not hold a state_dict (a mapping of names to tensors, or one under "
        "'state_dict' / 'model_state_dict' / 'model')"
    )


def load_checkpoint_file(path: str | os.PathLike) -> OrderedDict[str, torch.Tensor]:
    """A state_dict from ``*.safetensors`` or a torch file read with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        check_safetensors_header(path)
        # key order: as recorded by state_dict_to_bytes, else the file's (safetensors sorts keys)
        try:
            return state_dict_from_bytes(path.read_bytes())
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"cannot read {path} ({err}); it is truncated or not a safetensors file") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle errors come in many types
        raise ValueError(
            f"cannot read {path} with torch.load(weights_only=True) ({err}); only tensors and plain "
            "containers are loaded, never arbitrary pickled objects — re-save it as a state_dict or safetensors"
        ) from err
    return _extract_state_dict(obj, str(path))


def _signature_of_file(path: Path) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Keys and shapes (sorted by key) of a checkpoint file; safetensors: header only."""
    if path.suffix == ".safetensors":
        check_safetensors_header(path)  # a header claiming 2**62 bytes would otherwise be read into memory
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            try:
                header = json.loads(fh.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{path} is not a safetensors file (its header is not JSON: {err})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path} is not a safetensors file (its header is not a JSON object)")
        header.pop("__metadata__", None)
        return tuple(sorted((k, tuple(v["shape"])) for k, v in header.items()))
    sd = load_checkpoint_file(path)
    return tuple(sorted((k, tuple(v.shape)) for k, v in sd.items()))


def _describe_difference(a: Sequence[tuple[str, tuple[int, ...]]], b: Sequence[tuple[str, tuple[int, ...]]]) -> str:
    da, db = dict(a), dict(b)
    parts = []
    only_a = sorted(set(da) - set(db))
    only_b = sorted(set(db) - set(da))
    if only_a:
        parts.append(f"missing keys {only_a[:3]}")
    if only_b:
        parts.append(f"extra keys {only_b[:3]}")
    shapes = [f"{k}: {db[k]} vs {da[k]}" for k in sorted(set(da) & set(db)) if da[k] != db[k]]
    if shapes:
        parts.append("shapes " + "; ".join(shapes[:3]))
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# the user's architecture and task (sane_hf.zoo.custom)
# ---------------------------------------------------------------------------------------------


@dataclass
class _UserCode:
    """The resolved ``arch``/``task`` of an import and the module every checkpoint must load into."""

    arch: str
    arch_entrypoint: str | None
    build: Callable[..., torch.nn.Module] | None
    task: str
    task_entrypoint: str | None
    reference: dict[str, tuple[int, ...]] | None = None  # {key: shape} of the architecture's state_dict
    module: torch.nn.Module | None = None
    checked: bool = False
    keys_only: bool = False  # a registered architecture without a known task: its dimensions are unknown

    def check(self, sd: Mapping[str, torch.Tensor], where: str) -> None:
        """Raise when ``sd`` does not load strictly into the architecture (names the differing keys)."""
        if self.reference is None:
            return
        from sane_hf.zoo.custom import state_dict_difference

        diff = state_dict_difference(self.reference, sd, shapes=not self.keys_only)
        if not diff and not self.checked and self.module is not None and not self.keys_only:
            try:  # once for real: a module may override load_state_dict
                self.module.load_state_dict(sd, strict=True)
            except RuntimeError as err:
                diff = " ".join(str(err).split())
            self.checked = True
        if diff:
            raise ValueError(
                f"{where} does not fit --arch {self.arch!r} (load_state_dict(strict=True)): {diff}; "
                "pass the architecture these checkpoints were saved from"
            )


def _resolve_user_code(
    arch: str | None, build: Callable[..., torch.nn.Module] | None, task: str | Callable[[], Any] | None,
    *, default_arch: str = "unknown", default_task: str = "unknown", seed: int = 0,
) -> _UserCode:
    """Names, entry points and the reference module for ``arch``/``build``/``task`` (see sane_hf.zoo.custom)."""
    from sane_hf.zoo.architectures import create_model, list_architectures
    from sane_hf.zoo.custom import (
        entrypoint_name,
        entrypoint_of,
        is_entrypoint,
        normalize_entrypoint,
        resolve_entrypoint,
        task_from_callable,
    )
    from sane_hf.zoo.tasks import list_tasks, load_task

    arch_entry = None
    if build is not None:
        if not callable(build):
            raise TypeError(f"build must be a callable returning the nn.Module, got {type(build).__name__}")
        arch_entry = entrypoint_of(build)
        if arch_entry is None:
            warnings.warn(
                f"build={getattr(build, '__qualname__', build)!r} has no import path (defined in __main__ or a "
                "lambda): the zoo config cannot record it, so pass it again from Python (train_sane(..., "
                "permutation_spec=permutation_spec(build())), run_sampling/evaluate_sampling(..., build=build)), or "
                "define it in a module and import with --arch module:callable",
                stacklevel=3,
            )
        name = arch if arch not in (None, "unknown") else (
            entrypoint_name(arch_entry) if arch_entry else getattr(build, "__name__", "custom"))
    elif arch is not None and is_entrypoint(arch) and arch not in list_architectures():
        build = resolve_entrypoint(arch, "--arch")
        arch_entry, name = normalize_entrypoint(arch), entrypoint_name(arch)
    else:
        name = arch if arch is not None else default_arch

    task_fn, task_entry, task_data = None, None, None
    if callable(task):
        task_fn, task_entry = task, entrypoint_of(task)
        if task_entry is None:
            warnings.warn(
                f"task={getattr(task, '__qualname__', task)!r} has no import path: the zoo config cannot record "
                "it, so pass it again from Python (run_sampling/evaluate_sampling(..., task=task)), or use "
                "--task module:callable",
                stacklevel=3,
            )
        task_name = entrypoint_name(task_entry) if task_entry else getattr(task, "__name__", "custom")
    elif task is not None and is_entrypoint(task) and task not in list_tasks():
        task_fn = resolve_entrypoint(task, "--task")
        task_entry, task_name = normalize_entrypoint(task), entrypoint_name(task)
    else:
        task_name = task if task is not None else default_task
    if task_fn is not None:  # fail now, not at sampling time
        task_data = task_from_callable(task_fn, task_name, seed=seed)

    code = _UserCode(name, arch_entry, build, task_name, task_entry)
    module = None
    if build is not None:
        from sane_hf.zoo.custom import _call_builder

        module = _call_builder(build, {}, f"--arch {name!r}")
    elif name in list_architectures() and (task_data is not None or task_name in list_tasks(installed_only=True)):
        data = task_data or load_task(task_name, train_subset=1, eval_subset=1)
        module = create_model(name, in_channels=data.in_channels, image_size=data.image_size,
                              num_classes=data.num_classes, init="default")
    elif name in list_architectures():  # no task: the dimensions are unknown, the keys are not
        module, code.keys_only = create_model(name, init="default"), True
    if module is not None:
        code.module = module
        code.reference = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    return code


# ---------------------------------------------------------------------------------------------
# the shared driver
# ---------------------------------------------------------------------------------------------


@dataclass
class _Unit:
    """One model of the source: ``convert()`` returns its checkpoints as value dicts with a ``state_dict``."""

    model_id: int
    source: str
    convert: Callable[[], list[dict[str, Any]]]

    @property
    def part(self) -> str:
        return f"model-{self.model_id:06d}"


def _num(value: Any) -> float | None:
    """A float from CSV/JSON values ('' / None / non-numbers → None)."""
    if value is None or isinstance(value, bool):
        return None if value is None else float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def _coerce(column: str, value: Any) -> Any:
    """A value for zoo ``column`` (None when missing or unparsable)."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    dtype = ZOO_FEATURES[column].dtype
    if dtype == "string":
        return str(value)
    x = _num(value)
    if x is None or (dtype.startswith("int") and not math.isfinite(x)):
        return None
    return int(x) if dtype.startswith("int") else x


@_writes_zoo("sane-hf zoo import")
def _run_import(
    fmt: str,
    src: Path,
    out_dir: Path,
    units: Callable[[], list[_Unit]],
    *,
    options: Mapping[str, Any],
    arch: str,
    task: str,
    seed: int,
    split_fractions: Sequence[float],
    overwrite: bool,
    progress: bool,
    cache_dir: str | None,
    notes: Sequence[str] = (),
    user: _UserCode | None = None,
) -> DatasetDict:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    out_dir = Path(out_dir)
    todo_units = units()
    if not todo_units:
        raise ValueError(f"{src} holds no models in the {fmt!r} layout (see sane_hf.zoo.importers docs)")
    # the model list is part of the identity: a changed source is not resumed into old part files
    fingerprint = hashlib.sha1("\n".join(u.source for u in todo_units).encode()).hexdigest()[:16]
    options = {"src": str(src.resolve()), **options, "num_models": len(todo_units), "sources_sha1": fingerprint}
    user = user or _UserCode(arch, None, None, task, None)
    arch, task = user.arch, user.task
    identity = {
        "source": f"import:{fmt}",
        "import_options": options,
        "seed": seed,
        "split_fractions": list(split_fractions),
        "arch": arch,
        "task": task,
        "arch_entrypoint": user.arch_entrypoint,
        "task_entrypoint": user.task_entrypoint,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if _prepare_out_dir(out_dir, identity, overwrite, f"import --format {fmt}"):
        return load_zoo(out_dir, cache_dir=cache_dir)
    store = _PartStore(out_dir)
    store.check_request(identity)

    converted = 0
    for unit in tqdm(todo_units, desc=f"importing {fmt}", unit="model", disable=not progress):
        if store.done(unit.part):
            continue
        rows, dropped, missing = [], [], Counter()
        for values in unit.convert():
            sd = values.pop("state_dict")
            user.check(sd, unit.source)
            values["model_id"] = unit.model_id
            if values.get("arch") in (None, "unknown"):
                values["arch"] = arch
            if values.get("task") in (None, "unknown"):
                values["task"] = task
            wide = [k for k, v in sd.items() if v.dtype == torch.float64]
            if wide:  # zoos store float32 (the dtype SANE trains on): convert, and say so in the card
                sd = OrderedDict((k, v.float() if v.dtype == torch.float64 else v) for k, v in sd.items())
                converted += 1
            if not _is_finite_state_dict(sd):
                dropped.append([unit.model_id, int(values.get("epoch") if values.get("epoch") is not None else -1)])
                continue
            for prop in _MEASURED:
                v = values.get(prop)
                if v is not None and math.isinf(float(v)):
                    raise ValueError(
                        f"{unit.source}: property {prop} = {v} is not finite (epoch {values.get('epoch')}); fix the "
                        "source (leave the value empty when it is unknown)"
                    )
                if v is None or not math.isfinite(float(v)):
                    missing[prop] += 1
            values["weights"] = state_dict_to_bytes(sd)
            rows.append(_make_row(values))
        rows.sort(key=lambda r: r["epoch"])
        repeated = sorted({r["epoch"] for r in rows if sum(q["epoch"] == r["epoch"] for q in rows) > 1})
        if repeated:
            raise ValueError(
                f"{unit.source}: several checkpoints of model {unit.model_id} have epoch(s) {repeated}; each "
                "(model_id, epoch) must appear once (give each file its own epoch or model_id in the properties)"
            )
        store.write(unit.part, rows, {"model_ids": [unit.model_id], "source": unit.source,
                                      "dropped": dropped, "missing": dict(missing)})
    if converted:
        warnings.warn(f"converted float64 weights to float32 in {converted} checkpoint(s) of this run "
                      "(zoos store float32)", stacklevel=3)  # fmt: skip

    infos = store.infos()
    dropped_all = [d for info in infos.values() for d in info["dropped"]]
    missing_all: Counter = Counter()
    for info in infos.values():
        missing_all.update(info["missing"])
    notes = list(notes)
    if dropped_all:
        msg = f"dropped {len(dropped_all)} checkpoint(s) with NaN/Inf weights (model, epoch): {dropped_all[:20]}"
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)
    if missing_all:
        msg = "properties missing in the source (filled with NaN): " + ", ".join(
            f"{k} for {v} checkpoint(s)" for k, v in sorted(missing_all.items())
        )
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)
    epochs = [0]
    for table in store.tables():
        epochs.extend(e for e in table.column("epoch").to_pylist() if e >= 0)
    config = ZooConfig(
        task=task,
        arch=arch,
        num_models=len(todo_units),
        epochs=max(epochs),
        seed=seed,
        split_fractions=tuple(split_fractions),
        source=f"import:{fmt}",
        import_options=options,
        arch_entrypoint=user.arch_entrypoint,
        task_entrypoint=user.task_entrypoint,
    )
    sources = [u.source for u in sorted(todo_units, key=lambda u: u.model_id)]
    _assemble(
        out_dir,
        store,
        config,
        notes=notes,
        extra_summary={
            "dropped_checkpoints": len(dropped_all),
            "missing_properties": dict(missing_all),
            "sources": sources,
            "build_seconds": round(time.perf_counter() - start, 3),
        },
    )
    store.remove()
    return load_zoo(out_dir, cache_dir=cache_dir)


# ---------------------------------------------------------------------------------------------
# folder of checkpoints
# ---------------------------------------------------------------------------------------------


_EPOCH_IN_NAME = re.compile(r"(?i)(?:^|[_\-.])(?:epoch|ep|checkpoint|ckpt|step|iter)[_\-=]?(\d+)$")
_KEY_COLUMNS = ("path", "file", "filename", "name", "stem")


def _natural_key(text: str) -> list[Any]:
    """Sort key that orders ``model_2`` before ``model_10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _strip_suffix(name: str) -> str:
    for suffix in CHECKPOINT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _layout_of(rel: str) -> tuple[str, int | None]:
    """``(model name, epoch or None)`` read from a checkpoint's relative path.

    ``model_003/epoch_05.safetensors`` → ``("model_003", 5)``; ``net3_ep2.pt`` → ``("net3", 2)``;
    ``runs/a/final.pt`` → ``("runs/a/final", None)`` (no epoch in the name: the file is its own model).
    """
    path = Path(rel)
    stem = _strip_suffix(path.name)
    m = _EPOCH_IN_NAME.search(stem)
    parent = path.parent.as_posix()
    if m is None:
        return _strip_suffix(rel), None
    prefix = stem[: m.start()].rstrip("_-.")
    if parent in ("", "."):
        return (prefix or stem), int(m.group(1))
    return (f"{parent}/{prefix}" if prefix else parent), int(m.group(1))


def _read_properties(path: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """``[(key column, key, record)]`` from properties.csv / properties.json, in file order.

    The key names the checkpoint: ``path`` (relative to the source folder, with or without the
    file suffix), else ``file``/``filename``/``name``/``stem`` (the file name or its stem).
    """
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}; fix that line"
            ) from None
        if isinstance(data, Mapping):
            bad = [str(k) for k, v in data.items() if not isinstance(v, Mapping)]
            if bad:
                raise ValueError(f"{path}: the entries for {bad[:5]} are not objects of property values")
            return [("path" if "/" in str(k) else "file", str(k), dict(v)) for k, v in data.items()]
        if not isinstance(data, list) or not all(isinstance(r, Mapping) for r in data):
            raise ValueError(f"{path} must hold an object {{file: {{property: value}}}} or a list of records")
        records = data
    else:
        with open(path, newline="") as fh:
            records = list(csv.DictReader(fh))
    out = []
    for i, rec in enumerate(records):
        col = next((k for k in _KEY_COLUMNS if rec.get(k) not in (None, "")), None)
        if col is None:
            raise ValueError(
                f"{path}: record {i} has no 'path' entry naming its checkpoint (relative to the source folder, e.g. "
                "model_003/epoch_05.safetensors; 'file'/'name'/'stem' also accepted)"
            )
        out.append((col, str(rec[col]).strip().replace("\\", "/").removeprefix("./"), dict(rec)))
    return out


def _match_properties(
    entries: list[tuple[str, str, dict[str, Any]]], rels: Sequence[str], properties: Path
) -> dict[str, dict[str, Any]]:
    """``{relative path: record}``; every record must name exactly one file and no file two records."""
    by_path = {r: r for r in rels}
    by_path.update({_strip_suffix(r): r for r in rels})
    by_name: dict[str, list[str]] = defaultdict(list)
    for r in rels:
        name = r.rsplit("/", 1)[-1]
        by_name[name].append(r)
        if _strip_suffix(name) != name:
            by_name[_strip_suffix(name)].append(r)
    matched: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}
    unmatched, ambiguous, duplicates = [], [], []
    for col, key, rec in entries:
        if col == "path":
            rel = by_path.get(key) or by_path.get(_strip_suffix(key))
            candidates = [rel] if rel else []
        else:
            candidates = by_name.get(key) or by_name.get(_strip_suffix(key)) or []
            candidates = sorted(set(candidates))
        if not candidates:
            unmatched.append(key)
            continue
        if len(candidates) > 1:
            ambiguous.append(f"{key} ({', '.join(candidates[:3])}{' …' if len(candidates) > 3 else ''})")
            continue
        rel = candidates[0]
        if rel in matched:
            duplicates.append(f"{origin[rel]!r} and {key!r} → {rel}")
            continue
        matched[rel], origin[rel] = rec, key
    if unmatched:
        raise ValueError(
            f"{properties.name}: {len(unmatched)} row(s) name no checkpoint file: {unmatched[:10]}"
            f"{' …' if len(unmatched) > 10 else ''}; keys are paths relative to the source folder "
            f"(e.g. {rels[0]!r}): fix or remove those rows"
        )
    if ambiguous:
        raise ValueError(
            f"{properties.name}: file names match several checkpoints in subfolders: {ambiguous[:5]}; "
            "key the rows by a 'path' column relative to the source folder instead"
        )
    if duplicates:
        raise ValueError(f"{properties.name}: several rows name the same checkpoint: {duplicates[:5]}; keep one row per file")
    return matched


def import_folder(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    properties: str | os.PathLike | None = None,
    arch: str = "unknown",
    task: str | Callable[[], Any] = "unknown",
    build: Callable[..., torch.nn.Module] | None = None,
    recursive: bool = True,
    seed: int = 0,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    overwrite: bool = False,
    progress: bool = True,
    cache_dir: str | None = None,
) -> DatasetDict:
    """Import a folder of checkpoints (``*.safetensors``, ``*.pt``, ``*.pth``) as a zoo.

    Layout: checkpoints anywhere below ``src`` (``recursive=True``), e.g.
    ``model_003/epoch_05.safetensors``. Each checkpoint's model and epoch come from the
    properties' ``model_id``/``model`` and ``epoch`` columns, else from its path: a file name ending
    in ``epoch_5``/``ep5``/``checkpoint-5``/``step_5`` is epoch 5 of the model named by the rest
    of its path (its folder, plus the name's prefix if any); any other file is its own model with
    epoch -1 (unknown).

    Properties: ``src/properties.csv`` (or ``.json``), one row per checkpoint, keyed by a ``path``
    column relative to ``src`` (``model_003/epoch_05.safetensors``; the suffix may be left out);
    ``file``/``name``/``stem`` columns (the file name) are still accepted where names are unique.
    Columns named like zoo columns (``test_acc``, ``epoch``, ``lr``, ``model_id``, ...) are used,
    others ignored. A row that names no file, names a file twice, or is ambiguous is an error.

    Args:
        src: the folder.
        out_dir: the zoo folder to write.
        properties: a properties file; default ``src/properties.csv`` or ``src/properties.json`` if present.
        arch: a registered architecture, your ``"module:callable"`` / ``"file.py:callable"``
            returning the ``nn.Module`` (see :mod:`sane_hf.zoo.custom`; this imports your code), or
            a free name. With a callable (or a registered name and a known task) every checkpoint
            must load into it strictly.
        task: a registered task, your ``"module:callable"`` returning
            ``(x_train, y_train, x_test, y_test)``, the callable itself, or a free name.
        build: the architecture callable itself (instead of ``arch="module:callable"``).
        recursive: look into subfolders (default); False: top-level files only.
        seed, split_fractions: the split by model.
        overwrite: replace whatever ``out_dir`` holds.

    Raises:
        ValueError: files of different architectures, checkpoints that do not fit ``arch``, two
            files for one (model, epoch), bad properties rows (each named), or no checkpoints.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder")
    walk = src.rglob("*") if recursive else src.iterdir()
    files = sorted(
        (p for p in walk if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES
         and not any(part.startswith(".") for part in p.relative_to(src).parts)),
        key=lambda p: _natural_key(p.relative_to(src).as_posix()),
    )
    if not files:
        nested = [] if recursive else [p for p in src.rglob("*") if p.suffix in CHECKPOINT_SUFFIXES][:3]
        hint = f"; subfolders hold {len(nested)}+ (e.g. {nested[0].relative_to(src)}): drop --no-recursive" if nested else ""
        raise ValueError(f"{src} holds no checkpoint files ({', '.join('*' + s for s in CHECKPOINT_SUFFIXES)}){hint}")
    rel_of = {p: p.relative_to(src).as_posix() for p in files}
    rels = [rel_of[p] for p in files]
    stems = Counter(_strip_suffix(r) for r in rels)
    dupes = sorted(s for s, n in stems.items() if n > 1)
    if dupes:
        raise ValueError(f"{src}: several checkpoint files share a name {dupes[:5]} (e.g. a.pt and a.safetensors)")

    if properties is None:
        for name in ("properties.csv", "properties.json"):
            if (src / name).exists():
                properties = src / name
                break
    props = _match_properties(_read_properties(Path(properties)), rels, Path(properties)) if properties else {}
    notes = []
    without = [r for r in rels if r not in props]
    if properties is None:
        notes.append("no properties file in the source folder: properties are NaN (unknown)")
    elif without:
        msg = f"{len(without)} of {len(files)} checkpoint(s) have no entry in {Path(properties).name}: {without[:10]}"
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)

    # one architecture per folder
    signatures: dict[tuple, list[str]] = defaultdict(list)
    for path in files:
        signatures[_signature_of_file(path)].append(rel_of[path])
    if len(signatures) > 1:
        groups = sorted(signatures.items(), key=lambda kv: -len(kv[1]))
        ref_sig, ref_files = groups[0]
        lines = [f"{src} mixes {len(signatures)} architectures (different state_dict keys or shapes):"]
        lines.append(f"  reference ({len(ref_files)} file(s), e.g. {ref_files[:3]})")
        for sig, names in groups[1:]:
            lines.append(f"  {names[:5]}{' …' if len(names) > 5 else ''}: {_describe_difference(ref_sig, sig)}")
        lines.append("put each architecture in its own folder and import them separately")
        raise ValueError("\n".join(lines))
    user = _resolve_user_code(arch, build, task, seed=seed)
    if user.reference is not None:  # every file has this signature: one check covers them all
        from sane_hf.zoo.custom import state_dict_difference

        (sig, names), = signatures.items()
        diff = state_dict_difference(user.reference, dict(sig), shapes=not user.keys_only)
        if diff:
            raise ValueError(
                f"the checkpoints ({len(names)}, e.g. {names[0]}) do not fit --arch {user.arch!r} "
                f"(load_state_dict(strict=True)): {diff}; pass the architecture they were saved from"
            )

    # models and epochs: properties columns first, else the layout
    def model_and_epoch(rel: str) -> tuple[str, int | None]:
        rec = props.get(rel, {})
        layout_model, layout_epoch = _layout_of(rel)
        mid = _coerce("model_id", rec.get("model_id"))
        model = f"model_id={mid}" if mid is not None else (
            str(rec["model"]) if rec.get("model") not in (None, "") else layout_model)
        epoch = _coerce("epoch", rec.get("epoch"))
        return model, (epoch if epoch is not None else layout_epoch)

    keys = {rel: model_and_epoch(rel) for rel in rels}
    seen: dict[tuple[str, int], str] = {}
    clashes = []
    for rel, (model, epoch) in keys.items():
        if epoch is None:
            continue
        if (model, epoch) in seen:
            clashes.append(f"{seen[(model, epoch)]} and {rel} (model {model!r}, epoch {epoch})")
        seen[(model, epoch)] = rel
    if clashes:
        raise ValueError(
            f"{src}: two checkpoints for the same model and epoch: {clashes[:5]}; give each file its own "
            "model_id/epoch in the properties file (a 'path' column keys the rows)"
        )
    by_model: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        by_model[keys[rel_of[path]][0]].append(path)
    has_ids = all(k.startswith("model_id=") for k in by_model)
    names = sorted(by_model, key=(lambda k: int(k.split("=", 1)[1])) if has_ids else _natural_key)

    def converter(paths: list[Path]) -> Callable[[], list[dict[str, Any]]]:
        def convert() -> list[dict[str, Any]]:
            out = []
            for path in paths:
                rel = rel_of[path]
                rec = props.get(rel, {})
                values = {
                    col: _coerce(col, rec.get(col)) for col in ZOO_FEATURES if col not in ("weights", "model_id")
                }
                values = {k: v for k, v in values.items() if v is not None}
                if "epoch" not in values and keys[rel][1] is not None:
                    values["epoch"] = keys[rel][1]
                values["state_dict"] = load_checkpoint_file(path)
                out.append(values)
            return out

        return convert

    def units() -> list[_Unit]:
        return [
            _Unit(i, ",".join(rel_of[p] for p in by_model[name]), converter(by_model[name]))
            for i, name in enumerate(names)
        ]

    return _run_import(
        "folder", src, Path(out_dir), units,
        options={"properties": str(properties) if properties is not None else None, "recursive": recursive},
        arch=user.arch, task=user.task, seed=seed, split_fractions=split_fractions,
        overwrite=overwrite, progress=progress, cache_dir=cache_dir, notes=notes, user=user,
    )


# ---------------------------------------------------------------------------------------------
# Model Zoos (Schürholt et al. 2022)
# ---------------------------------------------------------------------------------------------


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}::{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _read_result_lines(path: Path) -> dict[int, dict[str, Any]]:
    """``{epoch: result line}`` from a Model Zoos ``result.json`` (JSON lines)."""
    out: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return out
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            warnings.warn(f"{path}:{n}: unreadable result line skipped ({err})", stacklevel=3)
            continue
        epoch = rec.get("epoch", rec.get("training_iteration"))
        if epoch is None:
            continue
        out[int(epoch)] = rec
    return out


_CKPT_DIR = re.compile(r"^checkpoint_(\d+)$")


def import_modelzoos(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    arch: str | None = None,
    task: str | Callable[[], Any] = "unknown",
    build: Callable[..., torch.nn.Module] | None = None,
    checkpoint_file: str = "checkpoints",
    seed: int = 0,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    overwrite: bool = False,
    progress: bool = True,
    cache_dir: str | None = None,
) -> DatasetDict:
    """Import a zoo in the Model Zoos layout (see the module docs for the mapping).

    Args:
        src: folder whose sub-folders (at any depth) are trials with a ``params.json``.
        arch: architecture name for every row; default ``params["model::type"]`` or ``"unknown"``; or
            your ``"module:callable"`` (see :func:`import_folder` and :mod:`sane_hf.zoo.custom`).
        task: task name for every row, or your ``"module:callable"`` / callable.
        build: your architecture callable itself.
        checkpoint_file: file name inside ``checkpoint_<epoch>/``.
    """
    src = Path(src)
    trials = sorted(p.parent for p in src.rglob("params.json")) if src.is_dir() else []
    first_params = _flatten(json.loads((trials[0] / "params.json").read_text())) if trials else {}
    user = _resolve_user_code(arch or str(first_params.get("model::type", "unknown")), build, task, seed=seed)

    def converter(trial: Path) -> Callable[[], list[dict[str, Any]]]:
        def convert() -> list[dict[str, Any]]:
            params = _flatten(json.loads((trial / "params.json").read_text()))
            hp = {}
            for key, col in MODELZOOS_PARAMS.items():
                if col == "arch":
                    continue
                value = _coerce(col, params.get(key))
                if value is not None:
                    hp[col] = value
            results = _read_result_lines(trial / "result.json")
            ckpts = []
            for d in trial.iterdir():
                m = _CKPT_DIR.match(d.name)
                if d.is_dir() and m and (d / checkpoint_file).exists():
                    ckpts.append((int(m.group(1)), d / checkpoint_file))
            out = []
            for epoch, path in sorted(ckpts):
                values: dict[str, Any] = {**hp, "epoch": epoch}
                res = results.get(epoch, {})
                for col, keys in _RESULT_KEYS.items():
                    value = next((res[k] for k in keys if k in res), None)
                    if _num(value) is not None:
                        values[col] = _num(value)
                values["state_dict"] = load_checkpoint_file(path)
                out.append(values)
            if not out:
                warnings.warn(f"{trial}: no checkpoint_<epoch>/{checkpoint_file} found", stacklevel=3)
            return out

        return convert

    def units() -> list[_Unit]:
        return [_Unit(i, str(t.relative_to(src)), converter(t)) for i, t in enumerate(trials)]

    return _run_import(
        "modelzoos", src, Path(out_dir), units,
        options={"checkpoint_file": checkpoint_file},
        arch=user.arch, task=user.task, seed=seed, split_fractions=split_fractions,
        overwrite=overwrite, progress=progress, cache_dir=cache_dir, user=user,
    )


# ---------------------------------------------------------------------------------------------
# Unterthiner et al. 2020
# ---------------------------------------------------------------------------------------------

_TF_SUFFIX = {
    "kernel": "weight",
    "gamma": "weight",
    "beta": "bias",
    "bias": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}


def _parse_shape(value: Any) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return tuple(int(v) for v in re.findall(r"\d+", str(value)))


def _read_layout(src: Path) -> list[tuple[str, int, int, tuple[int, ...]]]:
    if (src / "layout.csv").exists():
        with open(src / "layout.csv", newline="") as fh:
            records = list(csv.DictReader(fh))
    elif (src / "layout.json").exists():
        records = json.loads((src / "layout.json").read_text())
    else:
        raise FileNotFoundError(f"{src} has no layout.csv or layout.json (varname, start_idx, end_idx, shape)")
    layout = []
    for rec in records:
        try:
            name, start, end = str(rec["varname"]), int(rec["start_idx"]), int(rec["end_idx"])
        except KeyError as err:
            raise ValueError(f"layout record {rec} lacks {err}; columns: varname, start_idx, end_idx, shape") from err
        shape = _parse_shape(rec.get("shape", ""))
        if math.prod(shape) != end - start:
            raise ValueError(f"layout entry {name!r}: shape {shape} holds {math.prod(shape)} values, not {end - start}")
        layout.append((name, start, end, shape))
    return layout


def _tf_key_names(varnames: Sequence[str]) -> list[str]:
    parts = [v.split(":")[0].split("/") for v in varnames]
    prefix = 0
    while all(len(p) > prefix + 2 for p in parts) and len({p[prefix] for p in parts}) == 1:
        prefix += 1
    keys = []
    for p in parts:
        p = p[prefix:]
        p = p[:-1] + [_TF_SUFFIX.get(p[-1], p[-1])]
        keys.append(".".join(p))
    if len(set(keys)) != len(keys):
        raise ValueError(f"layout variable names collide after conversion: {varnames}")
    return keys


def _tf_to_torch(name: str, value: np.ndarray, torch_layout: bool) -> torch.Tensor:
    t = torch.from_numpy(np.array(value, dtype=np.float32, copy=True))
    if torch_layout and name.split(":")[0].endswith("kernel"):
        if t.dim() == 4:  # (h, w, in, out) -> (out, in, h, w)
            t = t.permute(3, 2, 0, 1).contiguous()
        elif t.dim() == 2:  # (in, out) -> (out, in)
            t = t.t().contiguous()
    return t


def import_unterthiner(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    arch: str = "unterthiner-cnn",
    task: str | Callable[[], Any] | None = None,
    build: Callable[..., torch.nn.Module] | None = None,
    torch_layout: bool = True,
    seed: int = 0,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    overwrite: bool = False,
    progress: bool = True,
    cache_dir: str | None = None,
) -> DatasetDict:
    """Import the Unterthiner et al. 2020 CNN zoo layout (see the module docs for the mapping).

    Args:
        src: folder with ``weights.npy``, ``metrics.csv`` and ``layout.csv``/``layout.json``.
        arch: architecture name for every row, or your ``"module:callable"`` (:mod:`sane_hf.zoo.custom`).
        task: task name; default the ``config.dataset`` column, else ``"unknown"``; or your
            ``"module:callable"`` / callable.
        build: your architecture callable itself.
        torch_layout: transpose TensorFlow kernels to PyTorch's layout.
    """
    src = Path(src)
    for name in ("weights.npy", "metrics.csv"):
        if not (src / name).exists():
            raise FileNotFoundError(f"{src / name} not found (Unterthiner layout: weights.npy, metrics.csv, layout.csv)")
    weights = np.load(src / "weights.npy", mmap_mode="r")  # (n_checkpoints, n_params)
    with open(src / "metrics.csv", newline="") as fh:
        metrics = list(csv.DictReader(fh))
    if weights.ndim != 2 or weights.shape[0] != len(metrics):
        raise ValueError(
            f"weights.npy has shape {weights.shape} but metrics.csv has {len(metrics)} rows; expected "
            "[n_checkpoints, n_params] with one metrics row per checkpoint"
        )
    layout = _read_layout(src)
    if max(end for _, _, end, _ in layout) > weights.shape[1]:
        raise ValueError(f"layout addresses more values than weights.npy rows hold ({weights.shape[1]})")
    keys = _tf_key_names([name for name, *_ in layout])
    columns = set(metrics[0]) if metrics else set()
    mapping = {col: next((c for c in cands if c in columns), None) for col, cands in UNTERTHINER_COLUMNS.items()}
    user = _resolve_user_code(arch, build, task, seed=seed)
    task_name = user.task
    task = user.task if task is not None else None

    by_model: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(metrics):
        by_model[rec.get("modeldir") or f"row-{i:08d}"].append(i)
    names = sorted(by_model)

    def converter(rows: list[int]) -> Callable[[], list[dict[str, Any]]]:
        def convert() -> list[dict[str, Any]]:
            out = []
            for i in rows:
                rec = metrics[i]
                values: dict[str, Any] = {}
                for col, source_col in mapping.items():
                    if source_col is not None:
                        value = _coerce(col, rec.get(source_col))
                        if value is not None:
                            values[col] = value
                if task is not None:
                    values["task"] = task
                flat = np.asarray(weights[i])
                sd = OrderedDict(
                    (key, _tf_to_torch(name, flat[start:end].reshape(shape), torch_layout))
                    for key, (name, start, end, shape) in zip(keys, layout)
                )
                values["state_dict"] = sd
                out.append(values)
            return out

        return convert

    def units() -> list[_Unit]:
        return [_Unit(i, name, converter(by_model[name])) for i, name in enumerate(names)]

    return _run_import(
        "unterthiner", src, Path(out_dir), units,
        options={"torch_layout": torch_layout},
        arch=user.arch, task=task_name, seed=seed, split_fractions=split_fractions,
        overwrite=overwrite, progress=progress, cache_dir=cache_dir, user=user,
    )


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------

IMPORT_FORMATS: dict[str, Callable[..., DatasetDict]] = {
    "folder": import_folder,
    "modelzoos": import_modelzoos,
    "unterthiner": import_unterthiner,
}


def import_zoo(format: str, src: str | os.PathLike, out_dir: str | os.PathLike, **kwargs: Any) -> DatasetDict:
    """Import ``src`` in ``format`` (one of :data:`IMPORT_FORMATS`) into the zoo folder ``out_dir``."""
    if format not in IMPORT_FORMATS:
        raise ValueError(f"unknown import format {format!r}; choose one of {sorted(IMPORT_FORMATS)}")
    return IMPORT_FORMATS[format](src, out_dir, **kwargs)
