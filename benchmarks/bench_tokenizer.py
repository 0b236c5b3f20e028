"""Speed of the weight tokenizer: vectorised encode+decode vs a per-row Python implementation.

Both implementations follow the same scheme and the same `WeightTokenizer` spec (the baseline
loops over every row of every layer, concatenating the row's weight and bias values and cutting
them into tokens, and back); each run checks that they produce identical tokens and that both
decode bit for bit to the input. Models: `cnn-s` (28×28, 2,464 params), `resnet18` (width 64,
11.2 M params) and a BERT-base-sized `BertModel` (`BertConfig()` defaults, random init, 110 M
params). One thread (`torch.set_num_threads(1)`). Results go to `benchmarks/results/tokenizer.json`.

    python benchmarks/bench_tokenizer.py
    python benchmarks/bench_tokenizer.py --models cnn-s resnet18 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from sane_hf.tokenization_sane import WeightTokenizer

MODELS: dict[str, Callable[[], nn.Module]] = {}


def _register(name: str):
    def wrap(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        MODELS[name] = fn
        return fn

    return wrap


@_register("cnn-s")
def _cnn_s() -> nn.Module:
    from sane_hf.zoo.architectures import create_model

    return create_model("cnn-s", image_size=28, seed=0)


@_register("resnet18")
def _resnet18() -> nn.Module:
    from sane_hf.zoo.architectures import create_model

    return create_model("resnet18", in_channels=3, image_size=32, width=64, seed=0)


@_register("bert-base")
def _bert_base() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig()).eval()


# ----------------------------------------------------------------------------------------------
# the baseline: the same scheme, one row at a time
# ----------------------------------------------------------------------------------------------


def encode_per_row(tok: WeightTokenizer, sd: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Straightforward tokenization: Python loop over layers and rows."""
    d = tok.token_size
    tokens = torch.zeros(tok.num_tokens, d)  # (N, d)
    mask = torch.zeros(tok.num_tokens, d, dtype=torch.bool)  # (N, d)
    positions = torch.zeros(tok.num_tokens, 3, dtype=torch.int32)  # (N, 3)
    for index, layer in enumerate(tok.layers):
        matrices = [sd[key].reshape(layer.num_rows, -1).float() for key in layer.keys]  # (rows, cols) each
        width = layer.tokens_per_row * d
        for row in range(layer.num_rows):
            n0 = layer.token_start + row * layer.tokens_per_row
            n1 = n0 + layer.tokens_per_row
            padded = torch.zeros(width)  # (T*d,)
            padded[: layer.row_length] = torch.cat([m[row] for m in matrices])  # (row_length,)
            tokens[n0:n1] = padded.view(layer.tokens_per_row, d)  # (T, d)
            mask[n0:n1].view(-1)[: layer.row_length] = True
            positions[n0:n1, 0] = torch.arange(n0, n1, dtype=torch.int32)
            positions[n0:n1, 1] = index
            positions[n0:n1, 2] = row
    return tokens, positions, mask


def decode_per_row(tok: WeightTokenizer, tokens: Tensor) -> OrderedDict[str, Tensor]:
    """Straightforward detokenization: Python loop over layers and rows."""
    matrices: dict[str, Tensor] = {}
    for layer in tok.layers:
        outs = [torch.empty(layer.num_rows, cols) for cols in layer.columns]  # (rows, cols) each
        for row in range(layer.num_rows):
            start = layer.token_start + row * layer.tokens_per_row
            values = tokens[start : start + layer.tokens_per_row].reshape(-1)[: layer.row_length]  # (row_length,)
            offset = 0
            for out, cols in zip(outs, layer.columns):
                out[row] = values[offset : offset + cols]
                offset += cols
        matrices.update(zip(layer.keys, outs))
    result: OrderedDict[str, Tensor] = OrderedDict()
    for spec in tok.tensors:
        dtype = getattr(torch, spec.dtype)
        if spec.key in matrices:
            result[spec.key] = matrices[spec.key].reshape(spec.shape).to(dtype)
        elif spec.value is not None:
            result[spec.key] = torch.tensor(spec.value, dtype=dtype).reshape(spec.shape)
        else:
            result[spec.key] = torch.full(spec.shape, spec.fill, dtype=dtype)
    return result


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------


