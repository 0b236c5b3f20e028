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
import json
import time
from pathlib import Path
from typing import Any

from sane_hf.serialization import writes_folder

__all__ = [
    "register", "run_probe", "resplit_by_model", "plot_predictions", "plot_embedding_map", "write_probe_artifacts",
    "format_probe_summary",
]

_PLOT_PROPERTY = "test_acc"


def register(subparsers: argparse._SubParsersAction) -> None:
    from sane_hf.cli._common import add_runtime_flags
    from sane_hf.embedding import DEFAULT_POOLING, POOLINGS
    from sane_hf.probing import DEFAULT_TARGETS, METHODS

    p = subparsers.add_parser(
        "probe",
        help="predict model properties from SANE embeddings (linear probes vs baselines)",
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


def resplit_by_model(zoo: Any, fractions=(0.7, 0.15, 0.15), seed: int = 0) -> Any:
    """Pool all rows of ``zoo`` and split them again by ``model_id`` (seeded), as ``build_zoo`` does."""
    from datasets import DatasetDict, concatenate_datasets

    from sane_hf.zoo.dataset import split_model_ids

    rows = concatenate_datasets([ds for ds in zoo.values() if len(ds)])
    ids = rows.select_columns(["model_id"]).with_format(None)["model_id"]
    assignment = split_model_ids(ids, fractions, seed)
    split_of = {m: split for split, members in assignment.items() for m in members}
    out = DatasetDict()
    for split in assignment:
        out[split] = rows.select([i for i, m in enumerate(ids) if split_of[m] == split])
    return out


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, works headless (Agg)

    return Figure(figsize=(width, height), dpi=110)


def plot_predictions(report: Any, path: Path, target: str = _PLOT_PROPERTY) -> bool:
    """Scatter predicted vs true ``target`` of the test models, one panel per method on shared axes.

    The axes span the true values' range (padded); a prediction outside it is drawn clipped to the
    border with a triangle marker and counted in the panel's legend. False if nothing to plot.
    """
    import numpy as np

    from sane_hf.verdicts import method_name, metric_name, property_name

    panels = [(m, r[target]) for m, r in report.results.items() if target in r and not r[target].skipped]
    if not panels:
        return False
    true_all = np.concatenate([np.asarray(r.true, dtype=float) for _, r in panels])
    lo, hi = float(true_all.min()), float(true_all.max())
    pad = 0.05 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    fig = _figure(4.0 * len(panels), 4.2)
    axes = fig.subplots(1, len(panels), squeeze=False, sharex=True, sharey=True)[0]
    for ax, (method, result) in zip(axes, panels):
        true, pred = result.true.astype(float), result.predictions.astype(float)
        outside = (pred < lo) | (pred > hi)
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=1, ls="--")
        ax.scatter(true[~outside], pred[~outside], s=12, alpha=0.7)
        if outside.any():
            clipped = np.clip(pred[outside], lo, hi)
            ax.scatter(true[outside], clipped, s=22, marker="^", color="tab:red",
                       label=f"{int(outside.sum())} prediction(s) outside the range, clipped")
            ax.legend(loc="upper left", fontsize="small")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        value = "n/a" if result.value is None else f"{result.value:.3f}"
        ax.set_title(f"{method_name(method)}: {metric_name(result.metric)} = {value}")
        ax.set_xlabel(f"true {property_name(target)}")
    axes[0].set_ylabel(f"predicted {property_name(target)}")
    fig.suptitle(f"Predicted vs true {property_name(target)} of test models: SANE embeddings vs baselines")
    fig.tight_layout()
    fig.savefig(path)
    return True


