"""Quality benchmark: property prediction, sampling, transfer, novelty and ablations on built zoos.

Every number comes from the ``sane-hf`` command line (``zoo build`` → ``train`` → ``probe`` →
``sample``), run as subprocesses; this script only sequences the commands, caches each step's
result and aggregates them. Each step is cached as ``$WORK/results/<step>.json`` (the command, its
wall time and the ``metrics.json`` it produced), so an interrupted run resumes where it stopped and
``--only`` reruns selected steps or rows. The default work dir is outside the repository.

::

    python benchmarks/quality.py --small                  # a minutes-long smoke run of the whole suite
    python benchmarks/quality.py                          # the CPU profile (2 cores; see PROFILES)
    python benchmarks/quality.py --gpu                    # larger zoos and models, for a GPU machine
    python benchmarks/quality.py --only 'digits*'         # selected rows / steps (fnmatch patterns)
    python benchmarks/quality.py --list                   # steps, their commands and whether cached
    python benchmarks/quality.py --collect-only           # re-aggregate cached steps into quality.json

Writes ``benchmarks/results/quality.json`` (``--small`` writes ``quality_small.json``) and, with
``--export-checkpoint DIR``, stages the digits SANE model (seed 0) as a Hub-ready folder via
``sane-hf push --dry-run --staging-dir DIR``. ``benchmarks/render_readme.py`` turns the JSON into
markdown tables. Commands in the results use ``$WORK`` for the work dir.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_WORK = Path(os.environ.get("SANE_BENCH_WORK", "/tmp/sane-hf-bench"))

PROBE_TARGETS = ("test_acc", "epoch", "ggap", "activation", "optimizer", "init")
METHODS = ("sane", "layer_stats", "raw")


# ----------------------------------------------------------------------------------------------
# profiles: what is built and trained
# ----------------------------------------------------------------------------------------------


@dataclass
class ZooSpec:
    """One ``sane-hf zoo build`` and the SANE runs on it."""

    name: str
    description: str
    build: list[str]  # flags of `sane-hf zoo build` (without --out)
    train: list[str]  # flags of `sane-hf train` (without --zoo/--out/--seed)
    seeds: tuple[int, ...] = (0,)
    sample: list[str] | None = None  # flags of `sane-hf sample --evaluate`; None = no sampling row
    sample_seeds: tuple[int, ...] = (0,)  # SANE seeds whose sampling is evaluated
    probe: list[str] = field(default_factory=list)
    shares_zoo: str | None = None  # reuse the zoo built for this row instead of building one


@dataclass
class AblationSpec:
    """A shortened SANE run on a zoo with one setting changed; probed and sampled (no fine-tuning)."""

    name: str
    zoo: str
    setting: str  # human-readable: "window 16"
    train: list[str]
    sample: list[str]


def _digits_train(steps: int) -> list[str]:
    # one torch thread per process: on a shared 2-core machine two single-thread jobs side by side are
    # ~8x faster than one 2-thread job competing with other load (measured: 81 s vs 10 s for 12 steps)
    return ["--config", "small", "--max-steps", str(steps), "--batch-size", "32", "--eval-steps", "0",
            "--save-steps", str(steps), "--num-threads", "1", "--progress", "False"]


def _profile_cpu() -> tuple[list[ZooSpec], list[AblationSpec]]:
    steps = 1000
    abl_steps = 300
    sample_eval = ["--num-samples", "8", "--num-prompts", "10", "--max-neighbours", "100",
                   "--transfer-train-subset", "2000"]
    abl_sample = ["--num-samples", "8", "--num-prompts", "10"]
    zoos = [
        ZooSpec(
            "digits-cnn-s", "scikit-learn digits 8×8, cnn-s, 200 models × 7 checkpoints (epochs 0-10)",
            ["--task", "digits", "--arch", "cnn-s", "--num-models", "200", "--epochs", "10",
             "--checkpoint-epochs", "0", "1", "2", "3", "5", "7", "10", "--seed", "0", "--num-workers", "2"],
            _digits_train(steps), seeds=(0, 1, 2), sample=sample_eval,
        ),
        # the recipe that trains SANE to a high reconstruction R² on this zoo: token size 16, one window
        # covering the whole model (102 tokens), light erasing, 3500 steps (~20 min on one core)
        ZooSpec(
            "digits-cnn-s-t16", "the digits cnn-s zoo above, SANE with token size 16, a whole-model window "
            "(102 tokens) and 3500 steps",
            [], ["--config", "small", "--token-size", "16", "--window-size", "102", "--halo-size", "0",
                 "--erase-prob", "0.1", "--max-steps", "3500", "--batch-size", "32", "--eval-steps", "0",
                 "--save-steps", "500", "--num-threads", "1", "--progress", "False"],
            seeds=(0,), sample=sample_eval, shares_zoo="digits-cnn-s",
        ),
        ZooSpec(
            "fashion-cnn-s", "Fashion-MNIST downsampled to 14×14 (5,000 training images), cnn-s, 60 models × 5 checkpoints",
            ["--task", "fashion-mnist", "--arch", "cnn-s", "--image-size", "14", "--train-subset", "5000",
             "--eval-subset", "2000", "--num-models", "60", "--epochs", "6", "--checkpoint-epochs", "0", "1", "2",
             "4", "6", "--seed", "0"],
            _digits_train(600), seeds=(0,), sample=sample_eval,
        ),
        ZooSpec(
            "digits-resnet18-w4", "ResNet-18 stand-in: CIFAR-style ResNet-18 at width 4 (BatchNorm, residuals, "
            "~44k params) on digits 8×8, 30 models × 3 checkpoints",
            ["--task", "digits", "--arch", "resnet18", "--arch-kwargs", '{"width": 4}', "--num-models", "30",
             "--epochs", "6", "--checkpoint-epochs", "0", "2", "6", "--seed", "0"],
            ["--config", "small", "--max-steps", "400", "--batch-size", "32", "--eval-steps", "0",
             "--save-steps", "400", "--windows-per-sample", "16", "--num-threads", "1", "--progress", "False"],
            seeds=(0,), sample=["--num-samples", "4", "--num-prompts", "5", "--max-neighbours", "30",
                                "--transfer-task", "none", "--bn-samples", "512"],
        ),
    ]
    base = _digits_train(abl_steps)
    ablations = [
        AblationSpec("abl-reference", "digits-cnn-s",
                     "reference: the small preset (a whole-model window of 54 tokens, token 64, permutation on)", base,
                     abl_sample),
        AblationSpec("abl-window16", "digits-cnn-s", "windows of 16 tokens with halos of 4",
                     base + ["--window-size", "16", "--halo-size", "4"], abl_sample),
        AblationSpec("abl-window32", "digits-cnn-s", "windows of 32 tokens with halos of 8 (the preset's halo)",
                     base + ["--window-size", "32"], abl_sample),
        AblationSpec("abl-token32", "digits-cnn-s", "token size 32", base + ["--token-size", "32"], abl_sample),
        AblationSpec("abl-token128", "digits-cnn-s", "token size 128", base + ["--token-size", "128"],
                     abl_sample),
        AblationSpec("abl-noperm", "digits-cnn-s", "no permutation augmentation", base + ["--permutation", "False"],
                     abl_sample),
        # training length: the reference's settings trained 2500 steps (the digits rows above use 1000)
        AblationSpec("abl-steps2500", "digits-cnn-s", "2500 training steps", _digits_train(2500), abl_sample),
    ]
    return zoos, ablations


def _profile_small() -> tuple[list[ZooSpec], list[AblationSpec]]:
    sample_eval = ["--num-samples", "2", "--num-prompts", "3", "--max-neighbours", "10",
                   "--transfer-train-subset", "300", "--finetune-epochs", "0,1"]
    zoos = [
        ZooSpec(
            "digits-cnn-s", "digits 8×8, cnn-s, 24 models (smoke)",
            ["--task", "digits", "--arch", "cnn-s", "--num-models", "24", "--epochs", "4",
             "--checkpoint-epochs", "0", "2", "4", "--seed", "0"],
            _digits_train(30), seeds=(0, 1), sample=sample_eval,
        ),
    ]
    ablations = [
        AblationSpec("abl-reference", "digits-cnn-s", "reference", _digits_train(20), ["--num-samples", "2"]),
        AblationSpec("abl-window16", "digits-cnn-s", "windows of 16 tokens with halos of 4",
                     _digits_train(20) + ["--window-size", "16", "--halo-size", "4"], ["--num-samples", "2"]),
    ]
    return zoos, ablations


def _profile_gpu() -> tuple[list[ZooSpec], list[AblationSpec]]:
    zoos, ablations = _profile_cpu()
    # the defaults preset's window (64) exceeds a cnn-s network (54 tokens): sane-hf train rejects it
    large = ["--config", "defaults", "--window-size", "48", "--max-steps", "20000", "--batch-size", "128",
             "--eval-steps", "0", "--save-steps", "5000", "--progress", "False"]
    zoos[0].build[zoos[0].build.index("--num-models") + 1] = "1000"
    zoos[0].train = large
    zoos[1].build[zoos[1].build.index("--num-models") + 1] = "500"
    zoos[1].train, zoos[1].seeds = large, (0, 1, 2)
    zoos[2] = ZooSpec(
        "fashion-resnet18-w16", "Fashion-MNIST 28×28, ResNet-18 width 16, 100 models × 4 checkpoints",
        ["--task", "fashion-mnist", "--arch", "resnet18", "--arch-kwargs", '{"width": 16}', "--num-models", "100",
         "--epochs", "10", "--checkpoint-epochs", "0", "2", "5", "10", "--seed", "0", "--device", "cuda"],
        ["--config", "large", "--learning-rate", "1e-4", "--max-steps", "20000", "--batch-size", "64",
         "--mixed-precision", "bf16", "--eval-steps", "0", "--save-steps", "5000", "--progress", "False"],
        seeds=(0, 1, 2), sample=["--num-samples", "8", "--transfer-task", "none"],
    )
    for a in ablations:
        steps = "20000" if a.name.startswith("abl-steps") else "4000"
        a.train[a.train.index("--max-steps") + 1] = steps
        a.train[a.train.index("--save-steps") + 1] = steps
        if a.name.startswith("abl-steps"):
            a.setting = "20000 training steps"
    # no window-256 row: a digits cnn-s model is 54 tokens, so window 64 already covers all of it
    return zoos, ablations


PROFILES = {"small": _profile_small, "cpu": _profile_cpu, "gpu": _profile_gpu}


# ----------------------------------------------------------------------------------------------
# steps: one cached command each
# ----------------------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    argv: list[str]  # `sane-hf` arguments, with "$WORK" placeholders
    metrics: str  # path of the metrics file the command writes ("$WORK/...")
    deps: list[str]
    rows: list[str]  # result-table rows this step feeds

    def command(self) -> str:
        return "sane-hf " + " ".join(shlex.quote(a) if "$WORK" not in a else a for a in self.argv)


def build_steps(zoos: list[ZooSpec], ablations: list[AblationSpec]) -> dict[str, Step]:
    steps: dict[str, Step] = {}

    def add(step: Step) -> None:
        steps[step.name] = step

    def add_zoo(z: ZooSpec) -> None:
        zname = z.shares_zoo or z.name
        zdir = f"$WORK/zoos/{zname}"
        if z.shares_zoo is None:
            add(Step(f"{z.name}/zoo", ["zoo", "build", *z.build, "--out", zdir, "--no-progress"],
                     f"{zdir}/zoo_summary.json", [], [z.name]))
        for seed in z.seeds:
            run = f"$WORK/runs/{z.name}-s{seed}"
            add(Step(f"{z.name}/train-s{seed}", ["train", "--zoo", zdir, "--out", run, *z.train, "--seed", str(seed)],
                     f"{run}/metrics.json", [f"{zname}/zoo"], [z.name]))
            add(Step(f"{z.name}/probe-s{seed}", ["probe", "--model", run, "--zoo", zdir, *z.probe, "--no-plots",
                                                  "--no-progress"],
                     f"{run}/probe/metrics.json", [f"{z.name}/train-s{seed}"], [z.name]))
            if z.sample is not None and seed in z.sample_seeds:
                add(Step(f"{z.name}/sample-s{seed}",
                         ["sample", "--model", run, "--zoo", zdir, "--out", f"{run}/sampling", "--evaluate",
                          *z.sample, "--seed", str(seed), "--no-plots", "--no-progress"],
                         f"{run}/sampling/metrics.json", [f"{z.name}/train-s{seed}"], [z.name]))

    def add_ablation(a: AblationSpec) -> None:
        if a.zoo not in {z.name for z in zoos}:
            raise ValueError(f"ablation {a.name} needs zoo {a.zoo}")
        zdir = f"$WORK/zoos/{a.zoo}"
        run = f"$WORK/runs/{a.name}"
        add(Step(f"{a.name}/train", ["train", "--zoo", zdir, "--out", run, *a.train, "--seed", "0"],
                 f"{run}/metrics.json", [f"{a.zoo}/zoo"], [a.name]))
        add(Step(f"{a.name}/probe", ["probe", "--model", run, "--zoo", zdir, "--no-plots", "--no-progress"],
                 f"{run}/probe/metrics.json", [f"{a.name}/train"], [a.name]))
        add(Step(f"{a.name}/sample", ["sample", "--model", run, "--zoo", zdir, "--out", f"{run}/sampling",
                                      *a.sample, "--seed", "0", "--no-progress"],
                 f"{run}/sampling/metrics.json", [f"{a.name}/train"], [a.name]))

    # order = priority when steps run side by side: the first two zoos, the ablations, then the rest
    for z in zoos[:2]:
        add_zoo(z)
    for a in ablations:
        add_ablation(a)
    for z in zoos[2:]:
        add_zoo(z)
    return steps


def select(steps: dict[str, Step], patterns: list[str] | None) -> list[str]:
    """Step names matching any pattern (by step name or row name), plus their dependencies, in order."""
    if not patterns:
        chosen = set(steps)
    else:
        chosen = {n for n, s in steps.items()
                  if any(fnmatch.fnmatch(n, p) or any(fnmatch.fnmatch(r, p) for r in s.rows) for p in patterns)}
        if not chosen:
            raise SystemExit(f"--only {patterns} matches no step; see --list")
    todo = list(chosen)
    while todo:
        for dep in steps[todo.pop()].deps:
            if dep not in chosen:
                chosen.add(dep)
                todo.append(dep)
    return [n for n in steps if n in chosen]


def _cache_file(work: Path, name: str) -> Path:
    return work / "results" / (name.replace("/", "__") + ".json")


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def start_step(step: Step, work: Path, threads: int) -> tuple[subprocess.Popen, float, Any]:
    argv = [a.replace("$WORK", str(work)) for a in step.argv]
    log = work / "logs" / (step.name.replace("/", "__") + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[quality] start {step.name}: {step.command()}", flush=True)
    fh = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "sane_hf.cli", *argv], stdout=fh, stderr=subprocess.STDOUT,
                            cwd=ROOT, env=_child_env(threads))
    return proc, time.perf_counter(), fh


def finish_step(step: Step, work: Path, proc: subprocess.Popen, started: float, fh: Any) -> dict[str, Any]:
    fh.close()
    seconds = time.perf_counter() - started
    log = Path(fh.name)
    metrics_path = Path(step.metrics.replace("$WORK", str(work)))
    if proc.returncode != 0 or not metrics_path.is_file():
        raise RuntimeError(f"step {step.name} failed (exit {proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")
    record = {
        "step": step.name,
        "command": step.command(),
        "seconds": round(seconds, 1),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average": list(os.getloadavg()),
        "metrics": json.loads(metrics_path.read_text()),
    }
    cache = _cache_file(work, step.name)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(record, indent=1) + "\n")
    print(f"[quality] done  {step.name} in {seconds:.0f} s", flush=True)
    return record


def run_steps(steps: dict[str, Step], names: list[str], work: Path, *, jobs: int, threads: int, force: set[str],
              keep_going: bool) -> list[str]:
    """Run ``names`` (cached ones are skipped), up to ``jobs`` at a time, each after its dependencies."""
    done = {n for n in names if _cache_file(work, n).is_file() and n not in force}
    done |= {n for n in steps if n not in names and _cache_file(work, n).is_file()}
    pending = [n for n in names if n not in done]
    running: dict[str, tuple] = {}
    failed: list[str] = []
    while pending or running:
        for n in list(running):
            proc = running[n][0]
            if proc.poll() is None:
                continue
            try:
                finish_step(steps[n], work, *running.pop(n))
                done.add(n)
            except RuntimeError as err:
                print(f"[quality] {err}", file=sys.stderr, flush=True)
                failed.append(n)
        for n in list(pending):
            if any(d in failed for d in steps[n].deps):
                pending.remove(n)
                failed.append(n)
        if failed and not keep_going:
            if not running:
                break
            time.sleep(2)
            continue
        ready = [n for n in pending if all(d in done for d in steps[n].deps)]
        while ready and len(running) < jobs:
            n = ready.pop(0)
            pending.remove(n)
            running[n] = start_step(steps[n], work, threads)
        if pending and not running and not ready:
            missing = {d for n in pending for d in steps[n].deps if d not in done}
            raise SystemExit(f"cannot run {pending}: dependencies {sorted(missing)} neither cached nor selected")
        time.sleep(2)
    return failed


# ----------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------


def _ms(values: list[float]) -> dict[str, Any] | None:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {"mean": mean(values), "std": pstdev(values) if len(values) > 1 else 0.0, "n": len(values),
            "values": values}


def _cached(work: Path, name: str) -> dict[str, Any] | None:
    path = _cache_file(work, name)
    return json.loads(path.read_text()) if path.is_file() else None


def _quality_cmd(profile: str, row: str) -> str:
    flag = {"small": " --small", "gpu": " --gpu", "cpu": ""}[profile]
    return f"python benchmarks/quality.py{flag} --only '{row}'"


def _sampling_summary(m: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"accuracy": {}, "gain_over_random_init": m.get("gain_over_random_init")}
    for group, curve in (m.get("accuracy") or {}).items():
        out["accuracy"][group] = {e: {"mean": v["mean"], "std": v["std"], "n": v["n"]} for e, v in curve.items()}
    if m.get("novelty"):
        nov = m["novelty"]
        out["novelty"] = {"num_neighbours": nov.get("num_neighbours")}
        for group in ("sampled", "noise", "noise_matched_accuracy", "prompts"):
            if group in nov:
                out["novelty"][group] = {
                    k: {"mean": nov[group][k]["mean"], "std": nov[group][k]["std"]}
                    for k in ("nearest_distance", "agreement", "prompt_distance") if k in nov[group]
                }
    if m.get("transfer"):
        t = m["transfer"]
        out["transfer"] = {
            "task": t.get("description", t.get("task")), "epochs": t.get("epochs"),
            "accuracy": {g: {e: {"mean": v["mean"], "std": v["std"]} for e, v in c.items()}
                         for g, c in t["accuracy"].items()},
        }
    out["prompts_test_acc"] = _ms((m.get("prompts") or {}).get("test_acc") or [])
    out["bandwidth"] = (m.get("sampling") or {}).get("bandwidth")
    out["timings"] = m.get("timings")
    return out


def collect(profile: str, work: Path, zoos: list[ZooSpec], ablations: list[AblationSpec],
            steps: dict[str, Step]) -> dict[str, Any]:
    out: dict[str, Any] = {"profile": profile, "zoos": [], "ablations": [], "missing_steps": []}
    for z in zoos:
        zname = z.shares_zoo or z.name
        zoo_rec = _cached(work, f"{zname}/zoo")
        entry: dict[str, Any] = {"name": z.name, "description": z.description,
                                 "reproduce": _quality_cmd(profile, z.name),
                                 "commands": {"zoo": (zoo_rec or {}).get("command")
                                              or steps[f"{zname}/zoo"].command()}}
        if zoo_rec is None:
            out["missing_steps"].append(f"{zname}/zoo")
            out["zoos"].append(entry)
            continue
        s = zoo_rec["metrics"]
        entry["zoo"] = {"num_models": s.get("num_models"), "num_checkpoints": s.get("num_checkpoints"),
                        "models_per_split": s.get("models_per_split"), "final_test_acc": s.get("final_test_acc"),
                        "build_seconds": zoo_rec["seconds"]}
        probes: dict[str, dict[str, list[float]]] = {}
        train_info = []
        for seed in z.seeds:
            tr = _cached(work, f"{z.name}/train-s{seed}")
            pr = _cached(work, f"{z.name}/probe-s{seed}")
            if tr is None or pr is None:
                out["missing_steps"] += [n for n, r in ((f"{z.name}/train-s{seed}", tr),
                                                        (f"{z.name}/probe-s{seed}", pr)) if r is None]
                continue
            m = tr["metrics"]
            train_info.append({"seed": seed, "steps": m.get("steps"), "seconds": tr["seconds"],
                               "train_loss": m.get("train_loss"), "val_loss": m.get("val_loss"),
                               "val_reconstruction_r2": m.get("val_reconstruction_r2"),
                               "tokens_per_second": m.get("tokens_per_second")})
            for target, by_method in pr["metrics"]["metrics"].items():
                for method, value in by_method.items():
                    probes.setdefault(target, {}).setdefault(method, []).append(value)
            entry.setdefault("metric_names", pr["metrics"].get("metric_names"))
            entry.setdefault("probe_info", pr["metrics"].get("info"))
        for k in ("train", "probe"):
            name = f"{z.name}/{k}-s{z.seeds[0]}"
            rec = _cached(work, name)
            entry["commands"][k] = rec["command"] if rec else steps[name].command()  # what actually ran
        entry["training"] = train_info
        entry["probe"] = {t: {meth: _ms(v) for meth, v in by.items()} for t, by in probes.items()}
        if z.sample is not None:
            sname = f"{z.name}/sample-s{z.sample_seeds[0]}"
            sr = _cached(work, sname)
            entry["commands"]["sample"] = sr["command"] if sr else steps[sname].command()
            if sr is None:
                out["missing_steps"].append(sname)
            else:
                entry["sampling"] = {**_sampling_summary(sr["metrics"]), "seconds": sr["seconds"],
                                     "sane_seed": z.sample_seeds[0]}
        out["zoos"].append(entry)
    for a in ablations:
        entry = {"name": a.name, "zoo": a.zoo, "setting": a.setting, "reproduce": _quality_cmd(profile, a.name),
                 "commands": {k: steps[f"{a.name}/{k}"].command() for k in ("train", "probe", "sample")}}
        recs = {k: _cached(work, f"{a.name}/{k}") for k in ("train", "probe", "sample")}
        for k, r in recs.items():
            if r is None:
                out["missing_steps"].append(f"{a.name}/{k}")
        if recs["train"]:
            m = recs["train"]["metrics"]
            entry["training"] = {"steps": m.get("steps"), "seconds": recs["train"]["seconds"],
                                 "val_reconstruction_r2": m.get("val_reconstruction_r2")}
        if recs["probe"]:
            entry["probe"] = recs["probe"]["metrics"]["metrics"]
        if recs["sample"]:
            sm = recs["sample"]["metrics"]
            entry["sampling"] = {
                "sampled_test_acc": _ms([r["test_acc"] for r in sm["samples"]]),
                "prompts_test_acc": _ms(sm["prompts"]["test_acc"]),
            }
        out["ablations"].append(entry)
    return out


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    prof = p.add_mutually_exclusive_group()
    prof.add_argument("--small", action="store_const", dest="profile", const="small", help="quick smoke profile")
    prof.add_argument("--gpu", action="store_const", dest="profile", const="gpu", help="larger zoos, GPU")
    p.set_defaults(profile="cpu")
    p.add_argument("--work-dir", type=Path, default=None,
                   help=f"zoos, runs, logs and cached step results (default: {DEFAULT_WORK}/<profile>, or "
                        "$SANE_BENCH_WORK/<profile>)")
    p.add_argument("--only", nargs="+", default=None, help="fnmatch patterns of rows or steps (deps included)")
    p.add_argument("--force", action="store_true", help="rerun selected steps even when cached")
    p.add_argument("--list", action="store_true", help="list steps, commands and cache state; run nothing")
    p.add_argument("--collect-only", action="store_true", help="only aggregate cached steps into the JSON")
    p.add_argument("--keep-going", action="store_true", help="continue with other steps after a failure")
    p.add_argument("--jobs", type=int, default=2, help="steps run side by side (default 2: one per core)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per step (OMP_NUM_THREADS of the subprocesses; default 1)")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default: benchmarks/results/quality.json; quality_<profile>.json for "
                        "non-cpu profiles)")
    p.add_argument("--export-run", default="digits-cnn-s-t16",
                   help="the row whose seed-0 SANE model --export-checkpoint stages")
    p.add_argument("--export-checkpoint", type=Path, default=None,
                   help="after running, stage the first zoo's seed-0 SANE model as a Hub folder here "
                        "(sane-hf push --dry-run --staging-dir)")
    p.add_argument("--repo-id", default="sane-hf/sane-digits-cnn-s", help="repo id written into the model card")
    args = p.parse_args(argv)

    work = (args.work_dir or DEFAULT_WORK / args.profile).resolve()
    zoos, ablations = PROFILES[args.profile]()
    steps = build_steps(zoos, ablations)
    names = select(steps, args.only)
    # --force reruns the steps the patterns name (a row name covers its steps), not dependencies pulled in
    matched = set(names) if not args.only else {
        n for n in names
        if any(fnmatch.fnmatch(n, p) or any(fnmatch.fnmatch(r, p) for r in steps[n].rows) for p in args.only)}
    if args.list:
        for n in names:
            state = "cached" if _cache_file(work, n).is_file() else "todo"
            print(f"{state:6s} {n:28s} {steps[n].command()}")
        return 0
    started = time.time()
    load_before = list(os.getloadavg())
    failed: list[str] = []
    if not args.collect_only:
        failed = run_steps(steps, names, work, jobs=args.jobs, threads=args.threads,
                           force=matched if args.force else set(), keep_going=args.keep_going)
    result = collect(args.profile, work, zoos, ablations, steps)
    result["machine"] = {**machine(), "load_average_before": load_before}
    result["work_dir_note"] = "commands use $WORK for the work dir (default /tmp/sane-hf-bench/<profile>)"
    result["run_settings"] = {"jobs": args.jobs, "threads_per_step": args.threads,
                              "env": f"OMP_NUM_THREADS={args.threads} (set by quality.py for each command)"}
    result["generated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out = args.out or RESULTS / ("quality.json" if args.profile == "cpu" else f"quality_{args.profile}.json")
    # collect() reads every cached step of the profile, so a partial (--only) run never drops rows
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"[quality] wrote {out} ({len(result['missing_steps'])} steps missing) in {time.time() - started:.0f} s")
    if args.export_checkpoint is not None:
        run = work / "runs" / f"{args.export_run}-s0"
        cmd = [sys.executable, "-m", "sane_hf.cli", "push", "--model", str(run), "--repo-id", args.repo_id,
               "--dry-run", "--staging-dir", str(args.export_checkpoint)]
        print("[quality] " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        # the measurements name the local work dir: write it as $WORK, as the benchmark's commands do
        for path in Path(args.export_checkpoint).iterdir():
            if path.suffix in (".json", ".md"):
                text = path.read_text()
                if str(work) in text:
                    path.write_text(text.replace(str(work), "$WORK"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