def _best_of(fn: Callable[[], object], repeats: int, budget_s: float = 5.0) -> tuple[float, object]:
    """Best time of up to ``repeats`` calls, stopping early once ``budget_s`` is spent (at least one call)."""
    best, result, spent = float("inf"), None, 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent > budget_s:
            break
    return best, result


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in b)


def bench_model(name: str, token_size: int, repeats: int, baseline_repeats: int) -> dict:
    model = MODELS[name]()
    sd = model.state_dict()
    start = time.perf_counter()
    tok = WeightTokenizer.from_reference(model, token_size=token_size)
    tok.decode(tok.encode(sd))  # first call also builds the copy plan, mask and positions
    setup_s = time.perf_counter() - start

    encode_s, tokens = _best_of(lambda: tok.encode(sd), repeats)
    decode_s, decoded = _best_of(lambda: tok.decode(tokens), repeats)
    base_encode_s, (b_tokens, b_positions, b_mask) = _best_of(lambda: encode_per_row(tok, sd), baseline_repeats)
    base_decode_s, b_decoded = _best_of(lambda: decode_per_row(tok, b_tokens), baseline_repeats)

    agree = (
        torch.equal(tokens.tokens, b_tokens)
        and torch.equal(tokens.positions, b_positions)
        and torch.equal(tokens.mask, b_mask)
    )
    total, base_total = encode_s + decode_s, base_encode_s + base_decode_s
    result = {
        "num_params": tok.num_params,
        "num_tokens": tok.num_tokens,
        "num_layers": tok.num_layers,
        "token_size": token_size,
        "setup_s": round(setup_s, 4),
        "encode_s": round(encode_s, 5),
        "decode_s": round(decode_s, 5),
        "encode_decode_s": round(total, 5),
        "params_per_s": round(tok.num_params / total),
        "baseline_encode_s": round(base_encode_s, 4),
        "baseline_decode_s": round(base_decode_s, 4),
        "baseline_encode_decode_s": round(base_total, 4),
        "baseline_params_per_s": round(tok.num_params / base_total),
        "speedup": round(base_total / total, 1),
        "round_trip_exact": _same(decoded, sd),
        "baseline_round_trip_exact": _same(b_decoded, sd),
        "baseline_tokens_identical": agree,
        "repeats": repeats,
        "baseline_repeats": baseline_repeats,
    }
    print(
        f"{name:10s} {tok.num_params:>11,d} params {tok.num_tokens:>9,d} tokens | "
        f"encode {encode_s * 1e3:8.1f} ms decode {decode_s * 1e3:8.1f} ms "
        f"({result['params_per_s'] / 1e6:7.1f} M params/s) | per-row {base_total:7.2f} s | "
        f"x{result['speedup']} | exact {result['round_trip_exact']} agree {agree}",
        flush=True,
    )
    return result


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    try:
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_before"] = [round(v, 2) for v in os.getloadavg()]
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--token-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="best of N for the vectorised tokenizer")
    parser.add_argument(
        "--baseline-repeats", type=int, default=3, help="best of N for the per-row baseline (fewer past 5 s)"
    )
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. 'machine shared')")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tokenizer.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    results = {
        "benchmark": "weight tokenizer encode+decode (sane_hf.tokenization_sane) vs per-row Python baseline",
        "machine": machine_info(),
        "note": args.note,
        "models": {},
    }
    for name in args.models:
        results["models"][name] = bench_model(name, args.token_size, args.repeats, args.baseline_repeats)
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
