"""Where does SANE's embedding lose to layer statistics? Grouped cross-validated probes of readouts.

For one trained SANE and its zoo, every checkpoint of every split is featurised several ways and a
Ridge probe of ``test_acc`` / ``epoch`` / ``ggap`` is scored by 5-fold cross-validation grouped by
model (a model's checkpoints never straddle folds; the penalty is chosen by an inner grouped
3-fold search). Cross-validation over all models has less variance than the protocol's one
small test split, which is why this diagnosis uses it. Features:

- ``layer statistics``: the baseline (:func:`~sane_hf.probing.layer_statistics`);
- ``tokens: layer mean + std``: per-layer mean and std of each coordinate of the normalised
  weight tokens, no SANE at all;
- ``tokens, rotated``: the same after one random rotation of the token coordinates (what any
  linear map into a latent space does to per-coordinate statistics);
- ``tokens, rotated, PCA basis``: the rotated tokens in a per-layer PCA basis fitted on the
  train split (a data-defined basis undoes the rotation);
- ``SANE latents: layer mean + std``: the library's readout (``pooling="layer"``);
- ``SANE latents, PCA basis``: the latents in a per-layer PCA basis fitted on the train split;
- ``SANE reconstructions: layer mean + std``: the decoded latents, read out like the tokens;
- ``SANE latents or reconstructions, chosen by inner CV``: per outer fold and target, whichever
  of the two SANE readouts has the lower inner grouped-CV error (as a probe would choose between
  them on its validation split), scored on the held-out fold;
- ``untrained SANE encoder: layer mean + std``: the control every learned representation needs —
  the same readout from a SANE of the same config that was never trained (``--untrained-seeds``
  initialisations, mean R² reported, each seed's value in the JSON). The difference to the
  trained latents is what self-supervised training added.

::

    python benchmarks/readout_diagnosis.py --model RUN_DIR --zoo ZOO_DIR [--out JSON]

Run on the five zoos of ``benchmarks/learning_curves.py`` (``--model $WORK/runs/<zoo>_recipe_s0
--zoo $WORK/zoos/<zoo>``), results in ``benchmarks/results/readout_diagnosis_<zoo>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

TARGETS = ("test_acc", "epoch", "ggap")
SPLITS = ("train", "validation", "test")
UNTRAINED = "untrained SANE encoder: layer mean + std"


def _print_row(name: str, row: dict[str, float]) -> None:
    print(f"{name:46s} " + "  ".join(f"{t} {v:+.3f}" for t, v in row.items()), flush=True)


def cv_r2(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = 5) -> float:
    """Out-of-fold R² of a standardised Ridge, penalty chosen by inner grouped CV."""
    pred = np.zeros_like(y)
    for train, test in GroupKFold(folds).split(x, y, groups):
        search = _search()
        search.fit(x[train], y[train], groups=groups[train])
        pred[test] = search.predict(x[test])
    return float(1.0 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def _search() -> GridSearchCV:
    return GridSearchCV(make_pipeline(StandardScaler(), Ridge()), {"ridge__alpha": np.logspace(-2, 6, 9)},
                        cv=GroupKFold(3), scoring="neg_mean_squared_error")


def cv_r2_chosen(xs: list[np.ndarray], y: np.ndarray, groups: np.ndarray, folds: int = 5) -> tuple[float, list[int]]:
    """Out-of-fold R² when each outer fold uses the feature set (of ``xs``) with the best inner CV score.

    Returns the R² and the index of the set chosen in each fold."""
    pred, chosen = np.zeros_like(y), []
    for train, test in GroupKFold(folds).split(xs[0], y, groups):
        fits = [_search().fit(x[train], y[train], groups=groups[train]) for x in xs]
        best = int(np.argmax([f.best_score_ for f in fits]))
        chosen.append(best)
        pred[test] = fits[best].predict(xs[best][test])
    return float(1.0 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()), chosen


def pca_basis(x: torch.Tensor, layer_ids: torch.Tensor, num_train: int) -> torch.Tensor:
    """``(n, N, D)`` → the same in a per-layer PCA basis fitted on the first ``num_train`` rows."""
    out = x.clone()
    for layer in range(int(layer_ids.max()) + 1):
        sel = layer_ids == layer
        fit = x[:num_train, sel].reshape(-1, x.shape[-1])  # (num_train·tokens, D)
        centre = fit.mean(0)
        _, _, vh = torch.linalg.svd(fit - centre, full_matrices=False)
        out[:, sel] = (x[:, sel] - centre) @ vh.T
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a trained SANE folder (with its tokenizer)")
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON to write (default: benchmarks/results/readout_diagnosis_<zoo folder name>.json)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random rotation")
    parser.add_argument("--untrained-seeds", type=int, default=3,
                        help="initialisations of the untrained-encoder control (0 to skip it)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(__file__).parent / "results" / f"readout_diagnosis_{args.zoo.name}.json"
    torch.set_num_threads(1)
    from sane_hf import load_zoo
    from sane_hf.embedding import decode_haloed, embed_models, layer_pool
    from sane_hf.modeling_sane import SaneModel
    from sane_hf.probing import layer_statistics
    from sane_hf.state_dict_io import state_dict_from_bytes
    from sane_hf.tokenization_sane import WeightTokenizer

    start = time.perf_counter()
    zoo = load_zoo(args.zoo)
    model = SaneModel.from_pretrained(args.model).eval()
    tokenizer = WeightTokenizer.from_pretrained(args.model)
    untrained = []
    for seed in range(args.untrained_seeds):  # same config, never trained: what training adds is the difference
        torch.manual_seed(seed)
        untrained.append(SaneModel(model.config).eval())
    tokens, latents, recon, stats, ys, groups = [], [], [], [], {t: [] for t in TARGETS}, []
    untrained_pooled: list[list[np.ndarray]] = [[] for _ in untrained]
    for split in SPLITS:
        ds = zoo[split]
        encoded = tokenizer.encode_batch([state_dict_from_bytes(b) for b in ds["weights"]], normalize=True)
        layer_ids = encoded.positions[0, :, 1].long()
        z = embed_models(model, tokenizer, ds, pooling="layer", return_token_latents=True, batch_size=64).token_latents
        with torch.no_grad():  # decoded window by window with halos, as the latents were encoded
            out = torch.stack([decode_haloed(model, z[i], encoded.positions[i].long()) for i in range(len(z))])
        tokens.append(encoded.tokens.double())
        recon.append((out * encoded.mask).double())  # padding values are not part of a model
        latents.append(z.double())
        for pooled, control in zip(untrained_pooled, untrained):
            pooled.append(embed_models(control, tokenizer, encoded, pooling="layer", batch_size=64).embeddings.double().numpy())
        stats.append(layer_statistics(ds, tokenizer))
        for t in TARGETS:
            ys[t].append(np.asarray(ds[t], dtype=np.float64))
        groups.append(np.asarray(ds["model_id"]))
    num_train = len(zoo["train"])
    tok, lat, rec = torch.cat(tokens), torch.cat(latents), torch.cat(recon)
    y = {t: np.concatenate(v) for t, v in ys.items()}
    g = np.concatenate(groups)
    gen = torch.Generator().manual_seed(args.seed)
    rotation = torch.linalg.qr(torch.randn(tok.shape[-1], tok.shape[-1], generator=gen, dtype=torch.float64))[0]
    features = {
        "layer statistics": np.concatenate(stats),
        "tokens: layer mean + std": layer_pool(tok, layer_ids).numpy(),
        "tokens, rotated: layer mean + std": layer_pool(tok @ rotation, layer_ids).numpy(),
        "tokens, rotated, PCA basis: layer mean + std": layer_pool(pca_basis(tok @ rotation, layer_ids, num_train),
                                                                   layer_ids).numpy(),
        "SANE latents: layer mean + std": layer_pool(lat, layer_ids).numpy(),
        "SANE latents, PCA basis: layer mean + std": layer_pool(pca_basis(lat, layer_ids, num_train), layer_ids).numpy(),
        "SANE reconstructions: layer mean + std": layer_pool(rec, layer_ids).numpy(),
    }
    rows = {}
    for name, x in features.items():
        rows[name] = {t: round(cv_r2(x, y[t], g), 4) for t in TARGETS}
        _print_row(name, rows[name])
    name = "SANE latents or reconstructions, chosen by inner CV"
    pair = [features["SANE latents: layer mean + std"], features["SANE reconstructions: layer mean + std"]]
    rows[name], choices = {}, {}
    for t in TARGETS:
        rows[name][t], picked = cv_r2_chosen(pair, y[t], g)
        rows[name][t] = round(rows[name][t], 4)
        choices[t] = ["latents" if i == 0 else "reconstructions" for i in picked]
    _print_row(name, rows[name])
    untrained_seeds = {}
    if untrained:
        per_seed = [{t: cv_r2(np.concatenate(pooled), y[t], g) for t in TARGETS} for pooled in untrained_pooled]
        untrained_seeds = {t: [round(r[t], 4) for r in per_seed] for t in TARGETS}
        rows[UNTRAINED] = {t: round(float(np.mean([r[t] for r in per_seed])), 4) for t in TARGETS}
        _print_row(UNTRAINED, rows[UNTRAINED])
    sane, baseline = rows["SANE latents: layer mean + std"]["test_acc"], rows["layer statistics"]["test_acc"]
    def compare(value: float) -> str:  # CV R² differences under 0.01 are well inside the seed-to-seed spread
        return "is level with" if abs(value - baseline) < 0.01 else "beats" if value > baseline else "loses to"

    verdict = (f"SANE's layer readout {compare(sane)} layer statistics on test_acc "
               f"(CV R² {sane:.3f} vs {baseline:.3f}); decoded, the same latents give "
               f"{rows['SANE reconstructions: layer mean + std']['test_acc']:.3f}, and choosing between the two "
               f"by inner CV {rows[name]['test_acc']:.3f} ({compare(rows[name]['test_acc'])} layer statistics).")
    if untrained:
        control = rows[UNTRAINED]["test_acc"]
        gain = sane - control
        added = "adds nothing measurable to" if abs(gain) < 0.01 else "adds to" if gain > 0 else "falls below"
        verdict += (f" Self-supervised training {added} an untrained encoder of the same config "
                    f"({sane:.3f} vs {control:.3f}, mean of {len(untrained)} initialisations).")
    print(verdict)
    from quality import machine  # benchmarks/ is on sys.path when this file runs as a script

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": str(args.model), "zoo": str(args.zoo), "machine": machine(), "cv": "5-fold GroupKFold by model_id",
        "rows": rows, "chosen_per_fold": choices, "untrained_per_seed": untrained_seeds, "verdict": verdict,
        "seconds": round(time.perf_counter() - start, 1),
        "command": "python benchmarks/readout_diagnosis.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "note": "$WORK: benchmarks/learning_curves.py's work dir; --model $WORK/runs/<zoo>_recipe_s<seed>",
    }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
