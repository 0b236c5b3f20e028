"""The entry ``sane-hf zoo import`` calls: :func:`import_zoo` picks the importer of a format by name."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from datasets import DatasetDict

from sane_hf.zoo.importers.folder import import_folder
from sane_hf.zoo.importers.modelzoos import import_modelzoos
from sane_hf.zoo.importers.unterthiner import import_unterthiner

__all__ = ["IMPORT_FORMATS", "import_zoo"]

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
