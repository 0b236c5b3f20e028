"""Flags every ``sane-hf`` command shares, spelled the same everywhere.

- ``--num-threads N`` (also ``--num_threads``): torch CPU threads; default: torch's own choice,
  which follows ``OMP_NUM_THREADS``. On a machine whose cores are busy with other work, one thread
  is usually fastest for sane-hf's small models (measured: two threads on two shared cores ran a
  SANE training step 5-20x slower than one).
- ``--no-progress`` (also ``--no_progress``): no progress bars.
"""

from __future__ import annotations

import argparse
import os

__all__ = ["THREADS_HELP", "add_runtime_flags", "apply_num_threads", "positive_int", "HelpFormatter"]

THREADS_HELP = (
    "torch CPU threads (default: torch's own choice, which follows OMP_NUM_THREADS; on a busy shared machine "
    "1 is usually fastest)"
)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_runtime_flags(parser: argparse.ArgumentParser, *, threads: bool = True, progress: bool = True) -> None:
    """Add ``--num-threads`` and ``--no-progress`` (with their underscore spellings) to ``parser``."""
    if threads:
        parser.add_argument("--num-threads", "--num_threads", dest="num_threads", type=positive_int, default=None,
                            metavar="N", help=THREADS_HELP)
    if progress:
        parser.add_argument("--no-progress", "--no_progress", dest="no_progress", action="store_true",
                            help="no progress bars")


def apply_num_threads(num_threads: int | None) -> int:
    """``torch.set_num_threads(num_threads)`` when given; returns the number of threads torch now uses."""
    import torch

    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    return torch.get_num_threads()


def env_threads() -> int | None:
    """``OMP_NUM_THREADS`` as an int when it is set to one, else None."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except for ``--no-*`` switches (whose "default" is the positive flag's)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if any(opt.startswith(("--no_", "--no-")) for opt in action.option_strings):
            return action.help
        if action.help and "(default" in action.help:  # already says it
            return action.help
        return super()._get_help_string(action)
