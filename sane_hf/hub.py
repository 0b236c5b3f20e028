"""Hub-ready SANE model folders, and publishing checkpoints and model zoos on the Hugging Face Hub.

A model folder (:func:`save_sane_pipeline`, :func:`save_model_folder`) holds the weights, the
tokenizer, ``config.json`` with ``auto_map`` and ``custom_pipelines``, and the remote code: the
package's own files (:func:`remote_code_files`), copied unchanged by transformers.

Models
------
:func:`push_model` publishes a trained model folder (``sane-hf train`` output) as a self-contained
Hub repo: ``config.json`` with ``auto_map`` (``AutoConfig``/``AutoModel``) and ``custom_pipelines``
(``weight-sampling``), the remote-code files (``configuration_sane.py``, ``modeling_sane.py``,
``pipeline_sane.py`` and every file they import relatively), ``model.safetensors``, the tokenizer
(``weight_tokenizer.json``), the run's configs and measurements, and a model card (``README.md``).

It never pushes the training folder as it is. It stages a fresh folder
(:func:`prepare_model_folder`): load model and tokenizer, save them through
:func:`save_sane_pipeline` (which writes code, ``auto_map`` and
``custom_pipelines`` together), copy the measurements, render the card, then check that every
module named in ``config.json`` is present with its relative imports (:func:`check_model_folder`).
The whole folder goes up in **one commit** (``HfApi.create_commit`` with a
``CommitOperationAdd`` per file). Measured pitfall this avoids: ``model.push_to_hub`` after
``pipe.save_pretrained`` uploads a ``config.json`` that names ``pipeline_sane.py`` without
uploading the file, so ``pipeline(model=repo_id, trust_remote_code=True)`` fails for everyone else.

Zoos
----
:func:`push_zoo` uploads a zoo folder (``sane-hf zoo build``/``import`` output) **as it is**, in one
commit: ``README.md`` (the dataset card, whose YAML ``configs`` map splits to ``data/<split>-*``),
``zoo_config.json``, ``zoo_summary.json`` and the parquet shards under ``data/``. The folder layout
is already what ``datasets.load_dataset(repo_id)`` reads, so nothing is re-encoded, and the card
body, its ``configs``/``dataset_info`` and the zoo's JSON files arrive byte for byte. (The
alternative, ``DatasetDict.push_to_hub``, re-writes every shard, generates its own card metadata and
does not carry ``zoo_config.json``, which ``load_zoo_config``, the trainer and the sampler read.)

Model cards
-----------
The card (``README.md``) is rendered by :func:`sane_hf.cards.render_model_card` from the files of
the folder; in a staged (pushed) folder the probe and sampling measurements always sit at the top
level under the names ``probe_metrics.json`` and ``sampling_metrics.json``.

Tokens are passed to ``huggingface_hub`` only; nothing here prints or logs them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sane_hf.cards.model_card import render_model_card, write_model_card
from sane_hf.constants import (
    CARD_FILE,
    PARTIAL_DIR,
    PROBE_METRICS_FILE,
    SAMPLING_METRICS_FILE,
    TOKENIZER_FILE,
    TRAINING_CONFIG_FILE,
    TRAINING_METRICS_FILE,
    ZOO_CONFIG_FILE,
    ZOO_SUMMARY_FILE,
    find_metrics_file,
)
from sane_hf.serialization import flatten_json, read_json

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import CommitInfo

__all__ = [
    "PushResult",
    "remote_code_files",
    "save_sane_pipeline",
    "save_model_folder",
    "PIPELINE_TASKS",
    "prepare_model_folder",
    "check_model_folder",
    "push_model",
    "zoo_files",
    "push_zoo",
]

logger = logging.getLogger(__name__)

#: Copied from the model folder into the staged repo when present (besides what save_sane_pipeline writes).
_EXTRA_FILES = (TRAINING_METRICS_FILE, PROBE_METRICS_FILE, SAMPLING_METRICS_FILE, ZOO_CONFIG_FILE, TRAINING_CONFIG_FILE)
SAMPLING_PIPELINE_TASK = "weight-sampling"
EMBEDDING_PIPELINE_TASK = "weight-embedding"
#: The pipelines every saved model folder registers in ``config.json`` (``custom_pipelines``).
PIPELINE_TASKS = (SAMPLING_PIPELINE_TASK, EMBEDDING_PIPELINE_TASK)

_REQUIRED_AUTO = ("AutoConfig", "AutoModel")


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------


@dataclass
class PushResult:
    """What :func:`push_model` / :func:`push_zoo` did.

    Attributes:
        repo_id: the target repo.
        repo_type: ``"model"`` or ``"dataset"``.
        files: the paths in the repo of every file in the commit, sorted.
        staging_dir: the folder the files were uploaded from; None when it was a temporary folder
            (already deleted).
        commit: the ``huggingface_hub.CommitInfo`` of the commit; None on a dry run.
    """

    repo_id: str
    repo_type: str
    files: list[str]
    staging_dir: Path | None = None
    commit: CommitInfo | None = None

    @property
    def url(self) -> str | None:
        """The pull request's URL with ``create_pr=True``, else the commit's URL; None on a dry run."""
        if self.commit is None:
            return None
        return getattr(self.commit, "pr_url", None) or getattr(self.commit, "commit_url", None)


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def _relative_files(folder: Path) -> list[str]:
    """Every regular file under ``folder`` as a POSIX path relative to it, hidden paths excluded."""
    out = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append(rel.as_posix())
    return sorted(out)


def _warn_local_paths(folder: Path, files: Iterable[str]) -> None:
    """Warn (do not block) when a JSON file about to be published records an absolute local path.

    ``zoo_config.json`` of an imported zoo holds the source folder (``import_options.src``) and
    ``training_config.json`` the ``output_dir``; publishing them discloses local folder names.
    """
    for rel in files:
        if not rel.endswith(".json") or rel.count("/"):
            continue
        try:
            data = json.loads((folder / rel).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key, value in flatten_json(data):
            if isinstance(value, str) and len(value) > 1 and (value.startswith("/") or value[1:3] == ":\\"):
                logger.warning("%s records the local path %s = %r; it will be public in the repo", rel, key, value)


def _hf_api(token: str | None):
    from huggingface_hub import HfApi

    return HfApi(token=token or None)  # None: HF_TOKEN or the stored login, resolved by huggingface_hub


def remote_code_files() -> list[str]:
    """The package files every saved model folder carries as remote code, sorted.

    The model's and the pipeline's modules and, recursively, every file they import relatively —
    what ``save_pretrained`` copies (the same rule transformers applies when it copies them).
    """
    from transformers.dynamic_module_utils import get_relative_import_files

    package = Path(__file__).resolve().parent
    names = {"configuration_sane.py", "modeling_sane.py", "pipeline_sane.py"}
    for name in sorted(names):
        names |= {Path(p).name for p in get_relative_import_files(str(package / name))}
    return sorted(names)


def save_sane_pipeline(
    model: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    tasks: tuple[str, ...] = (SAMPLING_PIPELINE_TASK,),
) -> Path:
    """Write a folder that ``pipeline(model=out_dir, trust_remote_code=True)`` loads anywhere.

    Saves the model (weights, ``config.json`` with ``auto_map`` and ``custom_pipelines``, its
    remote code), ``weight_tokenizer.json`` and the pipeline code with everything it imports
    relatively (copied by transformers, byte for byte; see :mod:`sane_hf.pipeline_sane`). ``tasks``
    lists the pipelines written into ``custom_pipelines``: with only ``"weight-sampling"`` (the
    default) ``pipeline(model=out_dir, trust_remote_code=True)`` needs no task name; adding
    ``"weight-embedding"`` also makes ``pipeline("weight-embedding", model=out_dir,
    trust_remote_code=True)`` work without ``sane_hf`` installed, but then the task must always be named.

    Returns the folder.
    """
    from sane_hf.pipeline_sane import WeightEmbeddingPipeline, WeightSamplingPipeline

    classes = {SAMPLING_PIPELINE_TASK: WeightSamplingPipeline, EMBEDDING_PIPELINE_TASK: WeightEmbeddingPipeline}
    unknown = [t for t in tasks if t not in classes]
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {tuple(classes)}, got {tasks}")
    out = Path(out_dir)
    device = next(model.parameters()).device
    entries: dict[str, Any] = {}
    for task in tasks:
        pipe = classes[task](model=model, weight_tokenizer=tokenizer, device=device, task=task)
        pipe.save_pretrained(out)
        entries.update(model.config.custom_pipelines)
    if len(entries) > 1:  # each save wrote only its own task: merge them into config.json
        config_file = out / "config.json"
        data = json.loads(config_file.read_text())
        data["custom_pipelines"] = entries
        config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    model.config.custom_pipelines = entries
    return out


def save_model_folder(
    model: Any,
    tokenizer: Any,
    folder: str | os.PathLike,
    *,
    card: bool = True,
    model_name: str | None = None,
) -> Path:
    """Write ``folder`` as a loadable, pipeline-ready SANE checkpoint (every command that writes a model uses this).

    Weights, ``weight_tokenizer.json``, the remote code, ``config.json`` with ``auto_map`` and
    ``custom_pipelines`` for both :data:`PIPELINE_TASKS` (through
    :func:`save_sane_pipeline`), and, with ``card=True``, the model card
    ``README.md`` rendered from the measurements already in the folder. Afterwards, in any process,
    ``pipeline("weight-sampling", model=folder, trust_remote_code=True)`` and
    ``pipeline("weight-embedding", model=folder, trust_remote_code=True)`` load it (with two
    pipelines in ``config.json`` the task must be named).
    """
    folder = Path(folder)
    save_sane_pipeline(model, tokenizer, folder, tasks=PIPELINE_TASKS)
    if card:
        write_model_card(folder, model_name=model_name)
    return folder


# ----------------------------------------------------------------------------------------------
# staging and checking a model repo
# ----------------------------------------------------------------------------------------------


def _module_refs(config: Mapping[str, Any]) -> list[str]:
    """``module.Class`` references of ``auto_map`` and ``custom_pipelines`` (tokenizer pairs flattened)."""
    refs: list[str] = []
    for value in (config.get("auto_map") or {}).values():
        refs += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str)]
    for task in (config.get("custom_pipelines") or {}).values():
        impl = task.get("impl") if isinstance(task, Mapping) else None
        if isinstance(impl, str):
            refs.append(impl)
    return refs


def check_model_folder(folder: str | os.PathLike, *, require_card: bool = True) -> list[str]:
    """Problems that would make ``folder`` a broken Hub repo; an empty list when it is complete.

    Checks: ``config.json``, weights and ``weight_tokenizer.json`` (and ``README.md`` when
    ``require_card``) exist; ``auto_map`` names ``AutoConfig`` and ``AutoModel``;
    ``custom_pipelines`` has ``weight-sampling``; every module named there is in the folder (not in
    another repo), and so are the files those modules import relatively, recursively (found the way
    ``transformers`` finds them when it loads remote code).
    """
    from transformers.dynamic_module_utils import get_relative_imports

    folder = Path(folder)
    problems: list[str] = []
    config = read_json(folder / "config.json")
    if config is None:
        return [f"{folder} holds no config.json"]
    required = [TOKENIZER_FILE] + ([CARD_FILE] if require_card else [])
    if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
        problems.append("no model.safetensors (or model.safetensors.index.json)")
    problems += [f"no {name}" for name in required if not (folder / name).is_file()]
    auto_map = config.get("auto_map") or {}
    problems += [f"config.json: auto_map has no {key}" for key in _REQUIRED_AUTO if key not in auto_map]
    if SAMPLING_PIPELINE_TASK not in (config.get("custom_pipelines") or {}):
        problems.append(f"config.json: custom_pipelines has no {SAMPLING_PIPELINE_TASK!r}")

    pending = []
    for ref in _module_refs(config):
        if "--" in ref:
            problems.append(f"config.json refers to code in another repo: {ref!r}")
            continue
        module = ref.rsplit(".", 1)[0]
        pending.append(module.replace(".", "/") + ".py")
    seen: set[str] = set()
    while pending:
        rel = pending.pop()
        if rel in seen:
            continue
        seen.add(rel)
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is referenced (config.json or a relative import) but not in the folder")
            continue
        base = Path(rel).parent
        for imported in get_relative_imports(str(path)):
            pending.append((base / (imported.replace(".", "/") + ".py")).as_posix())
    return problems


def prepare_model_folder(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    dataset_repo_id: str | None = None,
) -> Path:
    """Stage ``folder`` (a trained model folder) into ``out_dir`` as a complete Hub model repo.

    Loads the :class:`~sane_hf.modeling_sane.SaneModel` and its :class:`WeightTokenizer`, saves
    them with :func:`save_sane_pipeline` (weights, tokenizer, remote code,
    ``auto_map``, ``custom_pipelines``), copies the configs and measurements (the probe and sampling
    metrics under their flat names, see the module docstring), renders the model card into
    ``README.md`` and checks the result with :func:`check_model_folder`.

    Args:
        folder: the model folder (``config.json``, ``model.safetensors``, ``weight_tokenizer.json``).
        out_dir: the staging folder; must not exist or be empty.
        repo_id, dataset_repo_id: passed to :func:`sane_hf.cards.render_model_card`.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        FileNotFoundError: ``folder`` is not a model folder.
        FileExistsError: ``out_dir`` is not empty.
        ValueError: the staged folder fails :func:`check_model_folder` (the message lists why).
    """
    from sane_hf.modeling_sane import SaneModel
    from sane_hf.tokenization_sane import WeightTokenizer

    folder, out_dir = Path(folder), Path(out_dir)
    missing = [name for name in ("config.json", TOKENIZER_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a SANE model folder: {', '.join(missing)} missing (pass the output folder of "
            "`sane-hf train`, or a folder written by SaneModel.save_pretrained + WeightTokenizer.save_pretrained)"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"staging folder {out_dir} is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)

    model = SaneModel.from_pretrained(folder)
    tokenizer = WeightTokenizer.from_pretrained(folder)
    save_model_folder(model, tokenizer, out_dir, card=False)
    for name in _EXTRA_FILES:
        source = find_metrics_file(folder, name)
        if source is not None and not (out_dir / name).exists():
            shutil.copyfile(source, out_dir / name)
    card = render_model_card(out_dir, repo_id, dataset_repo_id=dataset_repo_id)
    card.save(out_dir / CARD_FILE)
    problems = check_model_folder(out_dir)
    if problems:
        raise ValueError(f"the staged model repo in {out_dir} is incomplete: " + "; ".join(problems))
    return out_dir


# ----------------------------------------------------------------------------------------------
# pushing
# ----------------------------------------------------------------------------------------------


def _commit_folder(
    staging: Path,
    files: Sequence[str],
    repo_id: str,
    repo_type: str,
    *,
    private: bool | None,
    token: str | None,
    commit_message: str,
    commit_description: str | None,
    create_pr: bool,
    revision: str | None,
) -> CommitInfo:
    """``create_repo(exist_ok=True)`` then one ``create_commit`` with a ``CommitOperationAdd`` per file."""
    from huggingface_hub import CommitOperationAdd

    api = _hf_api(token)
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(staging / rel)) for rel in files]
    logger.info("pushing %d files to the %s repo %s", len(operations), repo_type, repo_id)
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message,
        commit_description=commit_description,
        repo_type=repo_type,
        revision=revision,
        create_pr=create_pr,
    )


class _staging:
    """Context manager: the given folder (kept), or a temporary one (deleted on exit)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> Path:
        if self.path is not None:
            return self.path
        self._tmp = tempfile.TemporaryDirectory(prefix="sane-hf-push-")
        return Path(self._tmp.name) / "repo"

    def __exit__(self, *exc: Any) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def push_model(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    dataset_repo_id: str | None = None,
    dry_run: bool = False,
    staging_dir: str | os.PathLike | None = None,
) -> PushResult:
    """Publish a trained SANE model folder on the Hub as a self-contained repo (one commit).

    The folder is staged by :func:`prepare_model_folder` (code, ``auto_map``,
    ``custom_pipelines``, tokenizer, weights, configs, measurements, ``README.md`` card), then
    ``HfApi.create_repo(repo_id, exist_ok=True)`` and ``HfApi.create_commit`` with one
    ``CommitOperationAdd`` per staged file. Afterwards anyone can run
    ``SaneModel.from_pretrained(repo_id)``, ``AutoModel.from_pretrained(repo_id, trust_remote_code=True)``
    and ``pipeline(model=repo_id, trust_remote_code=True)``.

    Args:
        folder: the model folder (``sane-hf train`` output).
        repo_id: ``"user/name"``.
        private: create the repo private (an existing repo keeps its visibility); None = Hub default.
        token: a Hub token; None = ``HF_TOKEN`` or the stored login. Never printed or logged.
        commit_message, commit_description: of the commit (a default message names the file count).
        create_pr: open a pull request instead of committing to the branch.
        revision: the branch to commit to (default ``main``).
        dataset_repo_id: the Hub id of the training zoo, linked from the card.
        dry_run: stage and list the files only; no network.
        staging_dir: stage here and keep the folder (must not exist or be empty); default: a
            temporary folder, deleted afterwards.

    Returns:
        :class:`PushResult` (``files``, ``commit``, ``url``).

    Example::

        >>> from sane_hf.hub import push_model  # doctest: +SKIP
        >>> push_model("runs/sane-digits", "me/sane-digits", private=True).url  # doctest: +SKIP
        'https://huggingface.co/me/sane-digits/commit/…'
    """
    with _staging(staging_dir) as staging:
        prepare_model_folder(folder, staging, repo_id=repo_id, dataset_repo_id=dataset_repo_id)
        files = _relative_files(staging)
        _warn_local_paths(staging, files)
        result = PushResult(repo_id, "model", files, staging_dir=Path(staging_dir) if staging_dir else None)
        if dry_run:
            return result
        result.commit = _commit_folder(
            staging, files, repo_id, "model",
            private=private, token=token, create_pr=create_pr, revision=revision,
            commit_message=commit_message or f"Upload SANE model ({len(files)} files) with sane-hf",
            commit_description=commit_description,
        )
        return result


