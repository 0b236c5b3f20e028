"""SANE's training step against a plain ``nn.TransformerEncoder`` autoencoder of the same dims.

The yardstick of throughput (issue: "measure against a plain autoencoder of the same dims in the
same process, as a ratio"): both models see the same batch of two views, ``AdamW``, one thread,
and their steps alternate so that load from other jobs hits both alike; the reported step time is
the best of ``--iters`` (other jobs only ever slow a step down). The plain autoencoder has what
SANE needs and nothing else: a token projection, pre-LayerNorm ``nn.TransformerEncoder`` blocks
(``d_model``, heads, MLP ``mlp_ratio × d_model``, dropout 0) for the encoder and the decoder, a
latent projection each way, one learned position table, and the reconstruction MSE of both
views. SANE adds its 3-D position code, masked loss and the contrastive head. Dims default to
the ones the reference implementation was compared at (token 64, d_model 128, 4+4 layers, 4
heads, MLP 4×, latent 32, window 64, batch 32). Results: ``benchmarks/results/model_vs_plain.json``.

    python benchmarks/bench_vs_plain_ae.py
    python benchmarks/bench_vs_plain_ae.py --iters 10 --window 128
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from bench_model import machine_info, make_batch
from torch import nn

from sane_hf.configuration_sane import SaneConfig
from sane_hf.modeling_sane import SaneModel


class PlainAutoencoder(nn.Module):
    """Token projection + learned positions → encoder blocks → latent → decoder blocks → tokens."""

    def __init__(self, config: SaneConfig, window: int):
        super().__init__()
        d = config.d_model

        def blocks(n: int) -> nn.TransformerEncoder:
            layer = nn.TransformerEncoderLayer(d, config.num_heads, int(config.mlp_ratio * d), dropout=0.0,
                                               batch_first=True, norm_first=True, activation="gelu")
            return nn.TransformerEncoder(layer, n, enable_nested_tensor=False)

        self.embed = nn.Linear(config.token_size, d)
        self.positions = nn.Parameter(torch.zeros(window, d))
        self.encoder = blocks(config.num_encoder_layers)
        self.to_latent = nn.Linear(d, config.latent_dim)
        self.from_latent = nn.Linear(config.latent_dim, d)
        self.decoder = blocks(config.num_decoder_layers)
        self.out = nn.Linear(d, config.token_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(tokens) + self.positions)  # (B, W, d)
        z = self.to_latent(h)  # (B, W, latent)
        return self.out(self.decoder(self.from_latent(z) + self.positions))  # (B, W, token_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. other jobs running)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "model_vs_plain.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = SaneConfig(token_size=64, d_model=128, num_encoder_layers=4, num_decoder_layers=4, num_heads=4,
                        mlp_ratio=4.0, latent_dim=32, window_size=args.window, halo_size=0, dropout=0.0)
    device = torch.device("cpu")
    inputs = make_batch(config, args.batch, args.window, device)
    inputs["positions"] = inputs["positions"].clone()
    inputs["positions"][..., 0] -= 1000  # token indices from 0, as in one window of a model
    torch.manual_seed(0)
    sane = SaneModel(config).train()
    plain = PlainAutoencoder(config, args.window).train()
    optimizers = {"sane": torch.optim.AdamW(sane.parameters(), lr=1e-4),
                  "plain": torch.optim.AdamW(plain.parameters(), lr=1e-4)}
    mask = inputs["mask"].float()

    def step(name: str) -> float:
        start = time.perf_counter()
        if name == "sane":
            loss = sane(**inputs).loss
        else:
            losses = [((plain(inputs[key]) - inputs["tokens"]) ** 2 * mask).sum() / mask.sum()
                      for key in ("tokens", "tokens_2")]
            loss = (losses[0] + losses[1]) / 2
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step("sane"), step("plain")
    times: dict[str, list[float]] = {"sane": [], "plain": []}
    for _ in range(args.iters):
        for name in times:
            times[name].append(step(name))
    tokens = args.batch * args.window * 2  # both views
    result = {
        name: {"params": sum(p.numel() for p in model.parameters()), "step_seconds_min": round(min(t), 4),
               "step_seconds_all": [round(x, 4) for x in t], "tokens_per_s": round(tokens / min(t), 1)}
        for name, t, model in (("sane", times["sane"], sane), ("plain", times["plain"], plain))
    }
    ratio = result["sane"]["tokens_per_s"] / result["plain"]["tokens_per_s"]
    words = ("SANE's step is as fast as or faster than" if ratio >= 1.0 else
             f"SANE's step runs at {ratio:.2f}x the throughput of")
    out = {
        "machine": machine_info(args.threads),
        "what": "training step (forward + backward + AdamW, two views), best of iters, steps alternating",
        "dims": {"token_size": 64, "d_model": 128, "layers": "4+4", "heads": 4, "mlp_ratio": 4.0, "latent_dim": 32,
                 "window": args.window, "batch": args.batch},
        "note": args.note,
        "results": result,
        "ratio_sane_over_plain": round(ratio, 3),
        "verdict": f"{words} a plain nn.TransformerEncoder autoencoder of the same dims "
                   f"({result['sane']['tokens_per_s']:.0f} vs {result['plain']['tokens_per_s']:.0f} tokens/s).",
        "command": "python benchmarks/bench_vs_plain_ae.py",
    }
    if hasattr(os, "getloadavg"):
        out["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(out["verdict"])


if __name__ == "__main__":
    main()
