"""``sane-hf sample``: sample new models around a zoo's best test models, and evaluate them.

::

    sane-hf sample --model runs/sane-digits --zoo zoos/digits-cnn --num-samples 16 --out samples/ [--evaluate]

Loads the SANE model and its ``weight_tokenizer.json`` from ``--model`` and the raw zoo from
``--zoo``. Prompts are the best ``--num-prompts`` test models (one activation, relaxed and
explained when too few share it: :func:`sane_hf.evaluation.choose_prompts`); samples are drawn
with :func:`sane_hf.sampling.sample_models`, spread over the prompts, and written to ``--out`` as
``sample_XXX.safetensors``, best first, with ``metrics.json`` (prompts and how they were chosen,
scores, each sample's test accuracy when the zoo's task is known, diversity: mean pairwise distance
of samples vs prompts and samples per prompt). Without ``--evaluate`` only the trained SANE and
the zoo's prompts are needed, for any zoo; nothing is written when a step fails. With ``--evaluate`` the full protocol of :mod:`sane_hf.evaluation` runs: accuracy after
0/1/5 fine-tuning epochs beside random init, noise at matched distance, the aligned prompt
average and the prompts; nearest-training-checkpoint distances and prediction agreement; transfer
to another task; plus ``accuracy_vs_epoch.png``. Every :class:`sane_hf.evaluation.SamplingEvalConfig`
field but ``window`` and ``halo`` is a flag, with its ``help`` and default (built by
:func:`sane_hf.cli._config_flags.add_config_flags`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from sane_hf.serialization import writes_folder

__all__ = ["register", "run_sample", "SKIPPED_FIELDS"]

#: SamplingEvalConfig fields with no flag: advanced, kept at the model's defaults on the command line
SKIPPED_FIELDS = ("window", "halo")


#: the one-line help of this subcommand in `sane-hf --help` (read without building its flags)
HELP = "sample new models from a trained SANE (and evaluate them against baselines)"


def _epochs(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v != "")
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs like 0,1,5, got {text!r}") from err
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative epochs like 0,1,5, got {text!r}")
    return values


def _bandwidth(text: str) -> float | str:
    from sane_hf.sampling import BANDWIDTH_RULES

    try:
        value = float(text)
    except ValueError:
        if text not in BANDWIDTH_RULES:
            raise argparse.ArgumentTypeError(f"expected a number or one of {BANDWIDTH_RULES}, got {text!r}") from None
        return text
    if not value > 0:
        raise argparse.ArgumentTypeError(f"bandwidth must be > 0, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    from sane_hf.cli._common import add_runtime_flags
    from sane_hf.cli._config_flags import add_config_flags
    from sane_hf.evaluation.config import SamplingEvalConfig

    p = subparsers.add_parser(
        "sample",
        help=HELP,
        description=(
            "Sample models around the best test models of a zoo with a trained SANE (KDE in latent space, "
            "optional subsampling by training accuracy and bootstrapping) and save them as safetensors. "
            "With --evaluate, compare them after fine-tuning against random init, noisy prompts at matched "
            "distance, the aligned prompt average and the prompts, measure their distance to the training zoo, "
            "and test transfer to another task. Writes metrics.json (and accuracy_vs_epoch.png)."
        ),
    )
    p.add_argument("--model", required=True, type=Path,
                   help="folder with the SaneModel (config.json + weights) and its weight_tokenizer.json")
    p.add_argument("--zoo", required=True, help="raw zoo folder (sane-hf zoo build/import) or Hub dataset id")
    p.add_argument("--out", required=True, type=Path, help="output folder for samples and metrics.json")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even when it holds files sane-hf sample did not write")
    p.add_argument("--evaluate", action="store_true", help="run the full evaluation protocol (fine-tuning, baselines)")
    p.add_argument("--zoo-config", type=Path, default=None,
                   help="the zoo's zoo_config.json (default: <zoo>/zoo_config.json, else <model>/zoo_config.json)")
    p.add_argument("--device", default=None, help="torch device for SANE (default: cuda if available, else cpu)")
    p.add_argument("--no-plots", "--no_plots", action="store_true", help="no PNG")
    add_runtime_flags(p)
    add_config_flags(p, SamplingEvalConfig, skip=SKIPPED_FIELDS, overrides={
        "finetune_epochs": {"type": _epochs, "metavar": "E1,E2,...", "shown": ",".join(map(str, SamplingEvalConfig.__dataclass_fields__["finetune_epochs"].default))},
        "bandwidth": {"type": _bandwidth},
    })  # fmt: skip
    p.set_defaults(func=run_sample)


def _config_from_args(args: argparse.Namespace) -> Any:
    from sane_hf.cli._config_flags import config_values
    from sane_hf.evaluation import SamplingEvalConfig

    return SamplingEvalConfig(**config_values(SamplingEvalConfig, args))


def _load_zoo_config(args: argparse.Namespace) -> Any:
    from sane_hf.zoo.dataset import load_zoo_config

    candidates = [args.zoo_config] if args.zoo_config is not None else [Path(args.zoo), Path(args.model)]
    for path in candidates:
        try:
            return load_zoo_config(path)
        except FileNotFoundError:
            continue
    raise SystemExit(
        f"sane-hf sample: no zoo_config.json in {', '.join(str(c) for c in candidates)}; pass --zoo-config"
    )


def _sample_out(args: argparse.Namespace) -> tuple[Path, bool, bool] | None:
    if not (Path(args.model) / "config.json").is_file():
        return None  # run_sample reports the missing model before any folder is made
    out = Path(args.out)
    own = (out / "metrics.json").is_file() or (out.is_dir() and any(out.glob("sample_*.safetensors")))
    return out, own, bool(getattr(args, "overwrite", False))


@writes_folder("sample", _sample_out)
def run_sample(args: argparse.Namespace) -> int:
    import torch

    from sane_hf.cli._common import apply_num_threads
    from sane_hf.evaluation import evaluate_sampling, run_sampling
    from sane_hf.jobs import refresh_model_card, write_plain_samples
    from sane_hf.modeling_sane import SaneModel
    from sane_hf.reports import format_diversity, format_sampling_report, prompt_line
    from sane_hf.tokenization_sane import WeightTokenizer
    from sane_hf.zoo.dataset import load_zoo

    start = time.perf_counter()
    apply_num_threads(args.num_threads)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(
            f"sane-hf sample: {model_dir} holds no config.json: pass the folder of a trained SANE model "
            "(written by sane-hf train or SaneModel.save_pretrained, with its weight_tokenizer.json)"
        )
    try:
        tokenizer = WeightTokenizer.from_pretrained(model_dir)
    except OSError as err:
        raise SystemExit(f"sane-hf sample: {err}") from err
    try:
        config = _config_from_args(args)
    except ValueError as err:
        raise SystemExit(f"sane-hf sample: {err}") from err
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = SaneModel.from_pretrained(model_dir).to(device).eval()
    try:
        zoo = load_zoo(args.zoo)
    except FileNotFoundError as err:
        raise SystemExit(f"sane-hf sample: {err}") from err
    zoo_config = _load_zoo_config(args)
    out = Path(args.out)  # created only once the samples exist: nothing is left behind on failure
    progress = not args.no_progress

    try:
        if args.evaluate:
            metrics = evaluate_sampling(model, tokenizer, zoo, zoo_config, config, out, progress=progress)
            if args.no_plots and (out / "accuracy_vs_epoch.png").exists():
                (out / "accuracy_vs_epoch.png").unlink()
            print(prompt_line(metrics["prompts"]))
            print(format_sampling_report(metrics))
        else:
            setup, samples = run_sampling(model, tokenizer, zoo, zoo_config, config, progress=progress)
            metrics = write_plain_samples(out, setup, samples, zoo_config, config, start)
            accs = [r["test_acc"] for r in metrics["samples"] if "test_acc" in r]
            prompt_accs = [a for a in metrics["prompts"]["test_acc"] if a == a]
            if accs:
                mean_prompts = f"{sum(prompt_accs) / len(prompt_accs):.3f}" if prompt_accs else "n/a"
                print(f"{len(accs)} samples, test accuracy (no fine-tuning) mean {sum(accs) / len(accs):.3f}, "
                      f"best {max(accs):.3f}; prompts mean {mean_prompts}")
            else:
                print(f"{len(samples)} samples (not evaluated: the zoo's task is unknown)")
            print(format_diversity(metrics))
        for note in metrics["prompts"].get("notes", []):
            print(f"note: {note}")
    except ValueError as err:
        raise SystemExit(f"sane-hf sample: {err}") from err
    print(f"wrote {len(list(out.glob('sample_*.safetensors')))} samples and metrics.json to {out}")
    if args.evaluate and refresh_model_card(model_dir, out, "sampling"):
        print(f"updated the model card {model_dir / 'README.md'} with these numbers and verdicts")
    return 0