def zoo_files(zoo_folder: str | os.PathLike) -> list[str]:
    """The files of a complete zoo folder that make its dataset repo, as sorted repo paths.

    ``README.md`` (dataset card), ``zoo_config.json``, ``zoo_summary.json`` (when present) and the
    parquet shards under ``data/``; hidden files (``.partial`` of an unfinished build, temp
    folders) and anything else are left out.

    Raises:
        FileNotFoundError: not a zoo folder, or an unfinished build (``.partial`` present).
        ValueError: the card has no ``configs``, or a ``data_files`` pattern of the card matches no shard.
    """
    from huggingface_hub import DatasetCard

    folder = Path(zoo_folder)
    if not (folder / ZOO_CONFIG_FILE).is_file() or (folder / PARTIAL_DIR).exists():
        raise FileNotFoundError(
            f"{folder} is not a complete zoo folder (it needs {ZOO_CONFIG_FILE} and no .partial/): "
            "finish `sane-hf zoo build` / `zoo import` first"
        )
    if not (folder / CARD_FILE).is_file():
        raise FileNotFoundError(f"{folder} holds no {CARD_FILE} dataset card")
    shards = [f for f in _relative_files(folder) if f.startswith("data/") and f.endswith(".parquet")]
    configs = DatasetCard.load(folder / CARD_FILE).data.to_dict().get("configs") or []
    if not configs:
        raise ValueError(f"the dataset card {folder / CARD_FILE} has no `configs`: load_dataset could not find the splits")
    for config in configs:
        data_files = config.get("data_files") or []
        entries = data_files if isinstance(data_files, list) else [data_files]
        for entry in entries:
            patterns = entry.get("path") if isinstance(entry, Mapping) else entry
            for pattern in [patterns] if isinstance(patterns, str) else patterns or []:
                if not any(fnmatch(shard, pattern) or fnmatch(shard, pattern + ".parquet") for shard in shards):
                    raise ValueError(f"the dataset card's data_files pattern {pattern!r} matches no shard in {folder}")
    names = [CARD_FILE, ZOO_CONFIG_FILE] + ([ZOO_SUMMARY_FILE] if (folder / ZOO_SUMMARY_FILE).is_file() else [])
    return sorted(names + shards)


def push_zoo(
    zoo_folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
) -> PushResult:
    """Publish a zoo folder as a Hub dataset repo, as it is, in one commit (see the module docstring).

    The files are :func:`zoo_files` (card with ``configs``, ``zoo_config.json``,
    ``zoo_summary.json``, ``data/*.parquet``); afterwards ``datasets.load_dataset(repo_id)`` and
    ``sane_hf.zoo.load_zoo(repo_id)`` read the same splits as from the folder. Arguments as for
    :func:`push_model`.
    """
    folder = Path(zoo_folder)
    files = zoo_files(folder)
    _warn_local_paths(folder, files)
    result = PushResult(repo_id, "dataset", files, staging_dir=folder)
    if dry_run:
        return result
    result.commit = _commit_folder(
        folder, files, repo_id, "dataset",
        private=private, token=token, create_pr=create_pr, revision=revision,
        commit_message=commit_message or f"Upload model zoo ({len(files)} files) with sane-hf",
        commit_description=commit_description,
    )
    return result
