"""Embedding long models with haloed windows: time and peak memory on CPU.

`embed_models` encodes a model window by window (content `window_size - 2·halo_size` tokens plus
`halo_size` of context on each side), so the transformer's activations are bounded by
`batch_size × window_size`, never by the model's length. This benchmark embeds, with a small SANE
(the default `SaneConfig` at `token_size=288`: d_model 128, 4 encoder layers, windows of 64, halo
8, random weights — speed does not depend on training):

- `cnn-s`: the Model Zoos small CNN (28×28, 2,464 params, one window per model) × 256 models;
- `resnet18`: CIFAR-style ResNet-18, width 64 (11.2 M params), at batch sizes 8, 32 and 128;
- `resnet50`: a state_dict of ResNet-50's shapes (torchvision key names, 25.6 M params, built by the
  bottleneck ResNet defined here — no torchvision needed).

Each case runs in a fresh subprocess; peak memory is the process's peak RSS (`resource.getrusage`
`ru_maxrss`, plus RSS sampled every 2 ms with psutil during the call) minus its RSS right before
`embed_models` (the state_dict, tokenizer and SANE already built), so the delta is what embedding
adds: the model's tokens (unavoidable: `N × token_size` floats), its latents, and the window
activations. Time is reported per 1k tokens, which stays flat from ResNet-18 to ResNet-50: time is
linear in tokens. Results go to `benchmarks/results/embed.json`.

    python benchmarks/bench_embed.py
    python benchmarks/bench_embed.py --cases resnet18 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

# case name -> (architecture, models embedded in one call, batch size)
CASES: dict[str, tuple[str, int, int]] = {
    "cnn-s": ("cnn-s", 256, 32),
    "resnet18-bs8": ("resnet18", 1, 8),
    "resnet18": ("resnet18", 1, 32),
    "resnet18-bs128": ("resnet18", 1, 128),
    "resnet50": ("resnet50", 1, 32),
}
TOKEN_SIZE = 288


# ----------------------------------------------------------------------------------------------
# a torchvision-free ResNet-50 (Bottleneck blocks, torchvision key names and shapes)
# ----------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or in_planes != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))


class ResNet50(nn.Module):
    """Only the parameters matter here (no forward): conv1, bn1, layer1..4 of [3, 4, 6, 3] Bottlenecks, fc."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for index, (planes, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], 1):
            layers = []
            for b in range(blocks):
                layers.append(Bottleneck(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes * Bottleneck.expansion
            setattr(self, f"layer{index}", nn.Sequential(*layers))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)


def build_state_dict(arch: str) -> dict[str, torch.Tensor]:
    from sane_hf.zoo.architectures import create_model

    torch.manual_seed(0)
    if arch == "cnn-s":
        module = create_model("cnn-s", image_size=28, seed=0)
    elif arch == "resnet18":
        module = create_model("resnet18", in_channels=3, image_size=32, width=64, seed=0)
    elif arch == "resnet50":
        module = ResNet50()
    else:
        raise ValueError(arch)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# one case (in a fresh process)
# ----------------------------------------------------------------------------------------------


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _PeakSampler(threading.Thread):
    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.peak, self._done = interval, _rss(), threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, _rss())
        return self.peak