def plot_embedding_map(report: Any, path: Path, colour: str = _PLOT_PROPERTY) -> bool:
    """2-D PCA (fitted on train) of the SANE embeddings of every split, coloured by ``colour``."""
    import numpy as np
    from sklearn.decomposition import PCA

    if not report.embeddings:
        return False
    fit_on = "train" if "train" in report.embeddings else next(iter(report.embeddings))
    train = report.embeddings[fit_on]
    n_components = min(2, train.shape[1], len(train))
    pca = PCA(n_components=n_components).fit(train)
    fig = _figure(5.5, 4.5)
    ax = fig.subplots()
    markers = {"train": "o", "validation": "s", "test": "^"}
    values = [report.properties[s].get(colour) for s in report.embeddings]
    has_colour = all(v is not None for v in values)
    if has_colour:
        vmin = float(np.nanmin(np.concatenate([np.asarray(v, dtype=float) for v in values])))
        vmax = float(np.nanmax(np.concatenate([np.asarray(v, dtype=float) for v in values])))
    mappable = None
    for split, emb in report.embeddings.items():
        xy = pca.transform(emb)
        y = xy[:, 1] if xy.shape[1] > 1 else np.zeros(len(xy))
        kwargs: dict[str, Any] = {"s": 14, "marker": markers.get(split, "o"), "label": split, "alpha": 0.8}
        if has_colour:
            kwargs.update(c=np.asarray(report.properties[split][colour], dtype=float), cmap="viridis", vmin=vmin,
                          vmax=vmax)
        mappable = ax.scatter(xy[:, 0], y, **kwargs)
    if has_colour and mappable is not None:
        fig.colorbar(mappable, ax=ax, label=colour)
    ax.ticklabel_format(style="sci", scilimits=(-2, 3))
    ratio = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%})")
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%})" if len(ratio) > 1 else "")
    ax.set_title(f"SANE embeddings of every split, 2-D PCA (fitted on {fit_on})")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    return True


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_probe_artifacts(report: Any, out: Path, *, plots: bool = True) -> list[str]:
    """Write the probe's plots and ``embeddings.npz`` into ``out``; the file names, ``metrics.json`` first.

    ``metrics.json`` itself is written by the caller (its payload names the model and zoo).
    """
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    files = ["metrics.json"]
    if plots:
        if plot_predictions(report, out / "pred_vs_true_test_acc.png"):
            files.append("pred_vs_true_test_acc.png")
        if plot_embedding_map(report, out / "embedding_pca.png"):
            files.append("embedding_pca.png")
    if report.embeddings:
        arrays: dict[str, Any] = {}
        for split, emb in report.embeddings.items():
            arrays[f"{split}_embeddings"] = emb.astype(np.float32)
            for col in ("model_id", "epoch"):
                if col in report.properties[split]:
                    arrays[f"{split}_{col}"] = np.asarray(report.properties[split][col])
        np.savez_compressed(out / "embeddings.npz", **arrays)
        files.append("embeddings.npz")
    return files


def _probe_out(args: argparse.Namespace) -> tuple[Path, bool, bool] | None:
    if not (Path(args.model) / "config.json").is_file():
        return None  # run_probe reports the missing model before any folder is made
    out = Path(args.out) if args.out is not None else Path(args.model) / "probe"
    return out, (out / "metrics.json").is_file(), bool(getattr(args, "overwrite", False))


