"""The import machinery every source format shares.

:func:`_resolve_user_code` resolves ``arch``/``task`` (names, ``module:callable`` entry points or
callables, :mod:`sane_hf.zoo.custom`) into the module every checkpoint must load into;
:func:`_run_import` converts a source's models (:class:`_Unit`, listed by :func:`_units`) into part
files, resumably, and assembles the zoo folder (splits, card, ``zoo_config.json``,
``zoo_summary.json``) from them. :func:`_columns_from` reads a checkpoint's zoo column values from a
source record (:func:`_coerce` turns each into the column's type).
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from datasets import DatasetDict

from sane_hf.state_dict_io import state_dict_to_bytes
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

__all__: list[str] = []  # private machinery: the format modules import it by name

_T = TypeVar("_T")

#: properties an importer tries to fill (``ggap`` is derived)
_MEASURED = tuple(p for p in PROPERTY_COLUMNS if p != "ggap")


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


@dataclass
class _Unit:
    """One model of the source: ``convert()`` returns its checkpoints as value dicts with a ``state_dict``."""

    model_id: int
    source: str
    convert: Callable[[], list[dict[str, Any]]]

    @property
    def part(self) -> str:
        return f"model-{self.model_id:06d}"


def _units(sources: Sequence[tuple[str, _T]], convert: Callable[[_T], list[dict[str, Any]]]) -> Callable[[], list[_Unit]]:
    """The models of a source, in order (model id = position): ``(label, item)`` pairs, each converted by
    ``convert(item)`` into its checkpoints' value dicts (zoo columns and a ``state_dict``) when imported."""
    return lambda: [_Unit(i, label, partial(convert, item)) for i, (label, item) in enumerate(sources)]


def _columns_from(record: Mapping[str, Any], sources: Mapping[str, str | Sequence[str]]) -> dict[str, Any]:
    """The zoo column values ``record`` holds: for each zoo column of ``sources``, the value of its first
    source key present in ``record`` (one key, or several to try in order), as the column's type; a
    missing or unreadable value is left out (the zoo fills in "unknown")."""
    values = {}
    for column, keys in sources.items():
        key = next((k for k in ((keys,) if isinstance(keys, str) else keys) if k in record), None)
        value = _coerce(column, record[key]) if key is not None else None
        if value is not None:
            values[column] = value
    return values


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
    user: _UserCode,
    seed: int,
    split_fractions: Sequence[float],
    overwrite: bool,
    progress: bool,
    cache_dir: str | None,
    notes: Sequence[str] = (),
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