def run_case(name: str, threads: int) -> dict:
    import gc

    from sane_hf.configuration_sane import SaneConfig
    from sane_hf.embedding import embed_models, resolve_window, window_plan
    from sane_hf.modeling_sane import SaneModel
    from sane_hf.tokenization_sane import WeightTokenizer

    torch.set_num_threads(threads)
    arch, n_models, batch_size = CASES[name]
    sd = build_state_dict(arch)
    tok = WeightTokenizer.from_reference(sd, token_size=TOKEN_SIZE).fit([sd])
    torch.manual_seed(0)
    config = SaneConfig(token_size=TOKEN_SIZE)
    sane = SaneModel(config).eval()
    inputs = [sd] * n_models
    window, halo = resolve_window(config)
    n = tok.num_tokens
    windows = len(window_plan(n, window, halo))

    start = time.perf_counter()
    tok.encode(sd, normalize=True)
    tokenize_s = time.perf_counter() - start

    gc.collect()
    rss_before = _rss()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    sampler = _PeakSampler()
    sampler.start()
    start = time.perf_counter()
    out = embed_models(sane, tok, inputs, batch_size=batch_size)
    embed_s = time.perf_counter() - start
    peak_sampled = sampler.stop()
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # ru_maxrss is a high-water mark: it shows the embedding's peak only if that exceeds earlier peaks
    peak = max(peak_sampled, maxrss_after if maxrss_after > maxrss_before else 0)
    assert out.embeddings.shape == (n_models, config.latent_dim) and torch.isfinite(out.embeddings).all()

    total_tokens = n * n_models
    d, L = config.d_model, config.window_size
    mb = 1 / 2**20
    return {
        "arch": arch,
        "num_params": tok.num_params,
        "num_tokens_per_model": n,
        "num_layers": tok.num_layers,
        "n_models": n_models,
        "total_tokens": total_tokens,
        "batch_size": batch_size,
        "window": window,
        "halo": halo,
        "forward_len": min(L, n),
        "windows_per_model": windows,
        "forward_passes": math.ceil(windows * n_models / batch_size),
        "embed_s": round(embed_s, 3),
        "s_per_1k_tokens": round(1000 * embed_s / total_tokens, 4),
        "tokenize_one_model_s": round(tokenize_s, 4),
        "rss_before_mb": round(rss_before * mb, 1),
        "peak_rss_mb": round(peak * mb, 1),
        "peak_delta_mb": round((peak - rss_before) * mb, 1),
        # what embedding one model necessarily holds: tokens + value mask (+ per-token latents)
        "one_model_tokens_mb": round(n * TOKEN_SIZE * 5 * mb, 1),
        "one_model_latents_mb": round(n * config.latent_dim * 4 * mb, 1),
        # activations of one forward batch: residual stream + MLP hidden + attention scores (fp32)
        "batch_activations_est_mb": round(
            batch_size * L * (d * (4 + config.mlp_ratio) + config.num_heads * L) * 4 * mb, 1
        ),
        # for contrast: the attention scores of ONE layer if the whole model were one sequence
        "full_sequence_attention_scores_gb": round(config.num_heads * n**2 * 4 / 2**30, 1),
    }


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------


def machine_info(threads: int) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
    }
    try:
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_before"] = [round(v, 2) for v in os.getloadavg()]
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per case (default 1: stable timings)")
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. 'machine shared')")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "embed.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:  # one case in this (fresh) process; JSON on the last stdout line
        print(json.dumps(run_case(args.child, args.threads)))
        return {}

    results = {"machine": machine_info(args.threads)}
    cases = {}
    for name in args.cases:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", name, "--threads", str(args.threads)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise SystemExit(f"case {name} failed:\n{proc.stderr}")
        cases[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        c = cases[name]
        print(
            f"{name:15s} {c['total_tokens']:7d} tokens ({c['n_models']} x {c['num_tokens_per_model']}) | "
            f"{c['embed_s']:7.2f} s | {c['s_per_1k_tokens']:.4f} s/1k tokens | peak +{c['peak_delta_mb']:.0f} MB "
            f"(tokens {c['one_model_tokens_mb']:.0f} MB, batch activations ~{c['batch_activations_est_mb']:.0f} MB)",
            flush=True,
        )
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    results["note"] = (
        "2-core machine shared with other engineers' jobs during the run (see load averages); "
        f"torch.set_num_threads({args.threads}); fp32 on CPU; one run per case in a fresh process. "
        "SANE: default SaneConfig at token_size=288 (d_model 128, 4 encoder layers, window_size 64, halo 8), "
        "random weights. peak_delta_mb = peak RSS during embed_models minus RSS just before it. "
        + args.note
    ).strip()
    results["cases"] = cases
    per_k = {name: c["s_per_1k_tokens"] for name, c in cases.items() if c["arch"] != "cnn-s"}
    if per_k:
        results["time_linear_in_tokens"] = {
            "s_per_1k_tokens_at_batch_32": {n: v for n, v in per_k.items() if cases[n]["batch_size"] == 32},
            "max_over_min_s_per_1k": round(max(per_k.values()) / min(per_k.values()), 2),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
