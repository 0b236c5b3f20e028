"""The ``sane-hf`` command line. Each subcommand lives in its own module of this package and
exposes ``register(subparsers)``; this module only assembles them."""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser", "SUBCOMMAND_MODULES"]

# order = order in `sane-hf --help`
SUBCOMMAND_MODULES = ("zoo", "train", "probe", "sample", "push", "quickstart")


def build_parser() -> argparse.ArgumentParser:
    from sane_hf import __version__

    parser = argparse.ArgumentParser(
        prog="sane-hf",
        description="SANE weight-space learning: build model zoos, train SANE, probe and sample weights.",
    )
    parser.add_argument("--version", action="version", version=f"sane-hf {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        module_name = f"sane_hf.cli.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:  # a subcommand not yet shipped in this build
            if err.name == module_name:
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
