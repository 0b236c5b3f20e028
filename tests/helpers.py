"""Helpers shared by the tests: a fresh Python process, and a Hub cache laid out by hand (no network here)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------
# a fresh Python process
# ----------------------------------------------------------------------------------------------

_WITHOUT_SANE_HF = '''
import importlib.abc as _importlib_abc
import sys as _sys


class _NoSaneHf(_importlib_abc.MetaPathFinder):  # as on a machine without sane-hf: remote code only
    def find_spec(self, name, path=None, target=None):
        if name == "sane_hf" or name.startswith("sane_hf."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked in this process)", name=name)
        return None


NO_SANE_HF = _NoSaneHf()  # the script may remove it: sys.meta_path.remove(NO_SANE_HF)
_sys.meta_path.insert(0, NO_SANE_HF)
'''


def run_python(
    script: str,
    *args: object,
    cwd: str | os.PathLike,
    env: dict[str, str] | None = None,
    without_sane_hf: bool = False,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run ``script`` (Python source) in a fresh interpreter and assert that it exits 0.

    The process runs in ``cwd`` with ``args`` as ``sys.argv[1:]``, offline, with its own
    ``HF_HOME`` under ``cwd`` (so remote code is loaded afresh, never from another test's module
    cache), one thread, and this checkout's ``sane_hf`` first on the path — or, with
    ``without_sane_hf``, no ``sane_hf`` importable at all (a finder named ``NO_SANE_HF`` refuses it).
    ``env`` overrides single variables. Returns the finished process (``stdout`` as text).
    """
    environ = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_")) and k != "PYTHONPATH"
    }  # fmt: skip
    environ.update(
        PYTHONPATH=str(ROOT), HF_HOME=str(Path(cwd) / "hf-home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
    )  # fmt: skip
    environ.update(env or {})
    source = (_WITHOUT_SANE_HF if without_sane_hf else "") + textwrap.dedent(script)
    proc = subprocess.run(
        [sys.executable, "-c", source, *map(str, args)], cwd=cwd, env=environ, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


# ----------------------------------------------------------------------------------------------
# the Hub cache, as huggingface_hub lays it out after a download
# ----------------------------------------------------------------------------------------------

#: Files stored through LFS on the Hub (their cache blob is named by the sha256 of the content);
#: other files are named by their git blob id (sha1 of ``"blob <size>\0" + content``).
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".parquet", ".arrow", ".npz", ".npy", ".png", ".jpg", ".gz")
_LFS_MIN_BYTES = 10 * 1024 * 1024


def _blob_id(path: Path) -> str:
    size = path.stat().st_size
    lfs = path.suffix in _LFS_SUFFIXES or size >= _LFS_MIN_BYTES
    digest = hashlib.sha256() if lfs else hashlib.sha1(f"blob {size}\0".encode())
    digest.update(path.read_bytes())
    return digest.hexdigest()


def populate_hub_cache(
    folder: str | os.PathLike,
    repo_id: str,
    cache_dir: str | os.PathLike,
    revision_hash: str | None = None,
    *,
    repo_type: str = "model",
    revision: str = "main",
) -> Path:
    """Lay ``folder`` out in the Hub cache ``cache_dir`` as if ``repo_id`` had been downloaded; returns the snapshot.

    Writes ``<cache_dir>/<models|datasets>--org--name/``: ``blobs/<id>`` (sha256 for LFS-type
    files, the git blob sha1 otherwise), ``refs/<revision>`` (the commit hash, no newline) and
    ``snapshots/<hash>/<path>`` (relative symlinks into ``blobs/``). With ``HF_HUB_OFFLINE=1``,
    ``from_pretrained(repo_id)`` and ``pipeline(model=repo_id, trust_remote_code=True)`` then
    resolve ``repo_id`` from the cache. ``revision_hash`` defaults to a hash of the folder's paths
    and contents (the same folder gives the same hash). Hidden files are skipped.
    """
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(folder)
    files = sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )  # fmt: skip
    if not files:
        raise ValueError(f"{folder} holds no files to cache")
    blob_ids = {rel: _blob_id(folder / rel) for rel in files}
    if revision_hash is None:
        digest = hashlib.sha1()
        for rel in files:
            digest.update(f"{rel}\0{blob_ids[rel]}\0".encode())
        revision_hash = digest.hexdigest()
    if len(revision_hash) != 40 or any(c not in "0123456789abcdef" for c in revision_hash):
        raise ValueError(f"revision_hash must be 40 lowercase hex digits (a commit hash), got {revision_hash!r}")

    repo_dir = Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    blobs, snapshot = repo_dir / "blobs", repo_dir / "snapshots" / revision_hash
    blobs.mkdir(parents=True, exist_ok=True)
    for rel in files:
        blob = blobs / blob_ids[rel]
        if not blob.exists():
            shutil.copyfile(folder / rel, blob)
        target = snapshot / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        target.symlink_to(os.path.relpath(blob, target.parent))
    ref = repo_dir / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(revision_hash)
    return snapshot
