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
- ``SANE reconstructions: layer mean + std``: the decoded latents, read out like the tokens.

::

    python benchmarks/readout_diagnosis.py --model RUN_DIR --zoo ZOO_DIR
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


def cv_r2(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = 5) -> float:
    """Out-of-fold R² of a standardised Ridge, penalty chosen by inner grouped CV."""
    pred = np.zeros_like(y)
    for train, test in GroupKFold(folds).split(x, y, groups):
        search = GridSearchCV(make_pipeline(StandardScaler(), Ridge()), {"ridge__alpha": np.logspace(-2, 6, 9)},
                              cv=GroupKFold(3), scoring="neg_mean_squared_error")
        search.fit(x[train], y[train], groups=groups[train])
        pred[test] = search.predict(x[test])
    return float(1.0 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())


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
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "readout_diagnosis.json")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random rotation")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from sane_hf import load_zoo
    from sane_hf.embedding import embed_models, layer_pool
    from sane_hf.modeling_sane import SaneModel
    from sane_hf.probing import layer_statistics
    from sane_hf.state_dict_io import state_dict_from_bytes
    from sane_hf.tokenization_sane import WeightTokenizer

    start = time.perf_counter()
    zoo = load_zoo(args.zoo)
    model = SaneModel.from_pretrained(args.model).eval()
    tokenizer = WeightTokenizer.from_pretrained(args.model)
    tokens, latents, recon, stats, ys, groups = [], [], [], [], {t: [] for t in TARGETS}, []
    for split in SPLITS:
        ds = zoo[split]
        encoded = tokenizer.encode_batch([state_dict_from_bytes(b) for b in ds["weights"]], normalize=True)
        layer_ids = encoded.positions[0, :, 1].long()
        with torch.no_grad():
            out = model(encoded.tokens, encoded.positions.long())
        tokens.append(encoded.tokens.double())
        recon.append((out.reconstruction * encoded.mask).double())  # padding values are not part of a model
        latents.append(embed_models(model, tokenizer, ds, pooling="layer", return_token_latents=True,
                                    batch_size=64).token_latents.double())
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
        print(f"{name:46s} " + "  ".join(f"{t} {v:+.3f}" for t, v in rows[name].items()), flush=True)
    sane, baseline = rows["SANE latents: layer mean + std"]["test_acc"], rows["layer statistics"]["test_acc"]
    verdict = (f"SANE's layer readout {'beats' if sane > baseline else 'loses to'} layer statistics on test_acc "
               f"(CV R² {sane:.3f} vs {baseline:.3f}); decoded, the same latents give "
               f"{rows['SANE reconstructions: layer mean + std']['test_acc']:.3f}.")
    print(verdict)
    from quality import machine  # benchmarks/ is on sys.path when this file runs as a script

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": str(args.model), "zoo": str(args.zoo), "machine": machine(), "cv": "5-fold GroupKFold by model_id",
        "rows": rows, "verdict": verdict, "seconds": round(time.perf_counter() - start, 1),
        "command": "python benchmarks/readout_diagnosis.py --model $WORK/runs/quickstart_recipe_s0 "
                   "--zoo $WORK/zoos/quickstart  # $WORK: benchmarks/learning_curves.py's work dir",
    }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
