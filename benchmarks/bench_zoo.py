"""Population training throughput: per-model loop vs stacked groups vs stacked groups in 2 processes.

Measures model-epochs per second (one model trained for one epoch, plus its checkpoint evaluation
on train/val/test when ``--eval`` is on, as in a zoo build) for

* ``per_model``: the plain per-model loop (``nn.Module`` + ``torch.optim``), one torch thread
  — the baseline;
* ``batched``: ``train_population`` stacking each group into one model, one process, one thread;
* ``batched_2proc``: the same in 2 worker processes (spawn, one thread each; the pool is started
  before timing, as it is reused across the chunks of a zoo build — a cold start adds a few
  seconds once).

Workloads: ``mlp`` and ``cnn-s`` on digits (8×8), and ``cnn-s`` on MNIST and Fashion-MNIST
downsampled to 14×14 with a train subset, when installed. Ratios are against the baseline of the
same run. Every timing is the best of ``--repeats`` interleaved runs, because the machine may be
shared. Results go to ``benchmarks/results/zoo.json``.

    python benchmarks/bench_zoo.py               # about 5 minutes on 2 busy cores
    python benchmarks/bench_zoo.py --quick       # fewer models and epochs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from sane_hf.zoo.tasks import list_tasks, load_task
from sane_hf.zoo.train import _POOL, sample_grid, shutdown_workers, train_population

RESULTS = Path(__file__).parent / "results" / "zoo.json"


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads_per_process": 1,
    }
    try:
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return info


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def loadavg() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def worker_cpu_seconds() -> float:
    """CPU seconds used so far by the live worker processes of ``train_population``'s pool."""
    executor = _POOL.get("executor")
    total = 0.0
    for pid in list(getattr(executor, "_processes", {}) or {}):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, ValueError, IndexError):
            pass
    return total


