"""The ``sane-hf`` command line. Each subcommand lives in its own module of this package and
exposes ``HELP`` (its one line in ``sane-hf --help``) and ``register(subparsers)``; this module only
assembles them.

Flags come from the config dataclasses (``ZooConfig``, ``SaneTrainingConfig``, ``SamplingEvalConfig``,
``QuickstartConfig``) through one builder, :func:`sane_hf.cli._config_flags.add_config_flags`: each
field is a flag with its ``help``, spelled ``--field-name`` and ``--field_name``.

Starting is fast: the subcommand modules import nothing heavy at module level, only the subcommand
being run builds its flags, and the configs they come from import neither torch nor transformers,
so ``sane-hf --help`` and every ``sane-hf <command> --help`` import neither. The work itself imports
what it needs inside the command function."""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser", "SUBCOMMAND_MODULES", "silence_library_progress_bars", "restore_library_progress_bars"]

# order = order in `sane-hf --help`
SUBCOMMAND_MODULES = ("zoo", "train", "probe", "sample", "push", "quickstart")


def _chosen_command(argv: list[str]) -> str | None:
    """The subcommand ``argv`` runs: its first word that is not an option (the top level has only options)."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``sane-hf`` parser; given ``argv``, only the subcommand it names gets its flags (the others: name and help)."""
    from sane_hf import __version__

    parser = argparse.ArgumentParser(
        prog="sane-hf",
        description="SANE weight-space learning: build model zoos, train SANE, probe and sample weights.",
    )
    parser.add_argument("--version", action="version", version=f"sane-hf {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen_command(argv) if argv is not None else None
    for name in SUBCOMMAND_MODULES:
        module_name = f"sane_hf.cli.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:  # a subcommand not yet shipped in this build
            if err.name == module_name:
                continue
            raise
        if argv is None or name == chosen:
            module.register(subparsers)
        else:
            subparsers.add_parser(name, help=module.HELP)
    return parser


def silence_library_progress_bars() -> dict[str, bool]:
    """Turn off the progress bars of datasets ("Generating … split", "Map"), transformers ("Loading
    weights") and huggingface_hub (downloads): ``--no-progress`` means none at all. Returns which were
    on, for :func:`restore_library_progress_bars`."""
    import datasets
    import huggingface_hub.utils
    import transformers.utils.logging

    state = {
        "datasets": datasets.is_progress_bar_enabled(),
        "transformers": transformers.utils.logging.is_progress_bar_enabled(),
        "huggingface_hub": not huggingface_hub.utils.are_progress_bars_disabled(),
    }
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    return state


def restore_library_progress_bars(state: dict[str, bool]) -> None:
    """Switch back on the bars that :func:`silence_library_progress_bars` found on."""
    import datasets
    import huggingface_hub.utils
    import transformers.utils.logging

    if state.get("datasets"):
        datasets.enable_progress_bars()
    if state.get("transformers"):
        transformers.utils.logging.enable_progress_bar()
    if state.get("huggingface_hub"):
        huggingface_hub.utils.enable_progress_bars()


def _known_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or a bad environment (shown as one line), not a bug in sane-hf."""
    from filelock import Timeout
    from huggingface_hub.errors import StrictDataclassError

    from sane_hf.serialization import FolderLockedError

    known: list[type[BaseException]] = [ValueError, OSError, FolderLockedError, Timeout, StrictDataclassError]
    try:
        from safetensors import SafetensorError

        known.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError

        known += [DatasetGenerationError, DatasetNotFoundError]
    except ImportError:  # pragma: no cover
        pass
    try:
        import pyarrow as pa

        known.append(pa.ArrowException)
    except ImportError:  # pragma: no cover
        pass
    return tuple(known)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return text


def main(argv: list[str] | None = None) -> int:
    """Run ``sane-hf``. Bad input gives one line ``sane-hf <command>: error: ...`` on stderr and exit code 2
    (Ctrl-C: exit code 130); set ``SANE_HF_TRACEBACK=1`` to see the full traceback instead."""
    import os

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    command = " ".join(p for p in ("sane-hf", getattr(args, "command", None), getattr(args, "zoo_command", None)) if p)
    quiet = bool(getattr(args, "no_progress", False)) or getattr(args, "progress", True) is False
    state = silence_library_progress_bars() if quiet else {}
    try:
        if os.environ.get("SANE_HF_TRACEBACK"):
            return int(args.func(args) or 0)
        result = args.func(args)
    except KeyboardInterrupt:
        print(f"\n{command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except _known_errors() as err:
        print(f"{command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    finally:  # main() is also called in-process (tests, notebooks): leave the libraries as found
        restore_library_progress_bars(state)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
