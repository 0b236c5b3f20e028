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

__all__ = ["register", "run_probe", "resplit_by_model", "plot_predictions", "plot_embedding_map", "write_probe_artifacts"]

_PLOT_PROPERTY = "test_acc"


def register(subparsers: argparse._SubParsersAction) -> None:
    from sane_hf.embedding import POOLINGS
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
    p.add_argument("--split-by", choices=("zoo", "model"), default="zoo",
                   help="'zoo': use the zoo's own train/validation/test splits (default); 'model': pool all rows "
                        "and re-split them by model_id with --seed and --split-fractions")
    p.add_argument("--seed", type=int, default=0, help="seed of the re-split for --split-by model (default: 0)")
    p.add_argument("--split-fractions", type=float, nargs=3, default=(0.7, 0.15, 0.15),
                   metavar=("TRAIN", "VAL", "TEST"), help="fractions for --split-by model (default: 0.7 0.15 0.15)")
    p.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS),
                   help=f"properties to probe (default: {' '.join(DEFAULT_TARGETS)})")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="feature sets to compare (default: all)")
    p.add_argument("--pooling", choices=POOLINGS, default="mean", help="token-latent pooling (default: mean)")
    p.add_argument("--window", type=int, default=None,
                   help="content tokens per window (default: window_size - 2*halo_size of the model config)")
    p.add_argument("--halo", type=int, default=None, help="context tokens on each side (default: halo_size)")
    p.add_argument("--batch-size", type=int, default=32, help="windows per forward pass (default: 32)")
    p.add_argument("--refit", choices=("train", "train+val"), default="train",
                   help="refit the chosen probe on train only (default) or on train+validation")
    p.add_argument("--raw-max-params", type=int, default=50_000,
                   help="skip the raw-weights baseline above this many weights per model (default: 50000)")
    p.add_argument("--device", default=None, help="torch device for SANE (default: cuda if available, else cpu)")
    p.add_argument("--no-plots", action="store_true", help="write metrics.json only")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
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
    """Scatter predicted vs true ``target`` on the test split, one panel per method; False if nothing to plot."""
    panels = [(m, r[target]) for m, r in report.results.items() if target in r and not r[target].skipped]
    if not panels:
        return False
    fig = _figure(4.0 * len(panels), 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (method, result) in zip(axes, panels):
        true, pred = result.true.astype(float), result.predictions.astype(float)
        lo, hi = min(true.min(), pred.min()), max(true.max(), pred.max())
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=1, ls="--")
        ax.scatter(true, pred, s=12, alpha=0.7)
        ax.set_title(f"{method}: R² = {result.value:.3f}")
        ax.set_xlabel(f"true {target}")
        ax.set_ylabel(f"predicted {target}")
    fig.suptitle(f"{target} of test models")
    fig.tight_layout()
    fig.savefig(path)
    return True


def plot_embedding_map(report: Any, path: Path, colour: str = _PLOT_PROPERTY) -> bool:
    """2-D PCA (fitted on train) of the SANE embeddings of every split, coloured by ``colour``."""
    import numpy as np
    from sklearn.decomposition import PCA

    if not report.embeddings or "train" not in report.embeddings:
        return False
    train = report.embeddings["train"]
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
    ax.set_title("SANE embeddings (PCA fitted on train)")
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


def run_probe(args: argparse.Namespace) -> int:
    import torch

    from sane_hf.modeling_sane import SaneModel
    from sane_hf.probing import evaluate_zoo_probes
    from sane_hf.tokenization_sane import WeightTokenizer
    from sane_hf.zoo.dataset import load_zoo

    start = time.perf_counter()
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
    if args.split_by == "model":
        zoo = resplit_by_model(zoo, tuple(args.split_fractions), args.seed)
    extra = [c for c in ("epoch", _PLOT_PROPERTY) if c not in args.targets]
    try:
        report = evaluate_zoo_probes(
            model, tokenizer, zoo, args.targets, methods=args.methods, window=args.window, halo=args.halo,
            batch_size=args.batch_size, pooling=args.pooling, refit=args.refit, raw_max_params=args.raw_max_params,
            extra_columns=extra, progress=not args.no_progress,
        )
    except ValueError as err:
        raise SystemExit(f"sane-hf probe: {err}") from err

    out = Path(args.out) if args.out is not None else model_dir / "probe"
    files = write_probe_artifacts(report, out, plots=not args.no_plots)
    payload = {
        **report.to_dict(),
        "model": str(model_dir),
        "zoo": str(args.zoo),
        "split_by": args.split_by,
        "device": device,
        "seconds": round(time.perf_counter() - start, 2),
        "files": files,
    }
    (out / "metrics.json").write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    print(report.table())
    for note in report.notes:
        print(f"note: {note}")
    print(f"wrote {', '.join(files)} to {out}")
    return 0
