"""Learning curves of SANE: quality against training steps and CPU-seconds, with ablations.

Each row trains one SANE (the library's :func:`~sane_hf.training.train_sane`, one torch thread) on
one zoo and, at a few steps along the way, saves the model; afterwards every saved point is
measured with the project's own evaluation code:

- validation reconstruction R² (``train_sane``'s eval history),
- probe R² of ``test_acc``, ``epoch`` and ``ggap`` on the zoo's test split (Ridge, penalty chosen
  on validation: :func:`~sane_hf.probing.evaluate_zoo_probes`) with the row's readout, beside the
  layer-statistics baseline on the same split; at the last point every readout
  (``layer``, ``mean``, ``flatten``) is measured too,
- epoch-0 accuracy of sampled models against random init and prompts + noise at matched distance
  (:func:`~sane_hf.evaluation.evaluate_sampling`, no fine-tuning, no transfer) at the last point
  (``--sample-every-point`` for all points).

CPU-seconds are the training process's own CPU time (``time.process_time``) at each saved step,
so they do not depend on what else the machine runs. Rows are cached as
``$WORK/rows/<row>.json``: rerunning skips finished rows (``--force`` redoes them) and a row's
training resumes from its last checkpoint. Results: ``benchmarks/results/learning_curves.json``
and ``learning_curves.md`` (rendered; ``--update-readme`` also fills README's block).

::

    python benchmarks/learning_curves.py --list                   # rows and whether cached
    python benchmarks/learning_curves.py --only 'quickstart/recipe/*' --jobs 2
    python benchmarks/learning_curves.py                           # every row of the profile
    python benchmarks/learning_curves.py --collect-only --update-readme
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_WORK = Path(os.environ.get("SANE_BENCH_WORK", "/tmp/sane-hf-bench/curves"))
TARGETS = ("test_acc", "epoch", "ggap")
READOUTS = ("layer", "mean", "flatten")

# ----------------------------------------------------------------------------------------------
# zoos and variants
# ----------------------------------------------------------------------------------------------

_BUILD = ["-m", "sane_hf.cli", "zoo", "build"]
#: The command (after ``python``, without ``--out``) that builds each zoo.
ZOOS: dict[str, list[str]] = {
    # the quickstart's zoo (QuickstartConfig's default ZooConfig): 100 models x 7 checkpoints
    "quickstart": [*_BUILD, "--task", "digits", "--arch", "cnn-s", "--num-models", "100", "--epochs", "10",
                   "--checkpoint-epochs", "0", "1", "2", "3", "5", "7", "10", "--grid",
                   '{"optimizers": ["adam"], "lr_range": [0.0001, 0.003]}', "--seed", "0", "--num-workers", "2"],
    # the 200-model digits zoo of benchmarks/quality.py (SGD and Adam grid)
    "digits-200": [*_BUILD, "--task", "digits", "--arch", "cnn-s", "--num-models", "200", "--epochs", "10",
                   "--checkpoint-epochs", "0", "1", "2", "3", "5", "7", "10", "--seed", "0", "--num-workers", "2"],
    # the same grid with 4x the models: does SANE's gap to layer statistics shrink with zoo size?
    "digits-800": [*_BUILD, "--task", "digits", "--arch", "cnn-s", "--num-models", "800", "--epochs", "10",
                   "--checkpoint-epochs", "0", "1", "2", "3", "5", "7", "10", "--seed", "0", "--num-workers", "2"],
    # confirmation zoos, never used to choose the recipe:
    # Fashion-MNIST at 14x14 (benchmarks/quality.py's fashion-cnn-s zoo)
    "fashion": [*_BUILD, "--task", "fashion-mnist", "--arch", "cnn-s", "--image-size", "14", "--train-subset", "5000",
                "--eval-subset", "2000", "--num-models", "60", "--epochs", "6", "--checkpoint-epochs", "0", "1", "2",
                "4", "6", "--seed", "0", "--num-workers", "2"],
    # the ResNet-18 stand-in (CIFAR-style ResNet-18 at width 4, BatchNorm, ~44k parameters) on digits
    "resnet-w4": [*_BUILD, "--task", "digits", "--arch", "resnet18", "--arch-kwargs", '{"width": 4}', "--num-models",
                  "30", "--epochs", "6", "--checkpoint-epochs", "0", "2", "6", "--seed", "0", "--num-workers", "2"],
    # a task and architecture family with no builder here (1-D CNN + LayerNorm on synthetic signals), trained by
    # a user's own loop and imported with `sane-hf zoo import --format folder` (benchmarks/foreign_zoo.py)
    "foreign": [str(Path(__file__).resolve().parent / "foreign_zoo.py"), "--models", "100"],
}


@dataclass(frozen=True)
class Variant:
    """A change to the recipe: ``SaneConfig`` / ``SaneTrainingConfig`` overrides and the probe readout."""

    description: str
    model: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    readout: str = "layer"
    token_size: int = 64
    whole_model_window: bool = False  # one window over the whole model even when it is longer than the preset's


#: The recipe is the library's defaults (``sane_config_preset("small", num_tokens=...)``: a whole-model window when
#: the model is shorter than the preset's window of 64,
#: ``SaneTrainingConfig()``, ``DEFAULT_POOLING``); every other variant changes one thing.
VARIANTS: dict[str, Variant] = {
    "recipe": Variant("the recipe: library defaults (small preset: windows of 64 tokens, the whole model when shorter; layer readout)"),
    "recipe-3000": Variant("the recipe trained for 3,000 steps (is the gap compute?)"),
    "old-defaults": Variant(
        "the quickstart before this study: unscaled sinusoid + learned l/k tables, dropout 0.1, latent 16, "
        "flatten readout",
        model={"position_encoding": "learned-tables", "dropout": 0.1, "latent_dim": 16}, readout="flatten",
    ),
    "old-positions": Variant("learned-tables position code (unscaled sinusoid + l/k tables)",
                             model={"position_encoding": "learned-tables"}),
    "dropout0.1": Variant("dropout 0.1", model={"dropout": 0.1}),
    "latent16": Variant("latent_dim 16 (4x compression of a 64-value token)", model={"latent_dim": 16}),
    "no-latent-norm": Variant("no final LayerNorm before the latent projection", model={"latent_norm": False}),
    "window32": Variant("windows of 32 tokens (shorter than the model)", model={"window_size": 32, "halo_size": 0}),
    "token32": Variant("token size 32 (a whole-model window of 60 tokens)", token_size=32, whole_model_window=True),
    "d128-4+4": Variant("d_model 128, 4+4 layers (the 'defaults' preset's width and depth)",
                        model={"d_model": 128, "num_encoder_layers": 4, "num_decoder_layers": 4}),
    "lr3e-3": Variant("learning rate 3e-3", training={"learning_rate": 3e-3}),
    "cosine": Variant("cosine schedule instead of one-cycle", training={"lr_scheduler": "cosine"}),
    "batch64": Variant("batch 64", training={"batch_size": 64}),
    "gamma0.5": Variant("gamma 0.5 (contrast weighted like reconstruction)", model={"gamma": 0.5}),
    "no-permutation": Variant("no permutation views", training={"permutation": False}),
    "no-latent-norm+token32": Variant("no final LayerNorm before the latent, token size 32 (whole-model window)",
                                      model={"latent_norm": False}, token_size=32, whole_model_window=True),
    "no-latent-norm+gamma0.5": Variant("no final LayerNorm before the latent, gamma 0.5",
                                       model={"latent_norm": False, "gamma": 0.5}),
    "no-noise-erase": Variant("no noise, no erasing", training={"noise_std": 0.0, "erase_prob": 0.0}),
}


@dataclass(frozen=True)
class Row:
    zoo: str
    variant: str
    seed: int
    steps: int
    points: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.zoo}/{self.variant}/s{self.seed}"


def rows() -> list[Row]:
    curve = (100, 250, 500, 1000)
    out = [Row("quickstart", "recipe", s, 1000, curve) for s in (0, 1, 2)]
    out += [Row("digits-200", "recipe", s, 1000, curve) for s in (0, 1, 2)]
    out += [Row("digits-200", "recipe-3000", 0, 3000, (1000, 2000, 3000))]
    out += [Row("digits-800", "recipe", s, 1000, curve) for s in (0, 1, 2)]
    out += [Row("digits-800", "recipe-3000", 0, 3000, (1000, 2000, 3000))]
    out += [Row("foreign", "recipe", s, 1000, curve) for s in (0, 1, 2)]
    out += [Row(z, "recipe", 0, 1000, curve) for z in ("fashion", "resnet-w4")]
    out += [Row("quickstart", "old-defaults", 0, 1000, curve)]
    out += [Row("digits-200", "old-defaults", 0, 1000, curve)]
    out += [Row("quickstart", v, 0, 500, (250, 500)) for v in VARIANTS if v not in ("recipe", "recipe-3000", "old-defaults")]
    # the candidate changes, checked on the second zoo before any was adopted
    out += [Row("digits-200", v, 0, 500, (250, 500)) for v in ("no-latent-norm", "no-latent-norm+token32")]
    return out


# ----------------------------------------------------------------------------------------------
# one row
# ----------------------------------------------------------------------------------------------


def build_zoo(work: Path, zoo: str) -> Path:
    out = work / "zoos" / zoo
    if not (out / "zoo_summary.json").exists():
        cmd = [sys.executable, *ZOOS[zoo], "--out", str(out)] + (["--no-progress"] if ZOOS[zoo][:1] == ["-m"] else [])
        subprocess.run(cmd, check=True)
    return out


def _measure(model_dir: Path, zoo_dir: Path, readouts: tuple[str, ...], sample: bool, seed: int) -> dict[str, Any]:
    from sane_hf import load_zoo
    from sane_hf.evaluation import SamplingEvalConfig, evaluate_sampling
    from sane_hf.modeling_sane import SaneModel
    from sane_hf.probing import evaluate_zoo_probes
    from sane_hf.tokenization_sane import WeightTokenizer
    from sane_hf.zoo import ZooConfig

    model = SaneModel.from_pretrained(model_dir).eval()
    tokenizer = WeightTokenizer.from_pretrained(model_dir)
    zoo = load_zoo(zoo_dir)
    out: dict[str, Any] = {"probe": {}}
    for readout in readouts:
        methods = ("sane", "layer_stats") if readout == readouts[0] else ("sane",)
        report = evaluate_zoo_probes(model, tokenizer, zoo, TARGETS, methods=methods, pooling=readout)
        out["probe"][readout] = {t: dict(row) for t, row in report.items()}
    if sample:
        cfg = SamplingEvalConfig(
            num_samples=8, num_prompts=8, bandwidth=0.1, score="train-acc", candidates=32, finetune_epochs=(0,),
            max_neighbours=20, transfer_task="none", seed=seed, spread_anchors=False,  # the global best 8
            residual=False,  # the rows were measured with plain decoding (the sampler's default before 2026-12-02)
        )
        zoo_config = ZooConfig.from_json_file(zoo_dir / "zoo_config.json")
        metrics = evaluate_sampling(model, tokenizer, zoo, zoo_config, cfg, out_dir=model_dir / "samples")
        acc = metrics["accuracy"]
        out["sampling_epoch0"] = {g: acc[g]["0"]["mean"] for g in acc if "0" in acc[g]}
    return out


def run_row(row: Row, work: Path) -> dict[str, Any]:
    import torch

    from sane_hf import load_zoo
    from sane_hf.state_dict_io import state_dict_from_bytes
    from sane_hf.tokenization_sane import WeightTokenizer
    from sane_hf.training import SaneTrainingConfig, latest_checkpoint, sane_config_preset, train_sane

    torch.set_num_threads(1)
    variant = VARIANTS[row.variant]
    zoo_dir = build_zoo(work, row.zoo)
    run_dir = work / "runs" / row.name.replace("/", "_")
    curve_file = run_dir / "curve.json"
    cpu: dict[int, float] = json.loads(curve_file.read_text()) if curve_file.exists() else {}
    cpu = {int(k): v for k, v in cpu.items()}
    if not (run_dir / "metrics.json").exists():
        first = load_zoo(zoo_dir)["train"][0]["weights"]
        num_tokens = WeightTokenizer.from_reference(state_dict_from_bytes(first), token_size=variant.token_size).num_tokens
        if variant.whole_model_window:
            config = sane_config_preset("small", token_size=variant.token_size, window_size=num_tokens, halo_size=0,
                                        **variant.model)
        else:  # the library's rule (as `sane-hf train`): a whole-model window when the model is shorter than the preset's
            config = sane_config_preset("small", token_size=variant.token_size, num_tokens=num_tokens, **variant.model)
        training = SaneTrainingConfig(**{
            "output_dir": str(run_dir), "max_steps": row.steps, "eval_steps": min(row.points), "save_steps": 250,
            "save_total_limit": 1, "seed": row.seed, "num_threads": 1, "progress": False,
            "resume": latest_checkpoint(run_dir) is not None, **variant.training,
        })
        offset = max(cpu.values(), default=0.0)  # CPU time of an interrupted earlier part
        start = time.process_time()

        def callback(info: Any) -> None:
            if info.step in row.points:
                cpu[info.step] = offset + time.process_time() - start
                info.model.save_pretrained(run_dir / "points" / f"step_{info.step}")
                curve_file.write_text(json.dumps(cpu))

        train_sane(config, zoo_dir, training, step_callback=callback)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = {int(h["step"]): h.get("val_reconstruction_r2") for h in metrics.get("eval_history", [])}
    points = []
    for step in row.points:
        point_dir = run_dir / "points" / f"step_{step}"
        (point_dir / "weight_tokenizer.json").write_bytes((run_dir / "weight_tokenizer.json").read_bytes())
        last = step == row.points[-1]
        readouts = (variant.readout, *[r for r in READOUTS if r != variant.readout]) if last else (variant.readout,)
        measured = _measure(point_dir, zoo_dir, readouts, sample=last, seed=row.seed)
        points.append({"step": step, "cpu_seconds": round(cpu.get(step, float("nan")), 1),
                       "val_reconstruction_r2": history.get(step), **measured})
    return {"row": row.name, "zoo": row.zoo, "variant": row.variant, "description": variant.description,
            "seed": row.seed, "readout": variant.readout, "token_size": variant.token_size,
            "model": variant.model, "training": variant.training, "points": points,
            "command": f"python benchmarks/learning_curves.py --only '{row.name}'"}


# ----------------------------------------------------------------------------------------------
# collection and rendering
# ----------------------------------------------------------------------------------------------


def _ms(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{mean(values):.3f} ± {pstdev(values):.3f}"


def collect(work: Path) -> dict[str, Any]:
    done = {}
    for row in rows():
        f = work / "rows" / f"{row.name.replace('/', '_')}.json"
        if f.exists():
            done[row.name] = json.loads(f.read_text())
    from quality import machine  # benchmarks/ is on sys.path when this file runs as a script

    return {"machine": machine(), "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": done}


def render(result: dict[str, Any]) -> str:
    rows_ = result["rows"]
    lines = [
        "## Learning curves",
        "",
        f"Measured by `benchmarks/learning_curves.py` on {result['machine']['platform']} "
        f"({result['machine']['cpu_count']} CPU cores, torch {result['machine']['torch']}), one torch thread per run; "
        "CPU-seconds are the training process's own CPU time. Probe R² on each zoo's fixed test split "
        "(Ridge, penalty chosen on validation); layer statistics on the same split. Samples are the best 8 of 32 "
        "candidates by training accuracy around the 8 best test models, not spread over the prompts "
        "(`spread_anchors=False`; the sampler's default spreads them, see *Quickstart*); prompts + noise sits at "
        "each sample's own nearest prompt, as far from it as the sample (rows measured before `dfcff19` put it on "
        "prompt i mod 8, which favoured the samples; every row below was measured after).",
        "",
    ]
    for zoo in ZOOS:
        for variant in ("recipe", "recipe-3000", "old-defaults"):
            group = [r for r in rows_.values() if r["zoo"] == zoo and r["variant"] == variant]
            if not group:
                continue
            lines += [f"**{zoo} — {VARIANTS[variant].description}** (seeds {sorted(r['seed'] for r in group)})", "",
                      "| step | CPU-s (mean) | val recon. R² | SANE R² test_acc | layer stats | SANE R² epoch | layer stats "
                      "| SANE R² ggap | layer stats |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for i, point in enumerate(group[0]["points"]):
                pts = [r["points"][i] for r in group]
                readout = group[0]["readout"]
                cells = [f"{mean(p['cpu_seconds'] for p in pts):.0f}", _ms([p["val_reconstruction_r2"] for p in pts])]
                cells.insert(0, str(point["step"]))
                for t in TARGETS:
                    cells.append(_ms([p["probe"][readout][t]["sane"] for p in pts]))
                    cells.append(f"{pts[0]['probe'][readout][t]['layer_stats']:.3f}")  # no SANE seed in it
                lines.append("| " + " | ".join(cells) + " |")
            from sane_hf.verdicts import probe_verdict

            readout = group[0]["readout"]
            mean_row = {m: mean(r["points"][-1]["probe"][readout]["test_acc"][m] for r in group)
                        for m in ("sane", "layer_stats")}
            verdict = probe_verdict("test_acc", mean_row)
            if verdict:
                lines += ["", f"At step {group[0]['points'][-1]['step']} (mean over seeds): {verdict}"]
            last = [r["points"][-1] for r in group if "sampling_epoch0" in r["points"][-1]]
            if last:
                s = {g: _ms([p["sampling_epoch0"].get(g) for p in last]) for g in ("sampled", "random_init", "noise")}
                gain = mean(p["sampling_epoch0"]["sampled"] - p["sampling_epoch0"]["noise"] for p in last)
                word = f"beat prompts + noise by {gain:+.2f}" if gain > 0 else f"trail prompts + noise by {-gain:.2f}"
                lines += ["", f"Epoch-0 test accuracy at the last step (8 samples, best of 32 candidates by training "
                              f"accuracy): SANE samples {s['sampled']}, random init {s['random_init']}, prompts + noise "
                              f"at matched distance {s['noise']} — the samples {word}."]
            lines.append("")
    ablations = [r for r in rows_.values() if r["variant"] not in ("recipe", "recipe-3000", "old-defaults")]
    ablations.sort(key=lambda r: (r["zoo"] != "quickstart", r["zoo"], r["variant"]))
    if ablations:
        lines += ["**Ablations** (seed 0, 500 steps; each changes the recipe as described; the recipe itself at 500 "
                  "steps is in the tables above)", "",
                  "| zoo | variant | CPU-s | val recon. R² | SANE R² test_acc (own readout) | layer stats "
                  "| R² test_acc layer / mean / flatten | samples epoch 0 | prompts + noise |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in ablations:
            p = r["points"][-1]
            per = " / ".join(f"{p['probe'][ro]['test_acc']['sane']:.3f}" for ro in READOUTS if ro in p["probe"])
            own = p["probe"][r["readout"]]["test_acc"]
            samp = p.get("sampling_epoch0", {})
            lines.append(f"| {r['zoo']} | {r['description']} | {p['cpu_seconds']:.0f} | "
                         f"{_ms([p['val_reconstruction_r2']])} | {own['sane']:.3f} | {own['layer_stats']:.3f} | {per} | "
                         f"{_ms([samp.get('sampled')])} | {_ms([samp.get('noise')])} |")
        lines.append("")
    lines.append("Reproduce a row: `python benchmarks/learning_curves.py --only '<zoo>/<variant>/s<seed>'`.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="work dir (zoos, runs, cached rows)")
    p.add_argument("--only", nargs="*", help="fnmatch patterns of row names")
    p.add_argument("--jobs", type=int, default=1, help="rows run side by side (one process each)")
    p.add_argument("--force", action="store_true", help="rerun cached rows")
    p.add_argument("--list", action="store_true")
    p.add_argument("--collect-only", action="store_true")
    p.add_argument("--update-readme", action="store_true")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = p.parse_args(argv)
    work = args.work
    (work / "rows").mkdir(parents=True, exist_ok=True)
    if args.row:
        row = next(r for r in rows() if r.name == args.row)
        result = run_row(row, work)
        target = work / "rows" / f"{row.name.replace('/', '_')}.json"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, target)
        return 0
    selected = [r for r in rows() if not args.only or any(fnmatch.fnmatch(r.name, pat) for pat in args.only)]
    cached = {r.name for r in selected if (work / "rows" / f"{r.name.replace('/', '_')}.json").exists()}
    if args.list:
        for r in selected:
            print(("cached  " if r.name in cached else "todo    ") + r.name)
        return 0
    if not args.collect_only:
        todo = [r for r in selected if args.force or r.name not in cached]
        for r in {r.zoo for r in todo}:
            build_zoo(work, r)
        running: list[subprocess.Popen] = []
        for r in todo:
            while len(running) >= args.jobs:
                running = [proc for proc in running if proc.poll() is None]
                time.sleep(2)
            log = open(work / "rows" / f"{r.name.replace('/', '_')}.log", "w")
            print(f"running {r.name}", flush=True)
            running.append(subprocess.Popen([sys.executable, __file__, "--work", str(work), "--row", r.name],
                                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}))
        for proc in running:
            proc.wait()
    # benchmarks/ is on sys.path when this file runs as a script
    from render_readme import write_results

    result = collect(work)
    text = render(result)
    write_results("learning_curves", result, text, "curves" if args.update_readme else None)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
