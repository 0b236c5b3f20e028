"""The ``folder`` format: checkpoint files below a folder plus an optional properties table, see :mod:`sane_hf.zoo.importers`."""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import DatasetDict

from sane_hf.zoo.dataset import (
    ZOO_FEATURES,
)
from sane_hf.zoo.importers.checkpoints import (
    CHECKPOINT_SUFFIXES,
    _describe_difference,
    _signature_of_file,
    load_checkpoint_file,
)
from sane_hf.zoo.importers.common import _coerce, _columns_from, _resolve_user_code, _run_import, _units

__all__ = ["import_folder"]

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

    columns = {col: col for col in ZOO_FEATURES if col not in ("weights", "model_id")}

    def convert(paths: list[Path]) -> list[dict[str, Any]]:
        out = []
        for path in paths:
            rel = rel_of[path]
            values = _columns_from(props.get(rel, {}), columns)
            if "epoch" not in values and keys[rel][1] is not None:
                values["epoch"] = keys[rel][1]
            out.append({**values, "state_dict": load_checkpoint_file(path)})
        return out

    return _run_import(
        "folder", src, Path(out_dir), _units([(",".join(rel_of[p] for p in by_model[n]), by_model[n]) for n in names], convert),
        options={"properties": str(properties) if properties is not None else None, "recursive": recursive},
        user=user, seed=seed, split_fractions=split_fractions, overwrite=overwrite, progress=progress,
        cache_dir=cache_dir, notes=notes,
    )  # fmt: skip
