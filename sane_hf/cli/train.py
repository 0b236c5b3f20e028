"""``sane-hf train``: train SANE on a zoo with Accelerate.

::

    sane-hf train --zoo zoos/digits-cnn --out runs/sane-digits [--config small|defaults|large] [--resume]
                  [--max-steps N] [--batch-size N] [--learning-rate LR] ...

Every :class:`~sane_hf.training.SaneTrainingConfig` field is a flag, with its ``help`` text and default
(built by :func:`sane_hf.cli._config_flags.add_config_flags`; ``--max-steps`` and ``--max_steps`` both
work). ``--zoo`` takes a raw zoo folder (``sane-hf zoo build``/``import``) or a tokenized one
(``DatasetDict.save_to_disk``) with its tokenizer (``--tokenizer``, or ``weight_tokenizer.json`` inside
the folder). Several processes:
``accelerate launch --multi_gpu --num_processes N -m sane_hf.cli train ...`` (add ``--cpu`` for
CPU processes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["register", "run_train", "format_summary"]


#: the one-line help of this subcommand in `sane-hf --help` (read without building its flags)
HELP = "train SANE on a model zoo (Accelerate: CPU, GPU, multi-process)"


def register(subparsers: argparse._SubParsersAction) -> None:
    from sane_hf.cli._common import HelpFormatter, positive_int
    from sane_hf.cli._config_flags import add_config_flags
    from sane_hf.training.config import DEFAULT_PRESET, PRESETS, SaneTrainingConfig

    train = subparsers.add_parser(
        "train",
        help=HELP,
        description=(
            "Train a SANE autoencoder on a zoo and write the model, its tokenizer and metrics.json to --out. "
            "Checkpoints go to --out/checkpoints; --resume continues the newest one exactly. "
            "Multi-process: accelerate launch --multi_gpu --num_processes N -m sane_hf.cli train ..."
        ),
        formatter_class=HelpFormatter,
    )
    add_config_flags(train, SaneTrainingConfig)
    group = train.add_argument_group("zoo and model")
    group.add_argument("--zoo", required=True, type=Path,
                       help="zoo folder: raw (sane-hf zoo build/import) or tokenized (save_to_disk) with its tokenizer")
    group.add_argument("--out", dest="output_dir", default=argparse.SUPPRESS,
                       help="output folder (same as --output_dir)")
    group.add_argument("--config", dest="preset", choices=sorted(PRESETS), default=None,
                       help=f"SaneConfig preset (default: {DEFAULT_PRESET}, the recipe of the quickstart and of "
                            "benchmarks/learning_curves.py): small = fast CPU model, defaults = SaneConfig defaults "
                            "(wider and deeper), large = bigger, for GPUs. With --resume the run's own config is used")
    group.add_argument("--overwrite", dest="overwrite_output_dir", action="store_true", default=argparse.SUPPRESS,
                       help="same as --overwrite_output_dir: delete the run in --out (or write into a folder "
                            "sane-hf did not make) and start over")
    group.add_argument("--model-config", type=Path, default=None,
                       help="a SaneConfig config.json to use instead of a preset (token_size must match the zoo)")
    group.add_argument("--tokenizer", type=Path, default=None,
                       help="weight_tokenizer.json (or its folder) of a tokenized zoo, or one to use for a raw zoo")
    group.add_argument("--token-size", type=positive_int, default=64,
                       help="token size of the tokenizer built for a raw zoo (ignored when a tokenizer is given)")
    group.add_argument("--window-size", type=positive_int, default=None,
                       help="override the preset's window_size (tokens per training window)")
    group.add_argument("--halo-size", type=int, default=None, help="override the preset's halo_size")
    train.set_defaults(func=run_train)


def _token_size(args: argparse.Namespace) -> tuple[int, Any, Any]:
    """The token size the model must use, the tokenizer to hand to ``train_sane``, and the tokenizer read.

    The tokenizer is read once: the one of ``--tokenizer`` goes to ``train_sane``; the one in the zoo
    folder only tells the window fit its length (``train_sane`` takes it from the folder for a tokenized zoo).
    """
    from sane_hf.tokenization_sane import TOKENIZER_FILE, WeightTokenizer

    if args.tokenizer is not None:
        tok = WeightTokenizer.from_pretrained(args.tokenizer)
        return tok.token_size, tok, tok
    if (args.zoo / TOKENIZER_FILE).is_file():
        tok = WeightTokenizer.from_pretrained(args.zoo)
        return tok.token_size, None, tok  # train_sane picks it up from the folder
    return args.token_size, None, None


def _model_config(args: argparse.Namespace, token_size: int, training: Any, known: Any = None):
    from sane_hf.configuration_sane import SaneConfig
    from sane_hf.training import latest_checkpoint

    overrides = {k: v for k, v in (("window_size", args.window_size), ("halo_size", args.halo_size)) if v is not None}
    checkpoint = latest_checkpoint(training.output_dir) if training.resume else None
    explicit = [flag for flag, value in (("--config", args.preset), ("--model-config", args.model_config),
                                         ("--window-size", args.window_size), ("--halo-size", args.halo_size))
                if value is not None]  # fmt: skip
    if checkpoint is not None and (checkpoint / "sane_config.json").is_file():
        saved = SaneConfig.from_json_file(str(checkpoint / "sane_config.json"))
        if explicit:  # the flags must describe the run's own model, or they would be silently ignored
            wanted = _model_config_from_flags(args, token_size, overrides, known)
            ignore = ("transformers_version", "_name_or_path", "architectures", "auto_map")
            a, b = saved.to_dict(), wanted.to_dict()
            diff = sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))
            if diff:
                raise ValueError(
                    f"--resume continues the run's own model ({checkpoint / 'sane_config.json'}) but "
                    f"{', '.join(explicit)} ask for another one (differs in {diff}); drop "
                    f"{'them' if len(explicit) > 1 else 'it'} to resume, or start a new run in another --out"
                )
        print(f"sane-hf train: resuming {checkpoint} with the run's model config ({checkpoint / 'sane_config.json'})")
        config = saved
    else:
        config = _model_config_from_flags(args, token_size, overrides, known)
    if config.token_size != token_size:
        raise ValueError(f"the model config has token_size {config.token_size} but the zoo's tokens have {token_size}")
    return config


def _model_config_from_flags(
    args: argparse.Namespace, token_size: int, overrides: dict[str, Any], known: Any = None
):
    from sane_hf.configuration_sane import SaneConfig
    from sane_hf.training import DEFAULT_PRESET, sane_config_preset

    if args.model_config is not None:
        from huggingface_hub.errors import StrictDataclassError

        if not Path(args.model_config).is_file():
            raise FileNotFoundError(f"--model-config {args.model_config} is not a file (give a SaneConfig config.json)")
        try:
            config = SaneConfig.from_json_file(str(args.model_config))
        except (ValueError, StrictDataclassError) as err:  # bad JSON, or a value of the wrong type
            raise ValueError(f"--model-config {args.model_config}: {' '.join(str(err).split())}") from None
        for key, value in overrides.items():
            setattr(config, key, value)
    else:
        preset = args.preset or DEFAULT_PRESET
        config = sane_config_preset(preset, token_size, **overrides)
        num_tokens = _zoo_num_tokens(args, token_size, known) if args.window_size is None else None
        if num_tokens is not None and config.window_size > num_tokens:
            # only a preset's window shrinks (an explicit --window-size that is too long stays an error)
            print(
                f"sane-hf train: the zoo's models are {num_tokens} tokens long, shorter than the {preset!r} preset's "
                f"window ({config.window_size}); training on whole-model windows (window_size={num_tokens}, "
                "halo_size=0). Pass --window-size to choose another."
            )
            whole = {k: v for k, v in overrides.items() if k != "halo_size"}  # a whole-model window needs no halo
            config = sane_config_preset(preset, token_size, num_tokens=num_tokens, **whole)
    return config


def _zoo_num_tokens(args: argparse.Namespace, token_size: int, known: Any = None) -> int | None:
    """Tokens per checkpoint of the zoo at ``token_size`` (None when it cannot be told cheaply).

    ``known``: the tokenizer already read (``--tokenizer`` or the zoo folder's), else one is built
    from the zoo's first checkpoint.
    """
    from sane_hf.tokenization_sane import WeightTokenizer

    if known is not None:
        return known.num_tokens
    try:
        from sane_hf.state_dict_io import state_dict_from_bytes
        from sane_hf.zoo.dataset import load_zoo

        row = load_zoo(args.zoo)["train"][0]
        return WeightTokenizer.from_reference(state_dict_from_bytes(row["weights"]), token_size=token_size).num_tokens
    except Exception:  # noqa: BLE001 - train_sane validates the zoo and reports what is wrong
        return None


def format_summary(output_dir: Path) -> str:
    """A few lines from ``output_dir/metrics.json``."""
    from sane_hf.training import METRICS_FILE, latest_checkpoint

    m = json.loads((Path(output_dir) / METRICS_FILE).read_text())

    def f(x: Any, spec: str = ".4f") -> str:
        return "n/a" if x is None else format(x, spec)

    lines = [
        f"SANE trained: {m['steps']} steps ({f(m['epochs'], '.2f')} epochs) in {f(m['train_seconds'], '.1f')} s "
        f"({f(m['tokens_per_second'], ',.0f')} tokens/s, {m['num_processes']} process(es))",
        f"  final train loss {f(m['train_loss'])} | val loss {f(m['val_loss'])} "
        f"(at start {f(m.get('initial_val_loss'))}) | val reconstruction R² {f(m['val_reconstruction_r2'], '.3f')}",
        f"  model + tokenizer: {output_dir}  (SaneModel.from_pretrained / WeightTokenizer.from_pretrained)",
    ]
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is not None:
        lines.append(f"  resumable checkpoint: {checkpoint}")
    lines.append(f"  metrics: {Path(output_dir) / METRICS_FILE}")
    return "\n".join(lines)


def run_train(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from sane_hf.cli._config_flags import config_values
    from sane_hf.training import SaneTrainingConfig, train_sane

    try:
        training = SaneTrainingConfig(**config_values(SaneTrainingConfig, args))
        token_size, tokenizer, known = _token_size(args)
        config = _model_config(args, token_size, training, known)
        out = train_sane(config, args.zoo, training, tokenizer=tokenizer)
    except (ValueError, FileNotFoundError, OSError) as err:
        raise SystemExit(f"sane-hf train: {err}") from err
    if PartialState().is_main_process:
        print(format_summary(out))
    return 0