@writes_folder("probe", _probe_out)
def run_probe(args: argparse.Namespace) -> int:
    import torch

    from sane_hf.cli._common import apply_num_threads
    from sane_hf.modeling_sane import SaneModel
    from sane_hf.probing import evaluate_zoo_probes
    from sane_hf.tokenization_sane import WeightTokenizer
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
        tokenizer = WeightTokenizer.from_pretrained(model_dir)
    except OSError as err:
        raise SystemExit(f"sane-hf probe: {err}") from err
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = SaneModel.from_pretrained(model_dir).to(device).eval()
    try:
        zoo = load_zoo(args.zoo)
    except FileNotFoundError as err:
        raise SystemExit(f"sane-hf probe: {err}") from err
    cross_validate = args.split_by == "model" and args.folds != 1
    if args.split_by == "model" and not cross_validate:
        zoo = resplit_by_model(zoo, tuple(args.split_fractions), args.seed)
    extra = [c for c in ("epoch", _PLOT_PROPERTY) if c not in args.targets]
    common = dict(
        methods=args.methods, window=args.window, halo=args.halo, batch_size=args.batch_size, pooling=args.pooling,
        refit=args.refit, raw_max_params=args.raw_max_params, extra_columns=extra, progress=not args.no_progress,
    )
    if args.num_threads is not None:
        common["num_threads"] = args.num_threads
    try:
        if cross_validate:
            from sane_hf.probe_cv import cross_validate_zoo_probes

            report = cross_validate_zoo_probes(
                model, tokenizer, zoo, args.targets, folds=args.folds, seed=args.seed, **common
            )
        else:
            report = evaluate_zoo_probes(model, tokenizer, zoo, args.targets, **common)
    except ValueError as err:
        hint = ""
        if "models per split" in str(err) and args.split_by == "zoo":
            hint = "; for a small zoo, cross-validate instead: --split-by model (k-fold, grouped by model)"
        raise SystemExit(f"sane-hf probe: {err}{hint}") from err

    out = Path(args.out) if args.out is not None else model_dir / "probe"
    files = write_probe_artifacts(report, out, plots=not args.no_plots)
    payload = {
        **report.to_dict(),
        "model": str(model_dir),
        "zoo": str(args.zoo),
        "split_by": args.split_by,
        **({"cv": report.info["cv"]} if cross_validate else {}),
        "device": device,
        "seconds": round(time.perf_counter() - start, 2),
        "files": files,
    }
    (out / "metrics.json").write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    print(format_probe_summary(json.loads(json.dumps(payload, default=_json_default))))
    print(f"wrote {', '.join(files)} to {out}")
    _refresh_card(model_dir, out)
    return 0


def _refresh_card(model_dir: Path, out: Path) -> None:
    """Re-render the model card when the metrics went where the card reads them (``<model>/probe``)."""
    from sane_hf.hub import CARD_FILE, write_model_card

    if out.resolve() == (model_dir / "probe").resolve() and (model_dir / CARD_FILE).is_file():
        write_model_card(model_dir)
        print(f"updated the model card {model_dir / CARD_FILE} with these numbers and verdicts")


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    cells = [header] + rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_probe_summary(payload: dict[str, Any]) -> str:
    """The probe table with readable names, the notes and one verdict line per property."""
    from sane_hf.probing import METHODS
    from sane_hf.verdicts import (
        method_name,
        metric_name,
        overall_verdict,
        probe_verdicts,
        property_name,
        readable_note,
    )

    metrics = payload.get("metrics") or {}
    names = payload.get("metric_names") or {}
    methods = [m for m in METHODS if any(m in row for row in metrics.values())]

    std = (payload.get("cv") or {}).get("std") or {}

    def cell(prop: str, method: str) -> str:
        value = metrics[prop].get(method)
        if value is None:
            return "—"
        spread = (std.get(prop) or {}).get(method)
        return f"{value:.3f}" + (f" ± {spread:.3f}" if spread is not None else "")

    rows = [[property_name(p), metric_name(names.get(p, "")), *(cell(p, m) for m in methods)] for p in metrics]
    title = "property prediction on the test split"
    if payload.get("cv"):
        cv = payload["cv"]
        title = f"property prediction, {cv.get('folds')}-fold cross-validation grouped by model (mean ± std over folds)"
    lines = [title, _text_table(["property", "metric", *(method_name(m) for m in methods)], rows)]
    lines += [f"note: {readable_note(note)}" for note in payload.get("notes") or []]
    verdicts = probe_verdicts(metrics, names)
    overall = overall_verdict({"metrics": metrics})
    if overall:
        lines += ["", overall, *(f"  - {line}" for line in verdicts)]
    return "\n".join(lines)
