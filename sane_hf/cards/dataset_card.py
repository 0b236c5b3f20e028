"""The dataset card of a model zoo (``README.md`` of a zoo folder), rendered from a template.

:func:`render_zoo_card` turns what a zoo build or import measured (its :class:`~sane_hf.zoo.ZooConfig`,
the summary written to ``zoo_summary.json``, the rows' metadata and the first checkpoint) into plain
values and renders the packaged Jinja template ``templates/zoo_card.md`` with
``huggingface_hub.DatasetCard.from_template``. The card's YAML holds ``configs`` (split → data
files, read by ``datasets.load_dataset``) and ``dataset_info`` (features, split sizes), written
through the public ``datasets.DatasetInfosDict.to_dataset_card_data``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from sane_hf.zoo.schema import ZooConfig

__all__ = ["zoo_card_template_path", "render_zoo_card"]

_TEMPLATE_NAME = "zoo_card.md"


def zoo_card_template_path() -> Path:
    """The packaged dataset-card template of a zoo."""
    return Path(__file__).resolve().parent.parent / "templates" / _TEMPLATE_NAME


_SANE_CITATION = """\
@inproceedings{schurholt2024sane,
  title         = {Towards Scalable and Versatile Weight Space Learning},
  author        = {Sch{\\"u}rholt, Konstantin and Mahoney, Michael W. and Borth, Damian},
  booktitle     = {Proceedings of the 41st International Conference on Machine Learning (ICML)},
  year          = {2024},
  eprint        = {2406.09997},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2406.09997}
}"""

_MODELZOOS_CITATION = """\
@inproceedings{schurholt2022modelzoos,
  title         = {Model Zoos: A Dataset of Diverse Populations of Neural Network Models},
  author        = {Sch{\\"u}rholt, Konstantin and Taskiran, Diyar and Knyazev, Boris and Gir{\\'o}-i-Nieto, Xavier and Borth, Damian},
  booktitle     = {Advances in Neural Information Processing Systems (NeurIPS), Datasets and Benchmarks Track},
  year          = {2022},
  eprint        = {2209.14764},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2209.14764}
}"""

_CITATION = _SANE_CITATION + "\n\n" + _MODELZOOS_CITATION


@dataclass(frozen=True)
class _TaskCard:
    """What the dataset card says about a task's data: origin, license, citation."""

    title: str
    url: str
    license: str  # Hub license identifier
    license_text: str
    source_datasets: tuple[str, ...]
    citation: str
    limitation: str


_TASK_CARDS: dict[str, _TaskCard] = {
    "digits": _TaskCard(
        title="UCI Optical Recognition of Handwritten Digits (the 8×8 version shipped as scikit-learn's "
        "`load_digits`, 1,797 images)",
        url="https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
        license="cc-by-4.0",
        license_text="Creative Commons Attribution 4.0 International (CC BY 4.0), as listed by the UCI "
        "Machine Learning Repository",
        source_datasets=("original",),
        citation="""\
@misc{alpaydin1998optdigits,
  title        = {Optical Recognition of Handwritten Digits},
  author       = {Alpaydin, E. and Kaynak, C.},
  year         = {1998},
  howpublished = {UCI Machine Learning Repository},
  doi          = {10.24432/C50P49}
}""",
        limitation="The task is tiny (8×8 grey digits, 1,797 images: 1,078 train / 359 validation / 360 "
        "test), so one test image is ~0.28 percentage points of accuracy; accuracies on these 8×8 digits are "
        "not comparable to MNIST (28×28, 70,000 images) results.",
    ),
    "mnist": _TaskCard(
        title="MNIST (Yann LeCun and Corinna Cortes), 28×28 grey digits, 50,000 / 10,000 / 10,000 images",
        url="http://yann.lecun.com/exdb/mnist/",
        license="cc-by-sa-3.0",
        license_text="Creative Commons Attribution-Share Alike 3.0 (CC BY-SA 3.0), as commonly listed for "
        "MNIST (copyright Yann LeCun and Corinna Cortes)",
        source_datasets=("original", "extended|ylecun/mnist"),
        citation="""\
@article{lecun1998gradient,
  title   = {Gradient-Based Learning Applied to Document Recognition},
  author  = {LeCun, Yann and Bottou, L{\\'e}on and Bengio, Yoshua and Haffner, Patrick},
  journal = {Proceedings of the IEEE},
  volume  = {86},
  number  = {11},
  pages   = {2278--2324},
  year    = {1998}
}""",
        limitation="MNIST is nearly solved: most reasonable models reach high accuracy, so accuracy "
        "differences between models are small.",
    ),
    "fashion-mnist": _TaskCard(
        title="Fashion-MNIST (Zalando Research), 28×28 grey clothing images, 60,000 train + 10,000 test",
        url="https://github.com/zalandoresearch/fashion-mnist",
        license="mit",
        license_text="MIT License (Zalando SE)",
        source_datasets=("original", "extended|zalando-datasets/fashion_mnist"),
        citation="""\
@article{xiao2017fashionmnist,
  title   = {Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms},
  author  = {Xiao, Han and Rasul, Kashif and Vollgraf, Roland},
  journal = {arXiv preprint arXiv:1708.07747},
  year    = {2017}
}""",
        limitation="Fashion-MNIST's 10,000 validation images are carved from its training set by a "
        "seeded shuffle; results are not comparable to numbers trained on the full 60,000 images.",
    ),
}

_IMPORT_FORMATS = {
    "folder": "a folder of checkpoint files (`*.safetensors`, `*.pt`/`*.pth` read with `weights_only=True`) "
    "with an optional `properties.csv`/`properties.json` keyed by file stem",
    "modelzoos": "the Model Zoos layout (Schürholt et al. 2022): trial folders with `params.json`, "
    "`result.json` and `checkpoint_<epoch>/checkpoints`",
    "unterthiner": "the Unterthiner et al. (2020) CNN zoo layout: a flat `weights.npy` matrix, `metrics.csv` "
    "and a `layout.csv`/`layout.json`",
}


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else (plural or word + 's')}"


def _shown_epochs(epochs: Sequence[str], limit: int = 12) -> list[str]:
    """All epochs when few, else ~``limit`` evenly spaced ones including the first and the last."""
    if len(epochs) <= limit:
        return list(epochs)
    idx = sorted({round(i * (len(epochs) - 1) / (limit - 1)) for i in range(limit)})
    return [epochs[i] for i in idx]


def _rebuild_command(config: ZooConfig, name: str) -> str:
    """The ``sane-hf zoo build`` command line that rebuilds this zoo (same rows, same splits)."""
    import shlex

    args = [
        "sane-hf", "zoo", "build",
        "--task", config.task,
        "--arch", config.arch,
        "--num-models", str(config.num_models),
        "--epochs", str(config.epochs),
        "--seed", str(config.seed),
    ]
    if config.checkpoint_epochs is not None:
        args += ["--checkpoint-epochs", *map(str, config.checkpoint_epochs)]
    if config.image_size is not None:
        args += ["--image-size", str(config.image_size)]
    if config.train_subset is not None:
        args += ["--train-subset", str(config.train_subset)]
    if config.eval_subset is not None:
        args += ["--eval-subset", str(config.eval_subset)]
    if config.arch_kwargs:
        args += ["--arch-kwargs", json.dumps(config.arch_kwargs, sort_keys=True)]
    if config.grid:
        args += ["--grid", json.dumps(config.grid, sort_keys=True)]
    if tuple(config.split_fractions) != (0.7, 0.15, 0.15):
        args += ["--split-fractions", *map(repr, config.split_fractions)]
    if config.align:
        args.append("--align")
    if config.models_per_chunk != type(config).__dataclass_fields__["models_per_chunk"].default:
        args += ["--models-per-chunk", str(config.models_per_chunk)]  # resume granularity, not the rows
    args += ["--out", name]
    return " ".join(shlex.quote(a) for a in args)


def _import_command(config: ZooConfig, name: str) -> str:
    import shlex

    fmt = config.source.split(":", 1)[1]
    args = ["sane-hf", "zoo", "import", "--format", fmt, str(config.import_options.get("src", "SRC")), "--out", name]
    if config.arch != "unknown":
        args += ["--arch", config.arch]
    if config.task != "unknown":
        args += ["--task", config.task]
    props = config.import_options.get("properties")
    if fmt == "folder" and props:
        args += ["--properties", str(props)]
    args += ["--seed", str(config.seed)]
    if tuple(config.split_fractions) != (0.7, 0.15, 0.15):
        args += ["--split-fractions", *map(repr, config.split_fractions)]
    return " ".join(shlex.quote(a) for a in args)


_COLUMN_DESCRIPTIONS = {
    "model_id": "model index (splits are by model)",
    "epoch": "training epoch of the checkpoint (0 = initialisation, -1 = unknown)",
    "seed": "training seed (-1 = unknown)",
    "lr": "learning rate (NaN = unknown)",
    "weight_decay": "weight decay / L2 regularisation (NaN = unknown)",
    "optimizer": "optimizer name",
    "activation": "activation function",
    "init": "weight initialisation scheme",
    "dropout": "dropout probability (NaN = unknown)",
    "batch_size": "training batch size (-1 = unknown)",
    "arch": "architecture name",
    "task": "task (data set) name",
    "train_acc": "top-1 accuracy on the training set (NaN = unknown)",
    "val_acc": "top-1 accuracy on the validation set (NaN = unknown)",
    "test_acc": "top-1 accuracy on the test set (NaN = unknown)",
    "train_loss": "mean cross-entropy on the training set (NaN = unknown)",
    "test_loss": "mean cross-entropy on the test set (NaN = unknown)",
    "ggap": "generalisation gap, train_acc - test_acc",
    "weights": "the state_dict as safetensors bytes (`sane_hf.zoo.state_dict_from_bytes`)",
}




def _value_order(item: tuple[str, int]) -> Any:
    try:
        return (0, float(item[0]), "")
    except ValueError:
        return (1, 0.0, item[0])


def _hyperparameter_rows(summary: Mapping[str, Any]) -> list[dict[str, str]]:
    """One row per hyperparameter: its values with the number of models of each."""
    import numpy as np

    from sane_hf.zoo.schema import HPARAM_COLUMNS, ZOO_FEATURES, _fmt

    rows = []
    counts_all = summary.get("hparam_counts") or {}
    for col in HPARAM_COLUMNS:
        counts = dict(counts_all.get(col, {}))
        unknown = counts.pop("unknown", 0)
        if len(counts) > 8 and not ZOO_FEATURES[col].dtype == "string":
            values = sorted(float(v) for v in counts)
            shown = (f"{len(values)} distinct values in [{_fmt(values[0])}, {_fmt(values[-1])}], "
                     f"median {_fmt(float(np.median(values)))}")
        else:
            shown = ", ".join(f"{v} ({c})" for v, c in sorted(counts.items(), key=_value_order))
        if unknown:
            shown = f"{shown}, unknown ({unknown})" if shown else f"unknown ({unknown})"
        rows.append({"column": col, "values": shown})
    return rows


def _property_rows(summary: Mapping[str, Any], shown_epochs: Sequence[str]) -> list[dict[str, Any]]:
    from sane_hf.zoo.schema import PROPERTY_COLUMNS, _fmt

    per_prop = summary.get("properties_per_epoch") or {}
    rows = []
    for prop in PROPERTY_COLUMNS:
        for epoch in shown_epochs:
            st = per_prop.get(prop, {}).get(epoch, {"n": 0, "min": None, "mean": None, "max": None})
            rows.append({
                "property": prop, "epoch": "unknown" if epoch == "-1" else epoch, "n": st["n"],
                "min": _fmt(st["min"]), "mean": _fmt(st["mean"]), "max": _fmt(st["max"]),
            })
    return rows


def _architecture(config: ZooConfig, first_weights: bytes | None) -> dict[str, Any] | None:
    from sane_hf.state_dict_io import state_dict_from_bytes

    if first_weights is None:
        return None
    sd = state_dict_from_bytes(first_weights)
    return {
        "num_params": sum(v.numel() for v in sd.values() if v.is_floating_point()),
        "entries_phrase": _plural(len(sd), "state_dict entry", "state_dict entries"),
        "arch_kwargs": json.dumps(config.arch_kwargs) if config.arch_kwargs else "",
        "rows": [{"key": k, "shape": str(tuple(v.shape)), "dtype": str(v.dtype).replace("torch.", "")}
                 for k, v in sd.items()],
    }


def _training(config: ZooConfig, task_card: _TaskCard | None, versions: Mapping[str, str], name: str) -> dict[str, Any]:
    """How a built zoo's models were trained (the "Task and training" section)."""
    from sane_hf.zoo import train as train_mod

    return {
        "data": task_card.title if task_card is not None else f"`{config.task}`",
        "image_size": config.image_size,
        "channels_phrase": _plural(config.in_channels or 0, "channel"),
        "classes_phrase": _plural(config.num_classes or 0, "class", "classes"),
        "train_subset": config.train_subset,
        "models_phrase": _plural(config.num_models, "model"),
        "epochs_phrase": _plural(config.epochs, "epoch"),
        "stored_word": "epoch" if len(config.stored_epochs) == 1 else "epochs",
        "stored_epochs": str(config.stored_epochs),
        "adam_betas": str(tuple(getattr(train_mod, "ADAM_BETAS", (0.9, 0.999)))),
        "adam_eps": f"{getattr(train_mod, 'ADAM_EPS', 1e-8):g}",
        "sgd_momentum": f"{getattr(train_mod, 'SGD_MOMENTUM', 0.9):g}",
        "seed": config.seed,
        "grid": json.dumps(config.grid, sort_keys=True) if config.grid else "",
        "train_eval": getattr(train_mod, "DEFAULT_TRAIN_EVAL_SAMPLES", None),
        "eval_subset": config.eval_subset,
        "eval_error": f"{50 / math.sqrt(config.eval_subset):.1f}" if config.eval_subset else "",
        "align": config.align,
        "software": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "rebuild_command": _rebuild_command(config, name),
    }


def _source(config: ZooConfig, summary: Mapping[str, Any], metas: list[dict[str, Any]], fmt: str, name: str) -> dict[str, Any]:
    """Where an imported zoo came from and which columns the source knew (the "Source" section)."""
    from sane_hf.zoo.schema import HPARAM_COLUMNS, PROPERTY_COLUMNS, _is_unknown_value

    sources = list(summary.get("sources") or [])
    known, partial, unknown = [], [], []
    for col in (*HPARAM_COLUMNS, *PROPERTY_COLUMNS):
        flags = [_is_unknown_value(col, m[col]) for m in metas]
        (unknown if all(flags) else partial if any(flags) else known).append(f"`{col}`")
    options = {k: v for k, v in config.import_options.items() if k not in ("src", "sources_sha1") and v is not None}
    return {
        "format": fmt,
        "format_description": _IMPORT_FORMATS.get(fmt, "see sane_hf.zoo.importers"),
        "src": config.import_options.get("src", "unknown"),
        "models_phrase": _plural(len(sources) or config.num_models, "model"),
        "examples": ", ".join(f"`{s}`" for s in sources[:3]),
        "epochs": config.epochs,
        "seed": config.seed,
        "known": ", ".join(known),
        "partial": ", ".join(partial),
        "unknown": ", ".join(unknown),
        "options": json.dumps(options, sort_keys=True) if options else "",
        "import_command": _import_command(config, name),
    }


def _card_data(config: ZooConfig, summary: Mapping[str, Any], data_files: Mapping[str, str], task_card: _TaskCard | None):
    """The card's YAML: license, tags, ``configs`` (split → files) and ``dataset_info``."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCardData

    from sane_hf.zoo.schema import SPLITS, ZOO_FEATURES

    license_id = task_card.license if task_card is not None else "other"
    num_bytes = summary.get("num_bytes") or {}
    download = summary.get("download_bytes") or {}
    splits = SplitDict()
    for split in SPLITS:
        if split in data_files:
            splits.add(SplitInfo(
                name=split, num_bytes=int(num_bytes.get(split, 0)),
                num_examples=summary["checkpoints_per_split"][split],
            ))
    info = DatasetInfo(
        features=ZOO_FEATURES,
        splits=splits,
        download_size=sum(int(download.get(s, 0)) for s in data_files) or None,
        dataset_size=sum(int(num_bytes.get(s, 0)) for s in data_files) or None,
    )
    card_data = DatasetCardData(
        pretty_name=f"Model zoo: {config.arch} on {config.task}",
        license=license_id,
        task_categories=["other"],
        tags=["weight-space-learning", "model-zoo", "sane", "safetensors"],
        size_categories=_size_category(summary["num_checkpoints"]),
        source_datasets=list(task_card.source_datasets) if task_card is not None else ["original"],
        configs=[{"config_name": "default", "data_files": [{"split": s, "path": p} for s, p in data_files.items()]}],
    )
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)
    if license_id == "other":
        card_data["license_name"] = "source-license-unknown"  # explained in the card's License section
    return card_data


def render_zoo_card(
    config: ZooConfig,
    summary: Mapping[str, Any],
    metas: list[dict[str, Any]],
    first_weights: bytes | None,
    data_files: Mapping[str, str],
    notes: Sequence[str],
    *,
    name: str = "zoo",
    template_path: str | Path | None = None,
) -> str:
    """The dataset card of a zoo as Markdown with YAML front matter.

    Args:
        config: the zoo's config (import options already stripped of local folders).
        summary: the zoo summary (``zoo_summary.json``): counts, per-epoch property statistics,
            hyperparameter counts, split sizes, byte sizes, library versions.
        metas: every row's columns but the weights (for the imported zoo's known/unknown columns).
        first_weights: the first checkpoint as safetensors bytes (the architecture table), or None.
        data_files: split → data-file pattern of the splits that have rows.
        notes: lines for the card's Notes section (e.g. dropped checkpoints).
        name: the folder's name, used in the usage and rebuild snippets.
        template_path: a Jinja2 Markdown template; default: :func:`zoo_card_template_path`.
    """
    from huggingface_hub import DatasetCard

    from sane_hf.zoo.schema import SPLITS, ZOO_FEATURES, _versions

    built = config.source == "build"
    fmt = None if built else config.source.split(":", 1)[1]
    task_card = _TASK_CARDS.get(config.task) if built else None
    versions = summary.get("versions") or _versions()
    architecture = _architecture(config, first_weights)
    epochs = list(summary["test_acc_per_epoch"])
    shown_epochs = _shown_epochs(epochs)
    n_params = architecture["num_params"] if architecture else None
    card = DatasetCard.from_template(
        _card_data(config, summary, data_files, task_card),
        template_path=str(template_path or zoo_card_template_path()),
        arch=config.arch,
        task=config.task,
        name=name,
        built=built,
        align=config.align,
        origin="Built with `sane-hf zoo build`" if built else f"Imported with `sane-hf zoo import --format {fmt}`",
        sane_version=versions.get("sane-hf", "?"),
        models_phrase=_plural(summary["num_models"], "trained neural network"),
        models_phrase_short=_plural(summary["num_models"], "model"),
        checkpoints_phrase=_plural(summary["num_checkpoints"], "checkpoint"),
        size_phrase=f"{n_params:,}-parameter " if n_params is not None else "",
        description=config.description,
        architecture=architecture,
        training=_training(config, task_card, versions, name) if built else {},
        source=None if built else _source(config, summary, metas, fmt or "", name),
        hyperparameters=_hyperparameter_rows(summary),
        epochs_shown=len(shown_epochs),
        epochs_total=len(epochs),
        properties=_property_rows(summary, shown_epochs),
        splits=[{"split": s, "models": summary["models_per_split"][s], "checkpoints": summary["checkpoints_per_split"][s]}
                for s in SPLITS],
        notes=list(notes),
        schema=[{"column": col, "dtype": feat.dtype, "meaning": _COLUMN_DESCRIPTIONS[col]}
                for col, feat in ZOO_FEATURES.items()],
        task_card=task_card,
        task_label_card=None if built else _TASK_CARDS.get(config.task),
        citation=_CITATION,
    )
    return str(card)
