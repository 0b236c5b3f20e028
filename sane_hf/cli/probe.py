"""``sane-hf probe``: predict model properties from SANE embeddings, beside the baselines.

::

    sane-hf probe --model runs/sane-digits --zoo zoos/digits-cnn [--split-by zoo|model] [--out DIR]

Loads the SANE model and its ``weight_tokenizer.json`` from ``--model``, the raw zoo from
``--zoo`` (a folder written by ``sane-hf zoo build``/``import``, or a Hub dataset id), embeds
every split and probes each property with Ridge / LogisticRegression (penalty chosen on
validation) on the SANE embeddings, the layer-statistics baseline and the raw-weights baseline
(see :mod:`sane_hf.probing`). Prints a table (property × method) and writes into ``--out``
(default ``<model>/probe``):

- ``metrics.json`` — test R² / accuracy per property and method, chosen penalties, notes;
- ``pred_vs_true_test_acc.png`` — predicted vs true test accuracy of the test models;
- ``embedding_pca.png`` — a 2-D PCA map of the embeddings, coloured by test accuracy;
- ``embeddings.npz`` — the embeddings of every split with their ``model_id`` and ``epoch``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sane_hf.serialization import writes_folder

__all__ = ["register", "run_probe"]


#: the one-line help of this subcommand in `sane-hf --help` (read without building its flags)
HELP = "predict model properties from SANE embeddings (linear probes vs baselines)"


# The library's choices, spelled here so that `--help` imports no torch: sane_hf.probing.DEFAULT_TARGETS and
# METHODS, sane_hf.embedding.POOLINGS and DEFAULT_POOLING (tests/test_cli_flags.py checks that they are equal).
DEFAULT_TARGETS = ("test_acc", "epoch", "ggap", "activation", "optimizer", "init")
METHODS = ("sane", "layer_stats", "raw", "sane+stats")
POOLINGS = ("layer", "mean", "max", "flatten", "none")
DEFAULT_POOLING = "layer"


def register(subparsers: argparse._SubParsersAction) -> None:
    from sane_hf.cli._common import add_runtime_flags

    p = subparsers.add_parser(
        "probe",
        help=HELP,
        description=(
            "Embed every split of a zoo with a trained SANE model and fit linear probes (Ridge for continuous "
            "properties, LogisticRegression for categorical ones; penalty chosen on the validation split) from "
            "the embeddings, from layer statistics and from raw weights. Writes metrics.json and plots."
        ),
    )
    p.add_argument("--model", required=True, type=Path,
                   help="folder holding the SaneModel (config.json + weights) and its weight_tokenizer.json")
    p.add_argument("--zoo", required=True, help="raw zoo folder (sane-hf zoo build/import) or Hub dataset id")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <model>/probe)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even when it holds files sane-hf probe did not write")
    p.add_argument("--split-by", choices=("zoo", "model"), default="zoo",
                   help="'zoo': use the zoo's own train/validation/test splits (default); 'model': pool all rows and "
                        "cross-validate with --folds folds of models grouped by model_id (for small zoos: every "
                        "model is tested once; scores are the mean ± std over folds)")
    p.add_argument("--folds", type=int, default=5,
                   help="folds of --split-by model (default: 5; at least 3: train, validation and test parts). "
                        "1 = a single seeded re-split by model with --split-fractions instead")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds / re-split for --split-by model (default: 0)")
    p.add_argument("--split-fractions", type=float, nargs=3, default=(0.7, 0.15, 0.15),
                   metavar=("TRAIN", "VAL", "TEST"),
                   help="fractions of the single re-split of --split-by model --folds 1 (default: 0.7 0.15 0.15)")
    p.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS),
                   help=f"properties to probe (default: {' '.join(DEFAULT_TARGETS)})")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="feature sets to compare (default: all)")
    p.add_argument("--pooling", choices=POOLINGS, default=DEFAULT_POOLING,
                   help=f"token-latent readout (default: {DEFAULT_POOLING}: per-layer mean and std of token latents, "
                        "the readout benchmarks/learning_curves.py chose)")
    p.add_argument("--window", type=int, default=None,
                   help="content tokens per window (default: window_size - 2*halo_size of the model config)")
    p.add_argument("--halo", type=int, default=None, help="context tokens on each side (default: halo_size)")
    p.add_argument("--batch-size", type=int, default=32, help="windows per forward pass (default: 32)")
    p.add_argument("--refit", choices=("train", "train+val"), default="train",
                   help="refit the chosen probe on train only (default) or on train+validation")
    p.add_argument("--raw-max-params", type=int, default=50_000,
                   help="skip the raw-weights baseline above this many weights per model (default: 50000)")
    p.add_argument("--device", default=None, help="torch device for SANE (default: cuda if available, else cpu)")
    p.add_argument("--no-plots", "--no_plots", action="store_true", help="write metrics.json only")
    add_runtime_flags(p)
    p.set_defaults(func=run_probe)


def _probe_out(args: argparse.Namespace) -> tuple[Path, bool, bool] | None:
    if not (Path(args.model) / "config.json").is_file():
        return None  # run_probe reports the missing model before any folder is made
    out = Path(args.out) if args.out is not None else Path(args.model) / "probe"
    return out, (out / "metrics.json").is_file(), bool(getattr(args, "overwrite", False))


@writes_folder("probe", _probe_out)
def run_probe(args: argparse.Namespace) -> int:
    from sane_hf.cli._common import apply_num_threads
    from sane_hf.jobs import load_sane, refresh_model_card, run_probe_job
    from sane_hf.reports import format_probe_summary
    from sane_hf.zoo.dataset import load_zoo

    start = time.perf_counter()
    apply_num_threads(args.num_threads)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(
            f"sane-hf probe: {model_dir} holds no config.json: pass the folder of a trained SANE model "
            "(written by sane-hf train or SaneModel.save_pretrained, with its weight_tokenizer.json)"
        )
    try:
        model, tokenizer = load_sane(model_dir, args.device)
    except OSError as err:
        raise SystemExit(f"sane-hf probe: {err}") from err
    try:
        zoo = load_zoo(args.zoo)
    except FileNotFoundError as err:
        raise SystemExit(f"sane-hf probe: {err}") from err
    common = dict(
        methods=args.methods, window=args.window, halo=args.halo, batch_size=args.batch_size, pooling=args.pooling,
        refit=args.refit, raw_max_params=args.raw_max_params, progress=not args.no_progress,
    )
    if args.num_threads is not None:
        common["num_threads"] = args.num_threads
    out = Path(args.out) if args.out is not None else model_dir / "probe"
    try:
        payload = run_probe_job(
            model, tokenizer, zoo, args.targets, out, model_dir=model_dir, zoo_id=args.zoo, split_by=args.split_by,
            folds=args.folds, seed=args.seed, split_fractions=args.split_fractions, plots=not args.no_plots,
            start=start, **common,
        )  # fmt: skip
    except ValueError as err:
        hint = ""
        if "models per split" in str(err) and args.split_by == "zoo":
            hint = "; for a small zoo, cross-validate instead: --split-by model (k-fold, grouped by model)"
        raise SystemExit(f"sane-hf probe: {err}{hint}") from err
    print(format_probe_summary(payload))
    print(f"wrote {', '.join(payload['files'])} to {out}")
    if refresh_model_card(model_dir, out, "probe"):
        print(f"updated the model card {model_dir / 'README.md'} with these numbers and verdicts")
    return 0
