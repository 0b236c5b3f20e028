"""Speed benchmark: every figure as a ratio against a baseline measured in the same run.

Runs the component benchmarks as subprocesses (their JSON goes to the work dir, never over the
committed ``benchmarks/results/{tokenizer,zoo,model,embed}.json``) and measures sampling itself:

- tokenizer encode+decode params/s (cnn-s, resnet18, BERT-base) vs the per-row Python
  implementation — ``bench_tokenizer.py``;
- zoo population training model-epochs/s, batched vs the per-model loop — ``bench_zoo.py --quick``;
- SANE training tokens/s and peak memory, default and large configs, SDPA vs eager —
  ``bench_model.py`` (peak memory: the subprocess's peak RSS);
- embedding time and peak memory vs model size, cnn-s → ResNet-18 → ResNet-50 — ``bench_embed.py``;
- sampling: seconds per generated model (``sample_models`` on cnn-s with the shipped checkpoint),
  against encoding+decoding the prompts alone;
- quickstart wall time from ``--quickstart-metrics PATH`` (``quickstart_metrics.json``).

::

    python benchmarks/speed.py                       # CPU, ~10-15 minutes on 2 shared cores
    python benchmarks/speed.py --only tokenizer sampling
    python benchmarks/speed.py --gpu                 # adds bench_model's bf16 GPU rows with MFU

Writes ``benchmarks/results/speed.json`` with the machine (platform, CPU count, torch version,
load average before/after). Sections already measured are cached in ``--work-dir`` (delete or
``--force`` to remeasure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
CHECKPOINT = ROOT / "checkpoints" / "sane-digits-cnn-s"
SECTIONS = ("tokenizer", "zoo", "model", "embed", "sampling", "quickstart")


def machine() -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def _run_bench(script: str, args: list[str], out: Path, log: Path) -> tuple[dict[str, Any], float, float]:
    """Run ``benchmarks/<script>`` with ``--out out``; return its JSON, wall seconds and peak RSS (MB)."""
    cmd = [sys.executable, str(BENCH / script), *args, "--out", str(out)]
    print("[speed] " + " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (ru_maxrss, KiB on Linux)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed (exit {proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    peak_mb = usage.ru_maxrss / 1024
    return json.loads(out.read_text()), seconds, peak_mb


def section_tokenizer(work: Path) -> dict[str, Any]:
    raw, seconds, _ = _run_bench("bench_tokenizer.py", ["--rounds", "3", "--note", "run by speed.py"],
                                 work / "tokenizer.json", work / "tokenizer.log")
    rows = []
    for name, m in raw["models"].items():
        if "skipped" in m:  # an optional model whose package is not installed
            continue
        rows.append({"model": m.get("model", name), "token_size": m.get("token_size"), "num_params": m["num_params"],
                     "num_tokens": m["num_tokens"], "params_per_s": m["params_per_s"],
                     "baseline_params_per_s": m["baseline_params_per_s"], "ratio": m["speedup"],
                     "gb_per_s": m["rows"]["sane_hf"]["gb_per_s"],
                     "fraction_of_copy_speed": m["ratios"]["fraction_of_copy_speed"],
                     "round_trip_exact": m["round_trip_exact"]})
    return {"what": "WeightTokenizer encode+decode, params/s and GB/s, vs a per-row Python implementation and a "
            "copy-bound baseline (torch.cat of all tensors and back), 1 thread",
            "baseline": "per-row Python loop (bench_tokenizer.encode_per_row/decode_per_row)",
            "command": "python benchmarks/bench_tokenizer.py --rounds 3", "rows": rows, "seconds": round(seconds, 1),
            "raw_machine": raw.get("machine")}


def section_zoo(work: Path) -> dict[str, Any]:
    raw, seconds, _ = _run_bench("bench_zoo.py", ["--quick", "--repeats", "2"], work / "zoo.json", work / "zoo.log")
    rows = []
    for r in raw["results"]:
        mes = r.get("model_epochs_per_s") or {}
        rows.append({"workload": r["workload"], "model_epochs_per_s": mes,
                     "ratio_batched": (r.get("speedup_vs_per_model") or {}).get("batched"),
                     "raw": {k: v for k, v in r.items() if k not in ("workload",)}})
    return {"what": "zoo population training, model-epochs/s: batched (stacked groups) vs per-model loop",
            "baseline": "per-model nn.Module + torch.optim loop, 1 thread",
            "command": "python benchmarks/bench_zoo.py --quick --repeats 2", "rows": rows,
            "seconds": round(seconds, 1)}


def section_model(work: Path, gpu: bool) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    total = 0.0
    notes = []
    for config in ("default", "large"):
        # one process per config, so each config's peak RSS is its own
        args = ["--threads", "2", "--iters", "3", "--windows", "64", "256", "--configs", config]
        raw, seconds, peak = _run_bench("bench_model.py", args + ["--note", "run by speed.py"],
                                        work / f"model_{config}.json", work / f"model_{config}.log")
        total += seconds
        notes.append(raw.get("machine"))
        by_key = {}
        for r in raw["results"]:
            if r.get("skipped"):
                if r["attn_implementation"] == "sdpa":
                    skipped.append({k: r[k] for k in ("device", "config", "window", "skipped")})
                continue
            by_key[(r["device"], r["config"], r["window"], r.get("dtype"), r["attn_implementation"])] = r
        for (device, cfg, window, dtype, attn), r in by_key.items():
            if attn != "sdpa":
                continue
            eager = by_key.get((device, cfg, window, dtype, "eager"))
            rows.append({"device": device, "config": cfg, "window": window, "batch": r["batch"], "dtype": dtype,
                         "params": r["params"], "sdpa_tokens_per_s": r["tokens_per_s"],
                         "eager_tokens_per_s": eager["tokens_per_s"] if eager else None,
                         "ratio_sdpa_over_eager": round(r["tokens_per_s"] / eager["tokens_per_s"], 2) if eager else None,
                         "mfu": r.get("mfu"), "process_peak_rss_mb": round(peak, 1)})
    return {"what": "SANE training step (fwd+bwd+AdamW, two views, batch 32), tokens/s: SDPA vs eager attention; "
                    "peak memory = peak RSS of the benchmark process of that config (both windows, both attentions)",
            "baseline": "eager attention (softmax(QK^T)V written out) in the same run, interleaved",
            "command": "python benchmarks/bench_model.py --threads 2 --iters 3 --windows 64 256 --configs CONFIG",
            "rows": rows, "skipped": skipped,
            "gpu": "measured" if any(r["device"] != "cpu" for r in rows) else "not measured (no GPU)",
            "seconds": round(total, 1), "bench_machine": notes}


def section_embed(work: Path) -> dict[str, Any]:
    raw, seconds, _ = _run_bench("bench_embed.py", ["--threads", "1", "--note", "run by speed.py"],
                                 work / "embed.json", work / "embed.log")
    rows = []
    for name, c in raw["cases"].items():
        rows.append({"case": name, "num_params": c["num_params"], "tokens_per_model": c["num_tokens_per_model"],
                     "n_models": c["n_models"], "batch_size": c["batch_size"], "embed_s": c["embed_s"],
                     "s_per_1k_tokens": c["s_per_1k_tokens"], "peak_delta_mb": c["peak_delta_mb"]})
    return {"what": "embed_models (haloed windows): time and peak memory vs model size",
            "baseline": "seconds per 1k tokens of the smallest ResNet case: linear scaling means ratio ≈ 1",
            "command": "python benchmarks/bench_embed.py --threads 1", "rows": rows,
            "time_linear_in_tokens": raw.get("time_linear_in_tokens"), "seconds": round(seconds, 1)}


def section_sampling(work: Path) -> dict[str, Any]:
    import torch

    from sane_hf.modeling_sane import SaneModel
    from sane_hf.sampling import sample_models
    from sane_hf.tokenization_sane import WeightTokenizer
    from sane_hf.zoo.architectures import create_model

    torch.set_num_threads(1)  # stable timings on a shared machine
    if (CHECKPOINT / "config.json").is_file():
        model, tok, source = SaneModel.from_pretrained(CHECKPOINT).eval(), WeightTokenizer.from_pretrained(CHECKPOINT), \
            str(CHECKPOINT.relative_to(ROOT))
    else:
        from sane_hf.training import sane_config_preset

        ref = create_model("cnn-s", image_size=8).state_dict()
        tok = WeightTokenizer.from_reference(ref, token_size=64)
        model, source = SaneModel(sane_config_preset("small", 64)).eval(), "random-weight small preset"
    prompts = []
    for seed in range(10):
        torch.manual_seed(seed)
        prompts.append(create_model("cnn-s", image_size=8).state_dict())
    if not (CHECKPOINT / "config.json").is_file():
        tok.fit(prompts)
    rows = []
    for n in (1, 8, 32):
        sample_models(model, tok, prompts, num_samples=n, seed=0, bandwidth=0.1)  # warm-up
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            sample_models(model, tok, prompts, num_samples=n, seed=0, bandwidth=0.1)
            best = min(best, time.perf_counter() - t0)
        rows.append({"num_samples": n, "seconds": round(best, 4), "seconds_per_model": round(best / n, 5)})
    # baseline: the unavoidable part, tokenizing the prompts and one encode+decode pass of them
    t0 = time.perf_counter()
    for sd in prompts:
        tok.decode(tok.encode(sd))
    tokenize_s = time.perf_counter() - t0
    return {"what": "sample_models on cnn-s (10 prompts, joint KDE, no scoring), seconds per generated model",
            "baseline": "seconds per sample at num_samples=1 (fixed cost: encoding the prompts)",
            "checkpoint": source, "rows": rows,
            "ratio_per_model_1_over_32": round(rows[0]["seconds_per_model"] / rows[-1]["seconds_per_model"], 1),
            "tokenize_round_trip_10_prompts_s": round(tokenize_s, 4), "threads": 1}


def section_quickstart(path: Path | None) -> dict[str, Any]:
    if path is None or not Path(path).is_file():
        return {"what": "sane-hf quickstart wall time", "status": "not measured",
                "note": "pass --quickstart-metrics PATH (quickstart_metrics.json)" if path is None else
                f"{path} not found"}
    m = json.loads(Path(path).read_text())
    wall = m.get("wall_seconds", m.get("total_seconds", m.get("seconds")))
    stages = m.get("stages") or m.get("timings") or {}
    stage_seconds = {k: (v.get("seconds") if isinstance(v, dict) else v) for k, v in stages.items()}
    return {"what": "sane-hf quickstart wall time", "status": "measured", "wall_seconds": wall,
            "stage_seconds": stage_seconds, "fast_mode": (m.get("config") or {}).get("fast_mode"),
            "machine": m.get("machine"), "source": str(path)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--gpu", action="store_true", help="also record bf16 GPU rows and MFU (needs CUDA)")
    p.add_argument("--quickstart-metrics", type=Path, default=None)
    p.add_argument("--work-dir", type=Path, default=Path(os.environ.get("SANE_BENCH_WORK", "/tmp/sane-hf-bench")) / "speed")
    p.add_argument("--force", action="store_true", help="remeasure sections cached in the work dir")
    p.add_argument("--out", type=Path, default=RESULTS / "speed.json")
    args = p.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device")
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    report: dict[str, Any] = {"benchmark": "sane-hf speed", "machine": machine(),
                              "load_average_before": list(os.getloadavg()), "sections": dict(previous.get("sections", {}))}
    for name in SECTIONS:  # sections measured earlier (cached in the work dir) stay in the report
        cache = args.work_dir / f"section_{name}.json"
        if name not in args.only and cache.is_file():
            report["sections"][name] = json.loads(cache.read_text())
    for name in args.only:
        cache = args.work_dir / f"section_{name}.json"
        if cache.is_file() and not args.force and name != "quickstart":
            report["sections"][name] = json.loads(cache.read_text())
            continue
        la = list(os.getloadavg())
        try:
            if name == "tokenizer":
                sec = section_tokenizer(args.work_dir)
            elif name == "zoo":
                sec = section_zoo(args.work_dir)
            elif name == "model":
                sec = section_model(args.work_dir, args.gpu)
            elif name == "embed":
                sec = section_embed(args.work_dir)
            elif name == "sampling":
                sec = section_sampling(args.work_dir)
            else:
                sec = section_quickstart(args.quickstart_metrics)
        except RuntimeError as err:
            print(f"[speed] {name}: {err}", file=sys.stderr)
            sec = {"status": "failed", "error": str(err)[-500:]}
        sec["load_average_before"], sec["load_average_after"] = la, list(os.getloadavg())
        sec["measured"] = time.strftime("%Y-%m-%d %H:%M:%S")
        cache.write_text(json.dumps(sec, indent=1) + "\n")
        report["sections"][name] = sec
    report["load_average_after"] = list(os.getloadavg())
    if "gpu" not in report["sections"]:
        report["gpu"] = "measured in sections.model" if args.gpu else "not measured (no GPU)"
    report["note"] = ("2-core CPU VM shared with other jobs while measuring (see each section's load averages); "
                      "absolute numbers are noisy, ratios compare runs of the same moment.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"[speed] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
