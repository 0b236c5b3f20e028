"""Resumable training state: the pickle-free checkpoint format of a run.

Owns ``output_dir/checkpoints/checkpoint_<step>/``: what is written (model, optimizer, schedule,
loop state and every process's RNG state as safetensors + JSON, ``checkpoint.json`` last), how it
is written atomically (a temporary folder renamed into place, the newest ``save_total_limit``
kept), how it is read back (:func:`check_checkpoint_format` refuses pickled folders before
anything is loaded) and whether a run may resume from it (same settings, model config and zoo
fingerprint). The loop that calls these lives in :mod:`sane_hf.training.loop`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sane_hf.constants import TRAINING_CONFIG_FILE
from sane_hf.training.config import SaneTrainingConfig

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator

    from sane_hf.configuration_sane import SaneConfig

__all__ = ["CHECKPOINTS_DIR", "CHECKPOINT_MANIFEST", "latest_checkpoint", "check_checkpoint_format"]

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
_CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")
_TMP_PREFIX = ".tmp_"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoints/checkpoint_<step>`` folder of a run, or None."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))]
    return max(found)[1] if found else None



class _LoopState:
    """The loop's own state, saved with ``save_state`` via ``register_for_checkpointing``."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batches_in_epoch = 0
        self.global_step = 0
        self.train_seconds = 0.0
        self.tokens_seen = 0
        self.recent_losses: list[float] = []  # per-step losses (mean over processes) since the last log
        self.last_logged_loss: float | None = None
        self.history: list[dict[str, Any]] = []  # evaluations

    def state_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in vars(self).items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)




# ----------------------------------------------------------------------------------------------
# checkpoints: pickle-free training state
# ----------------------------------------------------------------------------------------------

CHECKPOINT_MANIFEST = "checkpoint.json"
_CHECKPOINT_FORMAT = "sane-hf-training-checkpoint"
_CHECKPOINT_VERSION = 1
_MODEL_FILE = "model.safetensors"
_OPTIMIZER_TENSORS = "optimizer.safetensors"
_OPTIMIZER_JSON = "optimizer.json"
_SCHEDULER_JSON = "scheduler.json"
_LOOP_JSON = "loop_state.json"
_SCALER_JSON = "scaler.json"
# files other tools write into checkpoint folders (Accelerate's save_state, torch.save): never loaded
_FOREIGN_SUFFIXES = (".pkl", ".bin", ".pt", ".pth", ".pickle")


def _rng_files(rank: int) -> tuple[str, str]:
    return f"rng_state_{rank}.safetensors", f"rng_state_{rank}.json"


def _to_json(value: Any) -> Any:
    """Plain JSON for optimizer/scheduler state values; tuples are tagged so they come back as tuples."""
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v) for v in value]}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a JSON checkpoint file")


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _flatten_optimizer_state(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> (tensors for safetensors, the rest as JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    per_param: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state["state"].items():
        entry: dict[str, Any] = {}
        for name, value in param_state.items():
            if torch.is_tensor(value):
                key = f"state.{param_id}.{name}"
                tensors[key] = value.detach().to("cpu").contiguous()
                entry[name] = {"__tensor__": key}
            else:
                entry[name] = _to_json(value)
        per_param[str(param_id)] = entry
    return tensors, {"state": per_param, "param_groups": _to_json(list(state["param_groups"]))}


def _unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for param_id, entry in meta["state"].items():
        state[int(param_id)] = {
            name: tensors[value["__tensor__"]] if isinstance(value, dict) and "__tensor__" in value else _from_json(value)
            for name, value in entry.items()
        }
    return {"state": state, "param_groups": _from_json(meta["param_groups"])}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states: python ``random``, numpy's global generator, torch CPU and CUDA."""
    import random

    import numpy as np

    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    meta: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "cuda_devices": 0,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states = torch.cuda.get_rng_state_all()
        meta["cuda_devices"] = len(states)
        tensors.update({f"torch_cuda_{i}": s for i, s in enumerate(states)})
    return tensors, meta


def _set_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    import random

    import numpy as np

    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npm = meta["numpy"]
    np.random.set_state(
        (npm["kind"], tensors["numpy_keys"].numpy().astype(np.uint32), npm["pos"], npm["has_gauss"], npm["cached_gaussian"])
    )
    torch.set_rng_state(tensors["torch_cpu"])
    n_cuda = int(meta.get("cuda_devices", 0))
    if n_cuda and torch.cuda.is_available():
        states = [tensors[f"torch_cuda_{i}"] for i in range(n_cuda)]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file {path} is missing: the checkpoint is incomplete") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint file {path} is not valid JSON ({err}); the checkpoint is damaged") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from sane_hf.serialization import load_safetensors_file

    return load_safetensors_file(path, what="checkpoint file")


def _foreign_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(_FOREIGN_SUFFIXES))


