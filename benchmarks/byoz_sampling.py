"""Sample diversity on a "bring your own zoo": anchor spreading and residual decoding, measured.

Builds the zoo of ``tests/test_bring_your_own_zoo.py`` at a larger size (a gated MLP with
LayerNorm, unknown to the registry, on a synthetic 3-class task; ``--models`` models × epochs 0–3,
trained by the user's own loop, imported with ``--arch``/``--task`` entry points), trains a small
SANE on it through ``sane-hf train``, then runs ``sane-hf sample --evaluate`` (fine-tuning epochs
0 and 1) for every combination of

- ``--spread-anchors no`` (the globally best candidates by training accuracy) / ``yes`` (default:
  each prompt's best first),
- ``--residual no`` (plain decoding, default) / ``yes`` (prompt + decoder change),

and records per variant: the samples' mean pairwise distance beside the prompts' (ratio), prompts
used as anchors, mean distance to the nearest prompt, and test accuracy at epoch 0/1 of samples,
prompts, noise at matched distance, noise at matched accuracy and random init. Results:
``benchmarks/results/byoz_sampling.json``.

    python benchmarks/byoz_sampling.py                 # 40 models, 1500 SANE steps
    python benchmarks/byoz_sampling.py --models 20 --steps 300
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=40)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "byoz_sampling.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import test_bring_your_own_zoo as byoz

    from sane_hf.cli import main as cli

    byoz.NUM_MODELS = args.models
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        code = byoz.write_user_code(tmp)
        src = tmp / "runs"
        byoz.train_user_zoo(src, code)
        zoo, run = tmp / "zoo", tmp / "run"
        cli(["zoo", "import", "--format", "folder", str(src), "--out", str(zoo), "--arch", f"{code}:build_net",
             "--task", f"{code}:load_data", "--split-fractions", "0.5", "0.2", "0.3", "--no-progress"])
        cli(["train", "--zoo", str(zoo), "--out", str(run), "--token-size", "8", "--config", "small",
             "--batch-size", "16", "--max-steps", str(args.steps), "--save-steps", "0",
             "--num-threads", str(args.threads), "--no-progress"])
        train_metrics = json.loads((run / "metrics.json").read_text())
        results = []
        for spread in ("no", "yes"):
            for residual in ("no", "yes"):
                out = tmp / f"s-{spread}-{residual}"
                cli(["sample", "--model", str(run), "--zoo", str(zoo), "--out", str(out), "--evaluate",
                     "--num-samples", str(args.samples), "--num-prompts", str(args.prompts),
                     "--finetune-epochs", "0,1", "--max-neighbours", "20", "--transfer-task", "none",
                     "--spread-anchors", spread, "--residual", residual, "--no-plots", "--no-progress"])
                m = json.loads((out / "metrics.json").read_text())
                div = m["sampling"]["diversity"]
                acc = {g: {e: c[e]["mean"] for e in c} for g, c in m["accuracy"].items()}
                results.append({
                    "spread_anchors": spread, "residual": residual,
                    "diversity_ratio": div["ratio"],
                    "samples_mean_pairwise_distance": div["samples_mean_pairwise_distance"],
                    "prompts_mean_pairwise_distance": div["prompts_mean_pairwise_distance"],
                    "anchors_used": div["anchors_used"], "anchor_histogram": div["anchor_histogram"],
                    "distance_to_nearest_prompt": m["novelty"]["sampled"]["prompt_distance"]["mean"],
                    "accuracy": acc,
                })
    payload = {
        "command": "python benchmarks/byoz_sampling.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads},
        "zoo": {"models": args.models, "epochs": list(byoz.EPOCHS), "arch": "gated MLP + LayerNorm (231 params)"},
        "sane": {"steps": args.steps, "val_loss": train_metrics.get("val_loss"),
                 "train_loss": train_metrics.get("train_loss")},
        "results": results,
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    for r in results:
        a = r["accuracy"]
        print(f"spread={r['spread_anchors']:<3} residual={r['residual']:<3} diversity ratio {r['diversity_ratio']:.3f} "
              f"anchors {r['anchors_used']}  epoch0: sampled {a['sampled']['0']:.3f} prompts {a['prompts']['0']:.3f} "
              f"noise {a['noise']['0']:.3f} random {a['random_init']['0']:.3f}  epoch1: sampled {a['sampled']['1']:.3f} "
              f"random {a['random_init']['1']:.3f}")


if __name__ == "__main__":
    main()
