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
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "atomic_path", "atomic_write_bytes", "atomic_write_text", "JsonConfigMixin", "check_safetensors_header",
    "load_safetensors_file", "load_safetensors_bytes", "FolderLockedError", "folder_lock", "check_output_folder",
    "write_owner_marker", "read_owner_marker", "LOCK_FILE", "OWNER_FILE", "writes_folder", "usual_file_mode",
    "read_json", "flatten_json", "json_default",
]  # fmt: skip


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()  # mkstemp creates 0600 files; ours get the usual mode


def usual_file_mode(*paths: str | os.PathLike) -> None:
    """Give files the usual mode (0666 minus the umask): ``safetensors`` and ``mkstemp`` make 0600 files."""
    for path in paths:
        os.chmod(path, _FILE_MODE)


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


def read_json(path: str | os.PathLike) -> Any | None:
    """The parsed JSON at ``path``, or None when the file is missing; a clear error when it is broken."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def json_default(obj: Any) -> Any:
    """``json.dumps(default=...)`` for the values jobs record: numpy scalars and arrays, paths."""
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def flatten_json(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Scalar leaves of nested dicts as ``(dotted.key, value)``; lists of scalars kept whole, others skipped."""
    out: list[tuple[str, Any]] = []
    if isinstance(data, Mapping):
        for key, value in data.items():
            out += flatten_json(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(data, (int, float, str, bool)) or data is None:
        out.append((prefix, data))
    elif isinstance(data, (list, tuple)) and len(data) <= 8 and all(isinstance(v, (int, float)) for v in data):
        out.append((prefix, list(data)))
    return out


_C = TypeVar("_C", bound="JsonConfigMixin")
_R = TypeVar("_R")


class JsonConfigMixin:
    """``to_dict``/``from_dict``/``to_json_file``/``from_json_file`` for a config dataclass.

    ``from_dict`` rejects unknown fields by name (a typo never falls back to a default silently).
    """

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (tuple fields become lists, as they read back from JSON)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]

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


# ----------------------------------------------------------------------------------------------
# output folders: never clobber someone else's files, one writer at a time

LOCK_FILE = ".sane-hf.lock"
_LOCK_OWNER_FILE = ".sane-hf.lock.json"
#: written by a command into a folder it created, so that a rerun recognises the folder as its own
OWNER_FILE = ".sane-hf-owner.json"
_BOOKKEEPING = {LOCK_FILE, _LOCK_OWNER_FILE, OWNER_FILE}


class FolderLockedError(RuntimeError):
    """Another process is writing the folder (it holds the folder's lock)."""


_HELD_LOCKS: dict[str, list[Any]] = {}  # resolved folder -> [FileLock, depth]: re-entrant within a process


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``filelock`` on ``folder/.sane-hf.lock``) while writing it.

    A second writer, in this or another process or host sharing the file system, fails at once
    with :class:`FolderLockedError` naming the holder (pid, host, command). Re-entrant within a
    process, so a job may call another job that locks the same folder.
    """
    import socket
    import time

    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key][1] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[key][1] -= 1
        return
    lock = FileLock(str(folder / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = "another process"
        try:
            info = json.loads((folder / _LOCK_OWNER_FILE).read_text())
            holder = f"pid {info['pid']} on host {info['host']} ({info['what']}, since {info['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        raise FolderLockedError(
            f"{folder} is being written by {holder}; wait for it to finish (or stop it) before writing there"
        ) from None
    _HELD_LOCKS[key] = [lock, 1]
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}  # fmt: skip
        atomic_write_text(folder / _LOCK_OWNER_FILE, json.dumps(info) + "\n")
        yield
    finally:
        del _HELD_LOCKS[key]
        (folder / _LOCK_OWNER_FILE).unlink(missing_ok=True)
        lock.release()


def read_owner_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``.sane-hf-owner.json`` a command left in ``folder``, or None."""
    try:
        data = json.loads((Path(folder) / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_owner_marker(folder: str | os.PathLike, kind: str, **info: Any) -> None:
    """Mark ``folder`` as written by command ``kind`` (hidden: never pushed to the Hub)."""
    atomic_write_text(Path(folder) / OWNER_FILE, json.dumps({"kind": kind, **info}, sort_keys=True) + "\n")


def check_output_folder(
    folder: str | os.PathLike, *, kind: str, own: bool = False, overwrite: bool = False, flag: str = "--overwrite"
) -> None:
    """Raise unless ``folder`` may be written by command ``kind``: absent, empty, its own, or ``overwrite``.

    "Its own" is ``own=True`` (the caller recognised its files, e.g. a finished zoo with the same
    config) or an owner marker of the same ``kind``. Also refuses a path that is a file and a
    folder that cannot be written, before any work starts.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"output folder {folder} is a file, not a folder: choose another output folder")
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"cannot create output folder {folder}: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write into {folder}: {probe} is read-only; choose a writable output folder")
    if not folder.exists() or overwrite or own:
        return
    marker = read_owner_marker(folder)
    if marker is not None and marker.get("kind") == kind:
        return
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in _BOOKKEEPING)
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise FileExistsError(
            f"output folder {folder} is not empty ({shown}) and was not written by sane-hf {kind}; choose an empty "
            f"folder, or pass {flag} to write into it anyway"
        )


def remove_if_only_bookkeeping(folder: str | os.PathLike) -> None:
    """Remove ``folder`` when it holds nothing but the lock and owner files (a job that failed before writing)."""
    folder = Path(folder)
    if not folder.is_dir() or any(p.name not in _BOOKKEEPING for p in folder.iterdir()):
        return
    for name in _BOOKKEEPING:
        (folder / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


def writes_folder(
    kind: str, locate: Callable[..., tuple[Path, bool, bool] | None]
) -> Callable[[Callable[..., _R]], Callable[..., _R]]:
    """Decorate a job that writes one output folder: check it (:func:`check_output_folder`), hold its lock
    for the whole call and leave an owner marker, so that a rerun recognises the folder.

    ``locate(*args, **kwargs)`` returns ``(folder, own, overwrite)`` for a call, or None to skip the
    guard (the job then reports its own input error before any folder is made). Only rank 0 of an
    ``accelerate launch`` takes the lock.
    """
    import functools

    def decorate(fn: Callable[..., _R]) -> Callable[..., _R]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> _R:
            where = locate(*args, **kwargs)
            if where is None or os.environ.get("RANK", "0") != "0":
                return fn(*args, **kwargs)
            folder, own, overwrite = where
            check_output_folder(folder, kind=kind, own=own, overwrite=overwrite)
            existed = folder.exists()
            try:
                with folder_lock(folder, f"sane-hf {kind}"):
                    if (read_owner_marker(folder) or {}).get("kind") != kind:
                        write_owner_marker(folder, kind)
                    return fn(*args, **kwargs)
            except BaseException:
                if not existed:
                    remove_if_only_bookkeeping(folder)
                raise

        return wrapper

    return decorate
