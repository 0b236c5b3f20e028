"""``sane-hf quickstart``: the main job on embedded defaults, in minutes on a laptop CPU.

::

    sane-hf quickstart [--out sane-quickstart] [--seed 0] [--fast] [--overwrite] [--no-progress]

Builds a digits zoo of ``cnn-s`` models, trains a small SANE on it, probes the embeddings against
the layer-statistics and raw-weights baselines, samples new models and evaluates them against random
init, noise and averaging baselines, then writes ``report.md`` and ``quickstart_metrics.json``
(see :mod:`sane_hf.quickstart` for the folder layout and :class:`~sane_hf.quickstart.QuickstartConfig`
for the settings). Rerunning with the same ``--out`` reuses finished stages.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run_quickstart_command"]


#: the one-line help of this subcommand in `sane-hf --help` (read without building its flags)
HELP = "the main job on embedded defaults: build zoo -> train -> probe -> sample -> report"


def register(subparsers: argparse._SubParsersAction) -> None:
    from sane_hf.cli._common import positive_int
    from sane_hf.cli._config_flags import add_config_flags
    from sane_hf.quickstart.config import QuickstartConfig

    p = subparsers.add_parser(
        "quickstart",
        help=HELP,
        description=(
            "Build a digits zoo of cnn-s models, train a small SANE, probe its embeddings against baselines, "
            "sample new models and evaluate them, and write report.md (with a verdict in words), all in one output "
            "folder. The full run takes minutes on a laptop CPU (README, Performance, has the measured time); --fast "
            "is a smoke version with tiny settings. Rerunning with the same "
            "--out reuses finished stages (an interrupted zoo build or training resumes)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("sane-quickstart"), help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the zoo grid and split, SANE training and sampling")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute the probe and sampling stages even when their metrics exist")
    add_config_flags(p, QuickstartConfig, only=("num_threads", "fast_mode"), names={"fast_mode": "fast"}, overrides={
        "num_threads": {"type": positive_int, "metavar": "N",
                        "help": "torch CPU threads of training, probing and sampling (default: OMP_NUM_THREADS when set, "
                                "else 1, the fastest measured on a busy 2-core machine)"},
    })  # fmt: skip
    p.add_argument("--no-progress", "--no_progress", dest="no_progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_quickstart_command)


def run_quickstart_command(args: argparse.Namespace) -> int:
    import dataclasses

    from sane_hf.cli._common import env_threads
    from sane_hf.cli._config_flags import config_values
    from sane_hf.quickstart import QuickstartConfig, run_quickstart

    given = config_values(QuickstartConfig, args)
    config = (QuickstartConfig.fast() if given.pop("fast_mode", False) else QuickstartConfig()).with_seed(args.seed)
    if "num_threads" not in given and env_threads() is not None:  # the command's default: OMP_NUM_THREADS
        given["num_threads"] = env_threads()
    config = dataclasses.replace(config, **given)
    try:
        run_quickstart(config, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    except ValueError as err:
        raise SystemExit(f"sane-hf quickstart: {err}") from err
    return 0
