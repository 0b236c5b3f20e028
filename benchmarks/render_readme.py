"""Render the README's "Results" and "Performance" sections from the benchmark JSON files.

No number is typed by hand: everything comes from ``benchmarks/results/quality.json``
(``benchmarks/quality.py``) and ``benchmarks/results/speed.json`` (``benchmarks/speed.py``).

::

    python benchmarks/render_readme.py                   # writes benchmarks/results/{results,performance}.md
    python benchmarks/render_readme.py --update-readme   # also replaces the marked blocks in README.md

``--update-readme`` replaces what lies between ``<!-- results:start -->`` / ``<!-- results:end -->``
and ``<!-- performance:start -->`` / ``<!-- performance:end -->`` in README.md, when those markers
exist (a missing pair is reported and left alone).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

METHOD_NAMES = {"sane": "SANE", "layer_stats": "layer statistics", "raw": "raw weights",
                "sane+stats": "SANE + layer statistics"}
GROUP_NAMES = {"sampled": "SANE samples", "random_init": "random init", "noise": "prompts + noise (matched distance)",
               "noise_matched_accuracy": "prompts + noise (matched accuracy)",
               "aligned_average": "aligned prompt average", "prompts": "prompts (zoo models)"}


def _num(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, (int, float)):
        return format(x, spec)
    return str(x)


def _ms(s: Any, spec: str = ".3f") -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    if s.get("std"):  # a zero spread (e.g. a baseline, which does not depend on the SANE seed) is not shown
        return f"{format(s['mean'], spec)} ± {format(s['std'], spec)}"
    return format(s["mean"], spec)


def _load(values: Any) -> str:
    return "n/a" if not values else " / ".join(f"{v:.1f}" for v in values)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _code(cmd: str) -> str:
    return f"`{cmd}`"


# ----------------------------------------------------------------------------------------------
# results (quality)
# ----------------------------------------------------------------------------------------------


def render_results(q: dict[str, Any]) -> str:
    out = ["## Results", ""]
    m = q.get("machine", {})
    out.append(
        f"Measured by `benchmarks/quality.py` (profile `{q.get('profile')}`) on {m.get('cpu_count')} CPU cores "
        f"({m.get('platform')}, torch {m.get('torch')}, GPU: {m.get('cuda') or 'none'}); generated "
        f"{q.get('generated')}. Each zoo row is reproduced by the command under it (`$WORK` is the work dir, "
        "default `/tmp/sane-hf-bench/cpu`); `python benchmarks/quality.py --only ROW` runs the same chain with "
        "caching. These are our own small zoos on a 2-core CPU, not the paper's; the SANE models are the `small` "
        "preset trained for minutes, and the test splits are small (see the probe notes)."
    )
    out.append("")
    zoos = [z for z in q.get("zoos", []) if z.get("zoo")]
    if zoos:
        out += ["### Zoos", ""]
        rows = []
        for z in zoos:
            s = z["zoo"]
            fa = s.get("final_test_acc") or {}
            split = s.get("models_per_split") or {}
            rows.append([f"`{z['name']}`", z["description"], s.get("num_models"), s.get("num_checkpoints"),
                         "/".join(str(split.get(k, "?")) for k in ("train", "validation", "test")),
                         f"{_num(fa.get('min'))} / {_num(fa.get('mean'))} / {_num(fa.get('max'))}"])
        out.append(_table(["zoo", "what", "models", "checkpoints", "train/val/test models",
                           "final test acc min / mean / max"], rows))
        out.append("")
    # property prediction
    probed = [z for z in zoos if z.get("probe")]
    if probed:
        out += ["### Property prediction", "",
                "Linear probes on the test models (Ridge R² for `test_acc`, `epoch`, `ggap`; logistic-regression "
                "accuracy for the hyperparameters), penalty chosen on validation. SANE columns are mean ± std over "
                "the SANE training seeds listed; the baselines do not depend on the SANE seed. *SANE + layer statistics* "
                "is the `sane+stats` probe: the two probes' outputs blended with a SANE weight chosen on validation "
                "(`sane_hf/probe_blend.py`).", ""]
        for z in probed:
            seeds = [t["seed"] for t in z.get("training", [])]
            names = z.get("metric_names") or {}
            rows = []
            for target, by in z["probe"].items():
                rows.append([f"`{target}`", names.get(target, "")] + [_ms(by.get(meth)) for meth in METHOD_NAMES])
            out.append(f"**`{z['name']}`** — SANE seeds {seeds}")
            out.append("")
            out.append(_table(["property", "metric", *METHOD_NAMES.values()], rows))
            out.append("")
            tr = z.get("training") or []
            if tr:
                out.append(
                    "SANE training: " + "; ".join(
                        f"seed {t['seed']}: {t['steps']} steps, {_num(t['seconds'], '.0f')} s, val reconstruction "
                        f"R² {_num(t.get('val_reconstruction_r2'))}" for t in tr) + ".")
                out.append("")
            info = z.get("probe_info") or {}
            if info:
                out.append(f"Probe data: {info.get('train_models')}/{info.get('validation_models')}/"
                           f"{info.get('test_models')} train/val/test models, {info.get('test_rows')} test checkpoints; "
                           f"{info.get('num_tokens')} tokens of {info.get('token_size')} per network, embeddings pooled "
                           f"by {info.get('pooling')}.")
                out.append("")
            out.append("Reproduce:")
            out.append("")
            out.append("```bash")
            for k in ("zoo", "train", "probe"):
                if k in z["commands"]:
                    out.append(z["commands"][k])
            out.append("```")
            out.append("")
    # sampling
    sampled = [z for z in zoos if z.get("sampling")]
    if sampled:
        out += ["### Sampling", "",
                "Samples drawn around the best test models (prompts) and evaluated on the zoo's task with no "
                "training (epoch 0) and after fine-tuning, beside the same architecture from random init, the "
                "prompts plus Gaussian noise at the samples' distance, and the weight average of the aligned "
                "prompts. Mean ± std over samples (or over baseline models).", ""]
        for z in sampled:
            s = z["sampling"]
            acc = s.get("accuracy") or {}
            epochs = sorted({int(e) for c in acc.values() for e in c})
            rows = [[GROUP_NAMES.get(g, g)] + [_ms(c.get(str(e))) for e in epochs] for g, c in acc.items()]
            out.append(f"**`{z['name']}`** — test accuracy after fine-tuning epochs (SANE seed {s.get('sane_seed')})")
            out.append("")
            out.append(_table(["group"] + [f"epoch {e}" for e in epochs], rows))
            out.append("")
            tr = s.get("transfer")
            if tr:
                last = str(tr.get("epochs"))
                rows = [[GROUP_NAMES.get(g, g), _ms(c.get("0")), _ms(c.get(last))] for g, c in tr["accuracy"].items()]
                out.append(f"Transfer to {tr['task']} (classifier head reset), test accuracy:")
                out.append("")
                out.append(_table(["group", "epoch 0", f"epoch {last}"], rows))
                out.append("")
            nov = s.get("novelty")
            if nov:
                rows = []
                for g in ("sampled", "noise", "noise_matched_accuracy", "prompts"):
                    if g in nov:
                        rows.append([GROUP_NAMES.get(g, g), _ms(nov[g].get("nearest_distance")),
                                     _ms(nov[g].get("agreement")), _ms(nov[g].get("prompt_distance"))])
                out.append(f"Novelty: L2 distance to the nearest training-split checkpoint after alignment "
                           f"({nov.get('num_neighbours')} searched) and prediction agreement with it:")
                out.append("")
                out.append(_table(["group", "distance to nearest zoo checkpoint", "prediction agreement",
                                   "distance to prompts"], rows))
                out.append("")
            out.append("Reproduce:")
            out.append("")
            out.append("```bash")
            out.append(z["commands"].get("sample", ""))
            out.append("```")
            out.append("")
    # targets
    checks = _target_rows(zoos)
    if checks:
        out += ["### Against the targets of the evaluation protocol", "",
                "Computed from the numbers above (yes / no), so the table cannot disagree with them.", ""]
        out.append(_table(["zoo", "target", "measured", "met"], checks))
        out.append("")
    # ablations
    abl = [a for a in q.get("ablations", []) if a.get("probe") or a.get("sampling")]
    if abl:
        out += ["### Ablations (digits zoo, SANE small preset, seed 0)", "",
                "One setting changed per row against the reference run with the same number of steps (the last row "
                "changes only the number of steps); probe R² of SANE embeddings on the test models, and the test "
                "accuracy of 8 samples (best 8 of 32 candidates by training accuracy) with no fine-tuning.", ""]
        rows = []
        for a in abl:
            p = a.get("probe") or {}
            sm = a.get("sampling") or {}
            rows.append([a["setting"], (a.get("training") or {}).get("steps", "n/a"),
                         _num((p.get("test_acc") or {}).get("sane")), _num((p.get("epoch") or {}).get("sane")),
                         _num((p.get("ggap") or {}).get("sane")), _ms(sm.get("sampled_test_acc")),
                         _code(a["reproduce"])])
        out.append(_table(["setting", "SANE steps", "R² test_acc", "R² epoch", "R² ggap", "sample acc (epoch 0)",
                           "command"], rows))
        out += ["", "<details><summary>The sane-hf commands of each ablation row</summary>", "", "```bash"]
        for a in abl:
            out.append(f"# {a['setting']}")
            out += [a["commands"][k] for k in ("train", "probe", "sample") if k in a["commands"]]
        out += ["```", "", "</details>", ""]
    missing = q.get("missing_steps") or []
    if missing:
        out.append(f"Steps without a cached result when this was generated: {', '.join(f'`{m}`' for m in missing)}.")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _mean(summary: Any) -> float | None:
    return summary.get("mean") if summary else None


def _target_rows(zoos: list[dict[str, Any]]) -> list[list[Any]]:
    rows: list[list[Any]] = []

    def add(zoo: str, target: str, measured: str, ok: bool | None) -> None:
        rows.append([f"`{zoo}`", target, measured, "n/a" if ok is None else ("yes" if ok else "**no**")])

    for z in zoos:
        name, probe = z["name"], z.get("probe") or {}
        ta = probe.get("test_acc") or {}
        sane, stats = _mean(ta.get("sane")), _mean(ta.get("layer_stats"))
        if sane is not None:
            add(name, "SANE R² `test_acc` ≥ 0.9", _num(sane), sane >= 0.9)
            if stats is not None:
                add(name, "SANE R² `test_acc` ≥ layer statistics", f"{_num(sane)} vs {_num(stats)}", sane >= stats)
        smp = z.get("sampling") or {}
        acc = smp.get("accuracy") or {}
        s0, r0 = _mean((acc.get("sampled") or {}).get("0")), _mean((acc.get("random_init") or {}).get("0"))
        if s0 is not None and r0 is not None:
            add(name, "sampled epoch-0 accuracy well above random init (≥ +0.10)", f"{_num(s0)} vs {_num(r0)}", s0 >= r0 + 0.1)
        s1, r1 = _mean((acc.get("sampled") or {}).get("1")), _mean((acc.get("random_init") or {}).get("1"))
        if s1 is not None and r1 is not None:
            add(name, "sampled > random init after 1 epoch", f"{_num(s1)} vs {_num(r1)}", s1 > r1)
        tr = smp.get("transfer")
        if tr:
            last = str(tr.get("epochs"))
            ts, trn = _mean(tr["accuracy"].get("sampled", {}).get(last)), _mean(tr["accuracy"].get("random_init", {}).get(last))
            if ts is not None and trn is not None:
                add(name, f"transfer ({tr['task']}) > random init after {last} epoch", f"{_num(ts)} vs {_num(trn)}",
                    ts > trn)
        nov = smp.get("novelty") or {}
        ds = _mean((nov.get("sampled") or {}).get("nearest_distance"))
        dn = _mean((nov.get("noise_matched_accuracy") or {}).get("nearest_distance"))
        an = _mean((acc.get("noise_matched_accuracy") or {}).get("0"))
        if ds is not None and dn is not None:
            add(name, "samples farther from the zoo than noise at equal accuracy",
                f"{_num(ds)} vs {_num(dn)} (accuracy {_num(s0)} vs {_num(an)})", ds > dn)
    return rows


# ----------------------------------------------------------------------------------------------
# performance (speed)
# ----------------------------------------------------------------------------------------------


def render_performance(s: dict[str, Any]) -> str:
    m = s.get("machine", {})
    out = ["## Performance", "",
           f"Measured by `python benchmarks/speed.py` on {m.get('cpu_count')} CPU cores ({m.get('cpu_model', '')}, "
           f"{m.get('platform')}), torch {m.get('torch')}; load average (1/5/15 min) before "
           f"{_load(s.get('load_average_before'))}, after {_load(s.get('load_average_after'))}. {s.get('note', '')} GPU: {s.get('gpu', 'not measured (no GPU)')}.",
           ""]
    secs = s.get("sections", {})
    t = secs.get("tokenizer")
    if t and t.get("rows"):
        out += ["### Tokenizer (encode + decode)", ""]
        out.append(_table(["model", "token size", "params", "tokens", "params/s", "GB/s", "vs copy-bound",
                           "per-row Python params/s", "speed-up"], [
            [r["model"], _num(r.get("token_size"), "d"), f"{r['num_params']:,}", f"{r['num_tokens']:,}",
             f"{r['params_per_s']:,.0f}", _num(r.get("gb_per_s"), ".2f"), _num(r.get("fraction_of_copy_speed"), ".2f"),
             f"{r['baseline_params_per_s']:,.0f}", f"{r['ratio']}×"] for r in t["rows"]]))
        out += ["", f"`{t['command']}`", ""]
    z = secs.get("zoo")
    if z and z.get("rows"):
        out += ["### Zoo population training", ""]
        rows = []
        for r in z["rows"]:
            mes = r.get("model_epochs_per_s") or {}
            base = mes.get("per_model")
            rows.append([r["workload"]] + [_num(mes.get(k), ".1f") for k in ("per_model", "batched", "batched_2proc")]
                        + [f"{mes['batched'] / base:.1f}×" if base and mes.get("batched") else "n/a"])
        out.append(_table(["workload", "per-model loop", "batched", "batched, 2 processes", "batched / loop"], rows))
        out += ["", "Model-epochs per second.", f"`{z['command']}`", ""]
    md = secs.get("model")
    if md and md.get("rows"):
        out += ["### SANE training throughput", ""]
        out.append(_table(["config", "params", "window", "SDPA tokens/s", "eager tokens/s", "SDPA / eager",
                           "process peak RSS (MB)"], [
            [r["config"], f"{r['params']:,}", r["window"], f"{r['sdpa_tokens_per_s']:,.0f}",
             _num(r["eager_tokens_per_s"], ",.0f"), f"{r['ratio_sdpa_over_eager']}×", _num(r["process_peak_rss_mb"], ".0f")]
            for r in md["rows"]]))
        if md.get("skipped"):
            out.append("")
            out.append("Skipped on this CPU: " + "; ".join(f"{k['config']} window {k['window']} ({k['skipped']})"
                                                          for k in md["skipped"]) + ".")
        out += ["", f"bf16 training throughput and MFU: {md.get('gpu')}.", f"`{md['command']}`", ""]
    e = secs.get("embed")
    if e and e.get("rows"):
        out += ["### Embedding long models (haloed windows)", ""]
        out.append(_table(["case", "params", "tokens/model", "models", "batch", "seconds", "s per 1k tokens",
                           "peak memory added (MB)"], [
            [r["case"], f"{r['num_params']:,}", f"{r['tokens_per_model']:,}", r["n_models"], r["batch_size"],
             _num(r["embed_s"], ".2f"), _num(r["s_per_1k_tokens"], ".4f"), _num(r["peak_delta_mb"], ".0f")]
            for r in e["rows"]]))
        by_case = {r["case"]: r for r in e["rows"]}
        if "resnet18" in by_case and "resnet50" in by_case:
            r18, r50 = by_case["resnet18"], by_case["resnet50"]
            out.append("")
            out.append(
                f"Linear scaling at batch 32: ResNet-50 has {r50['tokens_per_model'] / r18['tokens_per_model']:.2f}× "
                f"the tokens of ResNet-18 and took {r50['embed_s'] / r18['embed_s']:.2f}× the time "
                f"({r50['s_per_1k_tokens'] / r18['s_per_1k_tokens']:.2f}× the time per token; 1.0 = exactly linear); "
                f"memory added grows from {_num(r18['peak_delta_mb'], '.0f')} to {_num(r50['peak_delta_mb'], '.0f')} MB, "
                "dominated by the model's own tokens, not by attention over the whole sequence.")
        out += ["", f"`{e['command']}`", ""]
    sa = secs.get("sampling")
    if sa and sa.get("rows"):
        out += ["### Sampling", ""]
        out.append(_table(["samples", "seconds", "seconds per model"],
                          [[r["num_samples"], _num(r["seconds"], ".3f"), _num(r["seconds_per_model"], ".4f")]
                           for r in sa["rows"]]))
        out += ["", f"{sa['what']}; SANE: {sa.get('checkpoint')}. Per-model cost at 1 sample / at 32 samples: "
                    f"{sa.get('ratio_per_model_1_over_32')}×.", ""]
    qs = secs.get("quickstart")
    out += ["### Quickstart", ""]
    if qs and qs.get("status") == "measured":
        stages = ", ".join(f"{k} {_num(v, '.0f')} s" for k, v in (qs.get("stage_seconds") or {}).items())
        mach = qs.get("machine") or {}
        out.append(f"`sane-hf quickstart` wall time: {_num(qs.get('wall_seconds'), '.0f')} s ({stages}); "
                   f"{mach.get('cpu_count', '?')} CPU cores, load average at start {_load(mach.get('load_average_start'))}.")
    else:
        out.append("`sane-hf quickstart` wall time: not measured.")
    out.append("")
    return "\n".join(out).rstrip() + "\n"


def _replace_block(text: str, name: str, body: str) -> tuple[str, bool]:
    pattern = re.compile(rf"(<!-- {name}:start -->\n?)(.*?)(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        return text, False
    return pattern.sub(lambda m: m.group(1) + body + m.group(3), text, count=1), True


def update_readme_block(readme: Path, name: str, body: str) -> bool:
    """Replace README's ``<!-- name:start -->`` … ``<!-- name:end -->`` block with ``body``; False (and a
    message on stderr) when the markers are missing, and the file is left alone."""
    text, found = _replace_block(readme.read_text(), name, body)
    if found:
        readme.write_text(text)
    else:
        print(f"{readme}: no <!-- {name}:start --> / <!-- {name}:end --> markers; left alone", file=sys.stderr)
    return found


def write_results(stem: str, result: Any, text: str, readme_block: str | None = None) -> None:
    """``results/<stem>.json`` (atomically) and ``results/<stem>.md``; with ``readme_block``, README's block too."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(RESULTS / f"{stem}.json")
    (RESULTS / f"{stem}.md").write_text(text)
    if readme_block:
        update_readme_block(ROOT / "README.md", readme_block, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quality", type=Path, default=RESULTS / "quality.json")
    p.add_argument("--speed", type=Path, default=RESULTS / "speed.json")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--update-readme", action="store_true", help="replace the marked blocks in README.md")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = p.parse_args(argv)
    blocks = {}
    if args.quality.is_file():
        blocks["results"] = render_results(json.loads(args.quality.read_text()))
    if args.speed.is_file():
        blocks["performance"] = render_performance(json.loads(args.speed.read_text()))
    for name, body in blocks.items():
        path = args.out_dir / f"{name}.md"
        path.write_text(body)
        print(f"wrote {path}")
    if args.update_readme:
        for name, body in blocks.items():
            update_readme_block(args.readme, name, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
