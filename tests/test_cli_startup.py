"""``sane-hf`` starts fast: help imports neither torch nor transformers, and only the chosen
subcommand builds its flags (fresh processes: what a user's shell sees)."""

from __future__ import annotations

import json

import pytest
from helpers import run_python

from sane_hf.cli import SUBCOMMAND_MODULES, build_parser, main

_RUN = """
import json, sys
from sane_hf.cli import main

try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""

HELP_ARGVS = [[], ["--help"], ["--version"], *([name, "--help"] for name in SUBCOMMAND_MODULES),
              ["zoo", "build", "--help"], ["zoo", "import", "--help"]]


@pytest.mark.parametrize("argv", HELP_ARGVS, ids=lambda argv: " ".join(argv) or "no-args")
def test_help_imports_neither_torch_nor_transformers(argv, tmp_path):
    """Every subcommand builds its flags from configs that import neither (heavy imports happen in the command)."""
    result = json.loads(run_python(_RUN, *argv, cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}


def test_top_level_help_lists_every_subcommand_with_its_line(capsys):
    import importlib

    with pytest.raises(SystemExit):
        main(["--help"])
    printed = " ".join(capsys.readouterr().out.split())
    for name in SUBCOMMAND_MODULES:
        assert f"{name} {importlib.import_module(f'sane_hf.cli.{name}').HELP}" in printed


def test_only_the_chosen_subcommand_gets_its_flags():
    parser = build_parser(["push", "--model", "x"])
    args = parser.parse_args(["push", "--model", "x", "--repo-id", "me/x", "--dry-run"])
    assert args.command == "push" and args.func.__name__ == "run_push"
    with pytest.raises(SystemExit):  # push's flags are not the stub of another subcommand
        parser.parse_args(["probe", "--model", "x"])
    full = build_parser()  # no argv: every subcommand with its flags (documentation, tests)
    assert full.parse_args(["probe", "--model", "m", "--zoo", "z"]).command == "probe"
