"""``sane-hf zoo``: build a model zoo, or import one, as a Hugging Face dataset folder.

::

    sane-hf zoo build  --task digits --arch cnn-s --num-models 64 --epochs 10 --out zoos/digits-cnn
    sane-hf zoo import --format modelzoos|folder|unterthiner SRC --out zoos/x

Both write ``README.md`` (dataset card), ``zoo_config.json``, ``zoo_summary.json`` and
``data/<split>-*.parquet`` and print a summary. Rerunning an interrupted command resumes it.
Several processes: ``accelerate launch --num_processes N -m sane_hf.cli zoo build ...``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

__all__ = ["register", "run_build", "run_import", "format_summary", "small_split_warning", "NOT_BUILD_FLAGS"]


#: the one-line help of this subcommand in `sane-hf --help` (read without building its flags)
HELP = "build or import model zoos (Hugging Face datasets of checkpoints)"

#: ZooConfig fields that are not flags of `sane-hf zoo build`: the build derives them from the task, or importers set them
NOT_BUILD_FLAGS = ("in_channels", "num_classes", "source", "import_options", "arch_entrypoint", "task_entrypoint")


def register(subparsers: argparse._SubParsersAction) -> None:
    from sane_hf.cli._common import add_runtime_flags
    from sane_hf.cli._config_flags import add_config_flags
    from sane_hf.zoo.config import ZooConfig

    zoo = subparsers.add_parser(
        "zoo",
        help=HELP,
        description="Build a population of trained models, or import one, as a Hugging Face dataset folder.",
    )
    zoo_sub = zoo.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")
    zoo.set_defaults(func=lambda args: (zoo.print_help(), 0)[1])

    build = zoo_sub.add_parser(
        "build",
        help="train a population of models and write it as a dataset",
        description=(
            "Train --num-models models with a sampled hyperparameter grid on an offline task and write one row "
            "per (model, epoch) checkpoint. An interrupted build resumes when rerun with the same arguments. "
            "Under `accelerate launch --num_processes N -m sane_hf.cli zoo build ...` each process trains its "
            "share of the chunks."
        ),
    )
    build.add_argument("--out", required=True, type=Path, help="output zoo folder")
    build.add_argument("--config", type=Path, default=None,
                       help="a zoo_config.json to start from (flags given explicitly override it)")
    add_config_flags(build, ZooConfig, skip=NOT_BUILD_FLAGS, overrides={
        "split_fractions": {"metavar": ("TRAIN", "VAL", "TEST")},
        "grid": {"help": ZooConfig.__dataclass_fields__["grid"].metadata["help"]
                 + ' Given as JSON, e.g. \'{"lr_range": [1e-4, 1e-2]}\'.'},
    })  # fmt: skip
    build.add_argument("--overwrite", action="store_true", help="discard what --out holds and start over")
    add_runtime_flags(build)
    build.set_defaults(func=run_build)

    imp = zoo_sub.add_parser(
        "import",
        help="convert an existing population (folder, Model Zoos, Unterthiner) into a zoo dataset",
        description=(
            "Convert checkpoints into the zoo dataset layout. Formats: 'folder' (*.safetensors / *.pt / *.pth "
            "anywhere below SRC, e.g. model_003/epoch_05.safetensors, + optional SRC/properties.csv|json with "
            "one row per checkpoint keyed by a 'path' column relative to SRC (model_003/epoch_05.safetensors; "
            "'file'/'name'/'stem' = the file name also accepted); model and epoch come from model_id/epoch "
            "columns, else from the layout (folder = model, epoch_YY in the file name = epoch)), 'modelzoos' "
            "(Schürholt et al. 2022 trial folders with params.json, result.json, checkpoint_<epoch>/checkpoints), "
            "'unterthiner' (Unterthiner et al. 2020: weights.npy, metrics.csv, layout.csv). Your own "
            "architecture and task: --arch module:callable --task module:callable (or path/to/file.py:callable); "
            "this IMPORTS AND RUNS YOUR CODE, and records both in zoo_config.json for train, probe and sample. "
            "Torch files are read with weights_only=True. An interrupted import resumes when rerun."
        ),
    )
    imp.add_argument("src", type=Path, help="source folder")
    imp.add_argument("--format", required=True, choices=["folder", "modelzoos", "unterthiner"], dest="fmt",
                     help="layout of SRC")
    imp.add_argument("--out", required=True, type=Path, help="output zoo folder")
    imp.add_argument("--arch", default=None,
                     help="a registered architecture, or YOUR architecture as module:callable or path/to/file.py:callable "
                          "(a function returning the nn.Module; every checkpoint must load into it strictly; this "
                          "imports your code), or a free name (default: from the source, else 'unknown')")
    imp.add_argument("--task", default=None,
                     help="a registered task, or YOUR task as module:callable or path/to/file.py:callable (a function "
                          "returning x_train, y_train, x_test, y_test tensors; this imports your code), or a free name "
                          "(default: from the source, else 'unknown')")
    imp.add_argument("--properties", type=Path, default=None,
                     help="folder format: properties file, one row per checkpoint keyed by a 'path' column relative "
                          "to SRC ('file'/'name'/'stem' also accepted) (default: SRC/properties.csv or .json)")
    imp.add_argument("--recursive", action=argparse.BooleanOptionalAction, default=True,
                     help="folder format: find checkpoints in subfolders too (--no-recursive: top level only)")
    add_config_flags(imp, ZooConfig, only=("seed", "split_fractions"), overrides={
        "seed": {"help": "Seed of the split by model."}, "split_fractions": {"metavar": ("TRAIN", "VAL", "TEST")},
    })  # fmt: skip
    imp.add_argument("--overwrite", action="store_true", help="discard what --out holds and start over")
    add_runtime_flags(imp)
    imp.set_defaults(func=run_import)


#: Models per split a fixed-split probe needs (``sane_hf.probing.check_model_splits``).
PROBE_MIN_MODELS = 3


def small_split_warning(num_models: int, fractions: Any, seed: int = 0) -> str | None:
    """A sentence when a split of ``num_models`` models will hold fewer than a probe needs, else None."""
    from sane_hf.zoo.dataset import split_model_ids

    def sizes(n: int) -> dict[str, int]:
        return {k: len(v) for k, v in split_model_ids(range(n), tuple(fractions), seed).items()}

    counts = sizes(num_models)
    small = {k: v for k, v in counts.items() if v < PROBE_MIN_MODELS}
    if not small:
        return None
    needed = next((n for n in range(num_models + 1, 10_000) if min(sizes(n).values()) >= PROBE_MIN_MODELS), None)
    shown = ", ".join(f"{k} {v}" for k, v in counts.items())
    more = f"build at least {needed} models, or " if needed else ""
    return (
        f"{num_models} models split {'/'.join(f'{f:g}' for f in fractions)} give {shown} model(s) per split; "
        f"`sane-hf probe` needs at least {PROBE_MIN_MODELS} models per split: {more}probe with `--split-by model` "
        "(k-fold cross-validation grouped by model)"
    )


def format_summary(out_dir: Path, seconds: float | None = None) -> str:
    """A few human-readable lines from ``out_dir/zoo_summary.json``."""
    from sane_hf.zoo.dataset import load_zoo_summary

    s = load_zoo_summary(out_dir)
    final = s["final_test_acc"]

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    per_split = ", ".join(f"{k} {s['models_per_split'][k]}" for k in ("train", "validation", "test"))
    lines = [
        f"zoo written to {out_dir}",
        f"  models: {s['num_models']} ({per_split}); checkpoints: {s['num_checkpoints']}",
        f"  test_acc at each model's final epoch: min {f(final['min'])}, mean {f(final['mean'])}, max {f(final['max'])}",
    ]
    if s.get("dropped_checkpoints"):
        lines.append(f"  dropped checkpoints (NaN/Inf): {s['dropped_checkpoints']}")
    if s.get("missing_properties"):
        lines.append(f"  missing properties (NaN): {s['missing_properties']}")
    took = seconds if seconds is not None else s.get("build_seconds")
    if took is not None:
        lines.append(f"  time: {took:.1f} s")
    lines.append(f"  manifest: {out_dir / 'zoo_config.json'}, {out_dir / 'zoo_summary.json'}")
    return "\n".join(lines)


def run_build(args: argparse.Namespace) -> int:
    from sane_hf.cli._common import apply_num_threads
    from sane_hf.cli._config_flags import config_values
    from sane_hf.zoo.dataset import ZooConfig, _distributed_state, build_zoo, load_zoo_config

    apply_num_threads(args.num_threads)
    base: dict[str, Any] = {}
    if args.config is not None:
        base = {**load_zoo_config(args.config).to_dict(), "in_channels": None, "num_classes": None}
    try:
        config = ZooConfig.from_dict({**base, **config_values(ZooConfig, args)})
    except ValueError as err:
        raise SystemExit(f"sane-hf zoo build: {err}") from err
    from sane_hf.zoo.tasks import TaskNotInstalledError

    warning = small_split_warning(config.num_models, config.split_fractions, config.seed)
    if warning and _distributed_state().is_main_process:
        print(f"sane-hf zoo build: warning: {warning}")
    start = time.perf_counter()
    try:
        build_zoo(config, args.out, progress=not args.no_progress, overwrite=args.overwrite)
    except TaskNotInstalledError as err:
        raise SystemExit(f"sane-hf zoo build: {err}") from None
    except ValueError as err:
        raise SystemExit(f"sane-hf zoo build: {err}") from err
    if _distributed_state().is_main_process:
        print(format_summary(args.out, time.perf_counter() - start))
    return 0


def run_import(args: argparse.Namespace) -> int:
    from sane_hf.cli._common import apply_num_threads
    from sane_hf.cli._config_flags import config_values
    from sane_hf.zoo.config import ZooConfig
    from sane_hf.zoo.importers import import_zoo

    apply_num_threads(args.num_threads)
    kwargs: dict[str, Any] = {**config_values(ZooConfig, args), "overwrite": args.overwrite,
                              "progress": not args.no_progress}  # seed, split_fractions: the importers' defaults
    if args.arch is not None:
        kwargs["arch"] = args.arch
    if args.task is not None:
        kwargs["task"] = args.task
    if args.properties is not None:
        if args.fmt != "folder":
            raise SystemExit("sane-hf zoo import: --properties applies to --format folder only")
        kwargs["properties"] = args.properties
    if args.fmt == "folder":
        kwargs["recursive"] = args.recursive
    elif not args.recursive:
        raise SystemExit("sane-hf zoo import: --no-recursive applies to --format folder only")
    start = time.perf_counter()
    try:
        import_zoo(args.fmt, args.src, args.out, **kwargs)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"sane-hf zoo import: {err}") from err
    print(format_summary(args.out, time.perf_counter() - start))
    return 0
