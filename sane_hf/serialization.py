"""Atomic file writes and JSON round trips of typed config dataclasses, shared by the zoo and the trainer.

Writes go to a temporary file in the target's folder, are flushed to disk, and replace the target
with ``os.replace``: a reader never sees half a file, and a killed job leaves the old file or
nothing. (``tokenization_sane.py`` keeps its own copy: it travels to the Hub as self-contained code.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "atomic_path", "atomic_write_bytes", "atomic_write_text", "JsonConfigMixin", "check_safetensors_header",
    "load_safetensors_file", "load_safetensors_bytes",
]  # fmt: skip


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()  # mkstemp creates 0600 files; ours get the usual mode


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    For writers that want a file name (``pyarrow.parquet.write_table``, ``safetensors``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, _FILE_MODE)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


_C = TypeVar("_C", bound="JsonConfigMixin")


class JsonConfigMixin:
    """``to_dict``/``from_dict``/``to_json_file``/``from_json_file`` for a config dataclass.

    ``from_dict`` rejects unknown fields by name (a typo never falls back to a default silently).
    """

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_C], data: Mapping[str, Any]) -> _C:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(names)}")
        return cls(**dict(data))

    def to_json_file(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json_file(cls: type[_C], path: str | os.PathLike) -> _C:
        return cls.from_dict(json.loads(Path(path).read_text()))


# ----------------------------------------------------------------------------------------------
# reading safetensors with clear errors (never a pickle)

#: the largest safetensors header accepted (the format's own limit is 100 MB)
MAX_SAFETENSORS_HEADER = 100_000_000


def _check_header_length(header_len: int, total: int, name: str) -> None:
    if header_len > min(total - 8, MAX_SAFETENSORS_HEADER):
        raise ValueError(
            f"{name} is truncated or not a safetensors file: its header claims {header_len} bytes but the file has "
            f"{total} bytes; re-save or re-download it"
        )


def check_safetensors_header(path: str | os.PathLike) -> None:
    """Raise ``ValueError`` naming ``path`` when it cannot be a safetensors file (too short, absurd header)."""
    path = Path(path)
    total = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8:
        raise ValueError(f"{path} is truncated or not a safetensors file ({total} bytes); re-save or re-download it")
    _check_header_length(int.from_bytes(head, "little"), total, str(path))


def load_safetensors_file(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """``safetensors.torch.load_file`` with a one-line ``ValueError`` naming the file when it is damaged."""
    import safetensors
    import safetensors.torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    check_safetensors_header(path)
    try:
        return safetensors.torch.load_file(str(path))
    except (safetensors.SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"{what} {path} cannot be read ({err}); it is truncated or not a safetensors file") from None


def load_safetensors_bytes(data: bytes, name: str = "data") -> dict[str, Any]:
    """``safetensors.torch.load`` on bytes with a one-line ``ValueError`` naming ``name`` when they are damaged."""
    import safetensors
    import safetensors.torch

    if len(data) < 8:
        raise ValueError(f"{name} is truncated or not safetensors data ({len(data)} bytes)")
    _check_header_length(int.from_bytes(data[:8], "little"), len(data), name)
    try:
        return safetensors.torch.load(data)
    except (safetensors.SafetensorError, RuntimeError, ValueError) as err:
        raise ValueError(f"{name} cannot be read ({err}); it is truncated or not safetensors data") from None
