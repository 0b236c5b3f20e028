"""Does SANE's embedding add anything to layer statistics? Grouped k-fold probes on every zoo.

For each zoo of ``benchmarks/learning_curves.py`` and each of its trained recipe runs
(``$WORK/runs/<zoo>_recipe_s<seed>``), the library's :func:`~sane_hf.probe_cv.cross_validate_zoo_probes`
(what ``sane-hf probe --split-by model --folds 5`` runs) probes ``test_acc``, ``epoch`` and ``ggap``
with three methods: SANE (the default ``layer`` readout), layer statistics, and ``sane+stats`` (the
two probes blended on each fold's validation part, :mod:`sane_hf.probe_blend`). Every model is
tested once; a model's checkpoints never straddle folds. 5-fold grouped CV has far less variance
than one small fixed test split, which is why this benchmark uses it.

::

    python benchmarks/learning_curves.py --only '*/recipe/*'     # the trained runs (cached)
    python benchmarks/blend_cv.py [--work DIR] [--update-readme]

Results: ``benchmarks/results/blend_cv.json`` and ``blend_cv.md``; ``--update-readme`` fills README's
``<!-- blend:start -->`` block.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning_curves import DEFAULT_WORK  # noqa: E402
from quality import machine  # noqa: E402
from render_readme import write_results  # noqa: E402

TARGETS = ("test_acc", "epoch", "ggap")
METHODS = ("sane", "layer_stats", "sane+stats")
ZOOS = ("quickstart", "digits-200", "digits-800", "fashion", "resnet-w4", "foreign")
#: Differences of CV R² under this are reported as level (well inside the seed-to-seed spread).
LEVEL = 0.005


def measure(work: Path, zoo: str, folds: int, force: bool = False) -> dict[str, Any] | None:
    import torch

    from sane_hf import load_zoo
    from sane_hf.modeling_sane import SaneModel
    from sane_hf.probe_cv import cross_validate_zoo_probes
    from sane_hf.tokenization_sane import WeightTokenizer

    torch.set_num_threads(1)
    runs = sorted((work / "runs").glob(f"{zoo}_recipe_s[0-9]"))
    if not runs or not (work / "zoos" / zoo).exists():
        return None
    cache = work / "blend" / f"{zoo}_folds{folds}.json"  # a zoo's result, reused unless --force
    cached = json.loads(cache.read_text()) if cache.exists() and not force else None
    if cached is not None and cached["runs"] == [r.name for r in runs]:
        return cached
    data = load_zoo(work / "zoos" / zoo)
    per_seed = []
    for run in runs:
        model = SaneModel.from_pretrained(run).eval()
        tokenizer = WeightTokenizer.from_pretrained(run)
        report = cross_validate_zoo_probes(model, tokenizer, data, TARGETS, folds=folds, methods=METHODS,
                                           num_threads=1)  # fmt: skip
        per_seed.append({"run": run.name, "metrics": {t: dict(report[t]) for t in TARGETS}})
        print(zoo, run.name, {t: {m: round(v, 3) for m, v in report[t].items()} for t in TARGETS}, flush=True)
    models = len({m for split in data for m in data[split]["model_id"]})
    summary = {t: {m: {"mean": mean(s["metrics"][t][m] for s in per_seed),
                       "std": pstdev([s["metrics"][t][m] for s in per_seed])} for m in METHODS} for t in TARGETS}
    result = {"zoo": zoo, "models": models, "checkpoints": sum(len(data[s]) for s in data), "seeds": len(per_seed),
              "runs": [r.name for r in runs], "per_seed": per_seed, "summary": summary}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.with_suffix(".tmp").write_text(json.dumps(result, indent=1))
    os.replace(cache.with_suffix(".tmp"), cache)
    return result


def _cell(entry: dict[str, float], seeds: int) -> str:
    return f"{entry['mean']:.3f} ± {entry['std']:.3f}" if seeds > 1 else f"{entry['mean']:.3f}"


def render(result: dict[str, Any]) -> str:
    rows = result["zoos"]
    lines = [
        f"Measured by `benchmarks/blend_cv.py` on {result['machine']['platform']} ({result['machine']['cpu_count']} CPU "
        f"cores, torch {result['machine']['torch']}): {result['folds']}-fold cross-validation grouped by model "
        "(`sane-hf probe --split-by model`), R², mean ± std over the recipe's seeds "
        "(`benchmarks/learning_curves.py` runs, 1,000 steps). *SANE + stats* blends the SANE and layer-statistics "
        "probes on each fold's validation part (`methods=(..., \"sane+stats\")`).",
        "",
        "| zoo | models | seeds | " + " | ".join(f"{t}: SANE | stats | SANE + stats" for t in TARGETS) + " |",
        "|---|---|---|" + "---|---|---|" * len(TARGETS),
    ]
    for r in rows:
        cells = [_cell(r["summary"][t][m], r["seeds"]) for t in TARGETS for m in METHODS]
        lines.append(f"| {r['zoo']} | {r['models']} | {r['seeds']} | " + " | ".join(cells) + " |")
    lines.append("")
    for t in TARGETS:
        alone = [r["zoo"] for r in rows if r["summary"][t]["sane"]["mean"] >= r["summary"][t]["layer_stats"]["mean"]]
        blend = {r["zoo"]: r["summary"][t]["sane+stats"]["mean"] - r["summary"][t]["layer_stats"]["mean"] for r in rows}
        above = [z for z, d in blend.items() if d >= LEVEL]
        level = [z for z, d in blend.items() if abs(d) < LEVEL]
        below = [z for z, d in blend.items() if d <= -LEVEL]
        lines.append(
            f"- **{t}**: SANE alone reaches layer statistics on {len(alone)} of {len(rows)} zoos"
            f"{' (' + ', '.join(alone) + ')' if alone else ''}. Blended with them, SANE adds to them on "
            f"{len(above)} ({', '.join(f'{z} {blend[z]:+.3f}' for z in above) or 'none'}), is level on {len(level)}"
            f"{' (' + ', '.join(level) + ')' if level else ''} and falls below them on {len(below)}"
            f"{' (' + ', '.join(f'{z} {blend[z]:+.3f}' for z in below) + ')' if below else ''}."
        )
    lines += ["", f"Reproduce: `{result['command']}`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="learning_curves.py's work dir (zoos, runs)")
    p.add_argument("--zoos", nargs="+", default=list(ZOOS))
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--jobs", type=int, default=1, help="zoos measured side by side (one process each)")
    p.add_argument("--force", action="store_true", help="remeasure zoos cached under $WORK/blend")
    p.add_argument("--update-readme", action="store_true")
    args = p.parse_args(argv)
    start = time.perf_counter()
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        n = len(args.zoos)
        measured = list(pool.map(measure, [args.work] * n, args.zoos, [args.folds] * n, [args.force] * n))
    zoos = [r for r in measured if r is not None]
    if not zoos:
        raise SystemExit(f"no recipe runs under {args.work}/runs: run benchmarks/learning_curves.py first")
    result = {"machine": machine(), "folds": args.folds, "zoos": zoos, "seconds": round(time.perf_counter() - start, 1),
              "command": "python benchmarks/blend_cv.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                                           if (argv or sys.argv[1:]) else "")}
    text = render(result)
    write_results("blend_cv", result, text, "blend" if args.update_readme else None)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