def run(arch, task, grid, epochs, *, batched, workers, eval_every_epoch) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its workers) to train ``grid`` for ``epochs``."""
    ckpts = None if eval_every_epoch else [epochs]
    wall, cpu, wcpu = time.perf_counter(), time.process_time(), worker_cpu_seconds()
    for _ in train_population(
        arch, task, grid, epochs=epochs, checkpoint_epochs=ckpts, batched=batched,
        num_workers=workers, threads_per_worker=1, progress=False,
    ):
        pass
    return time.perf_counter() - wall, time.process_time() - cpu + worker_cpu_seconds() - wcpu


def bench_workload(name, arch, task, *, num_models, baseline_models, epochs, repeats, eval_every_epoch) -> dict:
    grid = sample_grid(num_models, seed=0)
    base_grid = grid[:baseline_models]
    # warm-up: first convolutions, optimizer imports, the worker pool
    run(arch, task, base_grid[:1], 1, batched=False, workers=1, eval_every_epoch=False)
    run(arch, task, grid[:4], 1, batched=True, workers=1, eval_every_epoch=False)
    run(arch, task, grid[:4], 1, batched=True, workers=2, eval_every_epoch=False)
    best = {"per_model": float("inf"), "batched": float("inf"), "batched_2proc": float("inf")}
    cpu = {"per_model": float("inf"), "batched": float("inf"), "batched_2proc": float("inf")}
    for _ in range(repeats):  # interleaved, best of N: the machine is shared
        for key, models, batched, workers in (
            ("per_model", base_grid, False, 1),
            ("batched", grid, True, 1),
            ("batched_2proc", grid, True, 2),
        ):
            wall, proc = run(arch, task, models, epochs, batched=batched, workers=workers, eval_every_epoch=eval_every_epoch)
            best[key] = min(best[key], wall / (len(models) * epochs))
            cpu[key] = min(cpu[key], proc / (len(models) * epochs))
    steps = -(-len(task.y_train) // grid[0].batch_size)
    out = {
        "workload": name,
        "arch": arch,
        "task": task.name,
        "image_size": task.image_size,
        "train_images": len(task.y_train),
        "eval_images": len(task.y_val) + len(task.y_test) + min(len(task.y_train), 10_000),
        "steps_per_epoch": steps,
        "num_models": num_models,
        "baseline_models": baseline_models,
        "epochs": epochs,
        "evaluate_every_epoch": eval_every_epoch,
        "model_epochs_per_s": {k: round(1.0 / v, 2) for k, v in best.items()},
        "ms_per_model_epoch": {k: round(1e3 * v, 2) for k, v in best.items()},
        "speedup_vs_per_model": {k: round(best["per_model"] / v, 2) for k, v in best.items()},
        "cpu_ms_per_model_epoch": {k: round(1e3 * v, 2) for k, v in cpu.items()},
        # CPU efficiency: model-epochs per CPU-second relative to the baseline (insensitive to
        # how many cores other jobs left free, not to their cache and memory-bandwidth pressure)
        "cpu_efficiency_vs_per_model": {k: round(cpu["per_model"] / v, 2) for k, v in cpu.items()},
        # what 2 free cores would give: the 2 workers' CPU time split over 2 cores
        "projected_2proc_speedup_on_2_free_cores": round(cpu["per_model"] / (cpu["batched_2proc"] / 2), 2),
    }
    print(
        f"{name:>48}: per-model {out['ms_per_model_epoch']['per_model']:8.1f} ms/model-epoch | "
        f"batched {out['speedup_vs_per_model']['batched']:5.2f}x | "
        f"batched+2 proc {out['speedup_vs_per_model']['batched_2proc']:5.2f}x "
        f"(CPU efficiency {out['cpu_efficiency_vs_per_model']['batched']:.2f}x / "
        f"{out['cpu_efficiency_vs_per_model']['batched_2proc']:.2f}x; "
        f"2 free cores: {out['projected_2proc_speedup_on_2_free_cores']:.2f}x)",
        flush=True,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer models and epochs")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # 64 models: one process trains two groups of 32 in turn, two processes one group each
    num_models, epochs = (32, 1) if args.quick else (64, 2)

    workloads = [
        ("mlp/digits", "mlp", load_task("digits"), True),
        ("cnn-s/digits", "cnn-s", load_task("digits"), True),
        ("cnn-s/digits (checkpoint at the last epoch only)", "cnn-s", load_task("digits"), False),
    ]
    for task_name in ("mnist", "fashion-mnist"):
        if task_name in list_tasks(installed_only=True):
            task = load_task(task_name, image_size=14, train_subset=2000, eval_subset=1000)
            workloads.append((f"cnn-s/{task_name}-14px-2k", "cnn-s", task, True))

    load_before = loadavg()
    results = []
    try:
        for name, arch, task, eval_every_epoch in workloads:
            small = task.image_size > 8
            results.append(
                bench_workload(
                    name, arch, task, num_models=num_models, baseline_models=2 if small else 4,
                    epochs=1 if small else epochs, repeats=args.repeats, eval_every_epoch=eval_every_epoch,
                )
            )
    finally:
        shutdown_workers()
    digits_cnn = next(r for r in results if r["workload"] == "cnn-s/digits (checkpoint at the last epoch only)")
    report = {
        "benchmark": "zoo population training (model-epochs per second)",
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": loadavg(),
        "note": (
            "Measured on a 2-core VM shared with other people's jobs running at the same time (see "
            "the load averages), so absolute numbers are noisy; each number is the best of "
            "interleaved repeats (the first pays oneDNN's per-shape kernel JIT) and ratios compare "
            "runs of the same moment. The kernel groups processes by session (sched_autogroup), so "
            "while other sessions keep the cores busy a second worker process of ours gets no "
            "extra CPU and the measured wall-clock gain of 2 processes is near 1x; "
            "cpu_efficiency_vs_per_model (model-epochs per CPU-second) and "
            "projected_2proc_speedup_on_2_free_cores (the workers' CPU time spread over 2 cores) "
            "show what the code does without that contention. A model-epoch includes the "
            "checkpoint evaluation on train (<=10k images), val and test when evaluate_every_epoch "
            "is true. The 2-process pool is started before timing (it is reused across calls). "
            "Batch size 16 (sample_grid's default). jemalloc was not tried (not installed)."
        ),
        "sched_autogroup": _read("/proc/sys/kernel/sched_autogroup_enabled"),
        "cnn_s_digits_epoch_ms": {
            "per_model_loop": digits_cnn["ms_per_model_epoch"]["per_model"],
            "batched_per_model_share": digits_cnn["ms_per_model_epoch"]["batched"],
            "batched_group_of_32_models": round(digits_cnn["ms_per_model_epoch"]["batched"] * 32, 1),
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