def check_checkpoint_format(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a sane-hf checkpoint folder; a clear error for anything else (nothing is unpickled).

    A folder written by an older sane-hf (``accelerate.save_state``: ``custom_checkpoint_*.pkl``,
    ``random_states_*.pkl``, ``optimizer.bin``) is refused: loading those pickles can run code.
    """
    folder = Path(checkpoint)
    manifest_path = folder / CHECKPOINT_MANIFEST
    if not manifest_path.is_file():
        pickles = _foreign_files(folder) if folder.is_dir() else []
        if pickles:
            raise ValueError(
                f"checkpoint {folder} holds pickled training state ({', '.join(pickles)}) written by an older sane-hf "
                "or another tool; pickles can run code and are never loaded. Start a new run (another --out, or "
                "--overwrite_output_dir to delete this one)"
            )
        raise ValueError(f"{folder} is not a sane-hf checkpoint (no {CHECKPOINT_MANIFEST}); it cannot be resumed")
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{manifest_path} is not a sane-hf training checkpoint manifest")
    if manifest.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(
            f"{manifest_path} has checkpoint format version {manifest.get('version')!r}; this sane-hf reads version "
            f"{_CHECKPOINT_VERSION}: resume with the sane-hf version that wrote it"
        )
    return manifest


def _save_training_state(
    accelerator: Accelerator, folder: Path, model: nn.Module, optimizer: Any, scheduler: Any, state: _LoopState,
    extra_manifest: Mapping[str, Any],
) -> None:
    """Write model, optimizer, schedule, loop and RNG state into ``folder`` as safetensors + JSON (no pickle)."""
    import safetensors.torch

    from sane_hf.serialization import usual_file_mode

    rank = accelerator.process_index
    rng_tensors, rng_meta = _rng_state()
    tensor_file, json_file = _rng_files(rank)
    safetensors.torch.save_file(rng_tensors, str(folder / tensor_file))
    usual_file_mode(folder / tensor_file)
    (folder / json_file).write_text(json.dumps(rng_meta) + "\n")
    if not accelerator.is_main_process:
        return
    safetensors.torch.save_model(accelerator.unwrap_model(model), str(folder / _MODEL_FILE))
    opt_tensors, opt_meta = _flatten_optimizer_state(optimizer.state_dict())
    safetensors.torch.save_file(opt_tensors, str(folder / _OPTIMIZER_TENSORS))
    (folder / _OPTIMIZER_JSON).write_text(json.dumps(opt_meta) + "\n")
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    (folder / _SCHEDULER_JSON).write_text(json.dumps(_to_json(sched)) + "\n")
    (folder / _LOOP_JSON).write_text(json.dumps(state.state_dict(), indent=1) + "\n")
    if accelerator.scaler is not None:
        (folder / _SCALER_JSON).write_text(json.dumps(_to_json(accelerator.scaler.state_dict())) + "\n")
    usual_file_mode(*(folder / name for name in (_MODEL_FILE, _OPTIMIZER_TENSORS)))
    manifest = {
        "format": _CHECKPOINT_FORMAT, "version": _CHECKPOINT_VERSION, "step": state.global_step,
        "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
        **extra_manifest,
    }  # fmt: skip
    (folder / CHECKPOINT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _load_training_state(
    accelerator: Accelerator, folder: Path, model: nn.Module, optimizer: Any, scheduler: Any, state: _LoopState
) -> None:
    """Restore what :func:`_save_training_state` wrote; reads only safetensors and JSON."""
    import safetensors
    import safetensors.torch

    manifest = check_checkpoint_format(folder)
    if manifest.get("num_processes") != accelerator.num_processes:
        raise ValueError(
            f"checkpoint {folder} was written by {manifest.get('num_processes')} process(es) but this run has "
            f"{accelerator.num_processes}; resume with the same number of processes (exact resume needs each "
            "process's RNG state)"
        )
    ignored = _foreign_files(folder)
    if ignored and accelerator.is_main_process:
        logger.warning("ignoring files in %s that sane-hf did not write (never loaded): %s", folder, ", ".join(ignored))
    unwrapped = accelerator.unwrap_model(model)
    model_file = folder / _MODEL_FILE
    try:
        missing, unexpected = safetensors.torch.load_model(unwrapped, str(model_file), strict=False,
                                                           device=str(accelerator.device))  # fmt: skip
    except (safetensors.SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"checkpoint file {model_file} cannot be read ({err}); the checkpoint is damaged") from None
    if missing or unexpected:
        raise ValueError(
            f"checkpoint file {model_file} does not match the model: missing {sorted(missing)}, unexpected "
            f"{sorted(unexpected)}"
        )
    opt_meta = _read_json(folder / _OPTIMIZER_JSON)
    try:
        optimizer.load_state_dict(_unflatten_optimizer_state(_read_tensors(folder / _OPTIMIZER_TENSORS), opt_meta))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"the optimizer state in {folder} does not fit this model/optimizer ({err})") from None
    sched = _from_json(_read_json(folder / _SCHEDULER_JSON))
    sched["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    scheduler.load_state_dict(sched)
    state.load_state_dict(_read_json(folder / _LOOP_JSON))
    if accelerator.scaler is not None and (folder / _SCALER_JSON).is_file():
        accelerator.scaler.load_state_dict(_from_json(_read_json(folder / _SCALER_JSON)))
    tensor_file, json_file = _rng_files(accelerator.process_index)
    _set_rng_state(_read_tensors(folder / tensor_file), _read_json(folder / json_file))


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------


def _save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    extra: Mapping[str, str],
    total_limit: int | None,
    training_objects: tuple[nn.Module, Any, Any, _LoopState],
    extra_manifest: Mapping[str, Any],
) -> Path:
    """Training state into a temp folder (all processes), then renamed into place (main process)."""
    root = output_dir / CHECKPOINTS_DIR
    final = root / f"checkpoint_{step}"
    tmp = root / f"{_TMP_PREFIX}checkpoint_{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    _save_training_state(accelerator, tmp, *training_objects, extra_manifest)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, text in extra.items():
            (tmp / name).write_text(text)
        if final.exists():  # re-saving the same step (a resumed run): swap atomically
            old = root / f"{_TMP_PREFIX}old_checkpoint_{step}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        if total_limit is not None:
            found = sorted(
                (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))
            )
            for _, path in found[: max(0, len(found) - total_limit)]:
                shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _zoo_fingerprint(splits: Mapping[str, Any]) -> str:
    """A content hash of the training data: sizes, columns, ``model_id``/``epoch`` and the tokens of 8 rows per split."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(splits):
        ds = splits[name]
        n = len(ds)
        digest.update(f"{name}:{n}:{sorted(ds.column_names)}".encode())
        for column in ("model_id", "epoch"):
            if column in ds.column_names:
                digest.update(json.dumps(list(ds[column]), default=str).encode())
        if "tokens" in ds.column_names and n:
            rows = ds.with_format("numpy", columns=["tokens"])
            for index in sorted({round(i * (n - 1) / 7) for i in range(8)}):
                digest.update(rows[index]["tokens"].tobytes())
    return digest.hexdigest()[:32]


def _check_resume_compatible(
    checkpoint: Path, cfg: SaneTrainingConfig, model_config: SaneConfig, zoo_fingerprint: str | None = None
) -> None:
    """Raise unless the checkpoint was written by a run with the same settings and zoo (exact resume needs them)."""
    saved_print = check_checkpoint_format(checkpoint).get("zoo_fingerprint")
    if zoo_fingerprint is not None and saved_print is not None and saved_print != zoo_fingerprint:
        raise ValueError(
            f"cannot resume from {checkpoint}: the zoo is not the one this run was trained on (zoo fingerprint "
            f"{zoo_fingerprint} != {saved_print}); resume with the original --zoo, or start a new run in another folder"
        )
    saved_file = checkpoint / TRAINING_CONFIG_FILE
    if saved_file.is_file():
        saved = SaneTrainingConfig.from_json_file(saved_file).identity()
        now = cfg.identity()
        diff = sorted(k for k in now if saved.get(k) != now[k])
        if diff:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff)
            raise ValueError(
                f"cannot resume from {checkpoint}: the training settings changed ({details}); resume with the "
                "original settings or start a new run"
            )
    config_file = checkpoint / "sane_config.json"
    if config_file.is_file():
        saved_model = json.loads(config_file.read_text())
        now_model = json.loads(model_config.to_json_string())
        keys = [k for k in now_model if k not in ("transformers_version", "_name_or_path", "architectures", "auto_map")]
        diff = sorted(k for k in keys if saved_model.get(k) != now_model[k])
        if diff:
            raise ValueError(f"cannot resume from {checkpoint}: the model config changed in {diff}")

