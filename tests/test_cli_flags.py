"""Every subcommand's flags come from its config dataclass through one builder
(``sane_hf.cli._config_flags``): each field is a flag with its help, parsed flags give the config
that constructing it directly gives, and the flags train had under ``HfArgumentParser`` parse the same."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal, get_args

import pytest

from sane_hf.cli import build_parser
from sane_hf.cli._config_flags import add_config_flags, config_values
from sane_hf.evaluation.config import SamplingEvalConfig
from sane_hf.quickstart.config import QuickstartConfig
from sane_hf.training.config import SaneTrainingConfig
from sane_hf.zoo.config import ZooConfig


@dataclass
class _Example:
    name: str = field(default="a", metadata={"help": "A name."})
    count: int = field(default=3, metadata={"help": "How many."})
    rate: float | None = field(default=None, metadata={"help": "A rate; None = none."})
    kind: Literal["x", "y"] = field(default="x", metadata={"help": "Which kind."})
    on: bool = field(default=True, metadata={"help": "Switched on (100% by default)."})
    off: bool = field(default=False, metadata={"help": "Switched off."})
    epochs: list[int] | None = field(default=None, metadata={"help": "Some epochs."})
    fractions: tuple[float, float, float] = field(default=(0.5, 0.25, 0.25), metadata={"help": "Three numbers."})
    options: dict = field(default_factory=dict, metadata={"help": "A JSON object."})
    max_items: int | None = field(default=None, metadata={"help": "At most this many."})

    def __post_init__(self) -> None:
        self.fractions = tuple(self.fractions)


def _parse(argv: list[str], **kwargs) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, _Example, **kwargs)
    return parser.parse_args(argv)


@pytest.mark.parametrize(("argv", "expected"), [
    ([], {}),
    (["--name", "b", "--count", "7", "--rate", "0.5", "--kind", "y"], dict(name="b", count=7, rate=0.5, kind="y")),
    (["--no-on", "--off"], dict(on=False, off=True)),
    (["--no_on", "--off", "no"], dict(on=False, off=False)),
    (["--on", "yes", "--off", "on"], dict(on=True, off=True)),
    (["--epochs", "0", "1", "5", "--fractions", "0.6", "0.2", "0.2"], dict(epochs=[0, 1, 5], fractions=(0.6, 0.2, 0.2))),
    (["--options", '{"width": 16}'], dict(options={"width": 16})),
])  # fmt: skip
def test_parsed_flags_give_the_config_built_directly(argv, expected):
    given = config_values(_Example, _parse(argv))
    assert dataclasses.replace(_Example(), **given) == _Example(**expected)
    assert set(given) == set(expected)  # a flag not given is not a value: the config's default applies


def test_flags_take_both_spellings_names_and_overrides():
    assert config_values(_Example, _parse(["--max-items", "2"])) == config_values(_Example, _parse(["--max_items", "2"]))
    args = _parse(["--count", "2"], only=("count", "on"), names={"on": "enabled"},
                  overrides={"count": {"type": lambda s: int(s) * 10}})  # fmt: skip
    assert config_values(_Example, args) == {"count": 20}
    assert config_values(_Example, _parse(["--no-enabled"], only=("on",), names={"on": "enabled"})) == {"on": False}
    with pytest.raises(SystemExit):  # a field left out has no flag
        _parse(["--name", "b"], skip=("name",))
    with pytest.raises(SystemExit):  # a Literal takes its values only
        _parse(["--kind", "z"])
    with pytest.raises(SystemExit):
        _parse(["--options", "[1]"])


def test_help_shows_each_field_with_its_help_and_default(capsys):
    with pytest.raises(SystemExit):
        _parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(_Example):
        assert f"--{f.name.replace('_', '-')}" in text and f.metadata["help"] in text
    assert "--count COUNT How many. (default: 3)" in text
    assert "--fractions FRACTIONS FRACTIONS FRACTIONS Three numbers. (default: 0.5 0.25 0.25)" in text
    assert "--no-on, --no_on turn --on off (it is on by default). --on: Switched on (100% by default)." in text
    assert "--on [{yes,no}] Switched on (100% by default). (default: yes)" in text


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        build_parser(argv).parse_args(argv)
    return capsys.readouterr().out


@pytest.mark.parametrize(("argv", "cls", "skipped"), [
    (["sample", "--help"], SamplingEvalConfig, ("window", "halo")),
    (["train", "--help"], SaneTrainingConfig, ()),
    (["zoo", "build", "--help"], ZooConfig,
     ("in_channels", "num_classes", "source", "import_options", "arch_entrypoint", "task_entrypoint")),
])  # fmt: skip
def test_every_config_field_is_a_flag_but_the_documented_skips(argv, cls, skipped, capsys, monkeypatch):
    """A field added to a config shows up as a flag (with its help) unless the command lists it as skipped."""
    from sane_hf.cli import sample, zoo

    monkeypatch.setenv("COLUMNS", "100000")  # no line wrapping: each help text stands whole

    assert skipped == {"sample": sample.SKIPPED_FIELDS, "zoo": zoo.NOT_BUILD_FLAGS}.get(argv[0], ())
    text = " ".join(_help(argv, capsys).split())
    for f in dataclasses.fields(cls):
        flag = f"--{f.name.replace('_', '-')} "
        if f.name in skipped:
            assert flag not in text, f.name
        else:
            assert flag in text and " ".join(f.metadata["help"].split()) in text, f.name


def test_sample_flags_give_the_config_built_directly():
    argv = ["sample", "--model", "m", "--zoo", "z", "--out", "o", "--num-samples", "4", "--num_prompts", "0",
            "--mode", "token", "--bandwidth", "0.3", "--score", "none", "--finetune-epochs", "0,1", "--no-residual",
            "--spread-anchors", "no", "--transfer-task", "none", "--max-neighbours", "6", "--seed", "3"]
    from sane_hf.cli.sample import _config_from_args

    assert _config_from_args(build_parser(argv).parse_args(argv)) == SamplingEvalConfig(
        num_samples=4, num_prompts=None, mode="token", bandwidth=0.3, score="none", finetune_epochs=(0, 1),
        residual=False, spread_anchors=False, transfer_task=None, max_neighbours=6, seed=3,
    )  # fmt: skip
    plain = ["sample", "--model", "m", "--zoo", "z", "--out", "o"]
    assert _config_from_args(build_parser(plain).parse_args(plain)) == SamplingEvalConfig()


@pytest.mark.parametrize("flags", [
    [],
    ["--max-steps", "7", "--no_permutation", "--mixed_precision", "bf16"],
    ["--learning_rate", "3e-4", "--lr-scheduler", "cosine", "--resume", "--eval-on-start", "false", "--cpu", "1"],
    ["--output_dir", "runs/x", "--eval-split", "none", "--save-total-limit", "3", "--no-progress", "--progress"],
    ["--tracker", "tensorboard", "--max_grad_norm", "0", "--num-threads", "1", "--permutation", "no"],
])  # fmt: skip
def test_train_flags_parse_as_hf_argument_parser_did(flags):
    """The same flags give the same SaneTrainingConfig as ``transformers.HfArgumentParser`` (train's former parser)."""
    from transformers import HfArgumentParser

    argv = ["train", "--zoo", "z", *flags]
    ours = SaneTrainingConfig(**config_values(SaneTrainingConfig, build_parser(argv).parse_args(argv)))
    (theirs,) = HfArgumentParser(SaneTrainingConfig).parse_args_into_dataclasses(flags)
    assert ours == theirs


def test_zoo_build_flags_give_the_config_built_directly():
    argv = ["zoo", "build", "--out", "o", "--num-models", "8", "--checkpoint_epochs", "0", "2", "--align",
            "--grid", '{"optimizers": ["adam"]}', "--split-fractions", "0.5", "0.25", "0.25", "--arch-kwargs", "{}"]
    given = config_values(ZooConfig, build_parser(argv).parse_args(argv))
    assert ZooConfig.from_dict(given) == ZooConfig(
        num_models=8, checkpoint_epochs=[0, 2], align=True, grid={"optimizers": ["adam"]},
        split_fractions=(0.5, 0.25, 0.25),
    )  # fmt: skip


def test_quickstart_flags_come_from_its_config():
    argv = ["quickstart", "--fast", "--num_threads", "2"]
    assert config_values(QuickstartConfig, build_parser(argv).parse_args(argv)) == {"fast_mode": True, "num_threads": 2}
    assert config_values(QuickstartConfig, build_parser(["quickstart"]).parse_args(["quickstart"])) == {}
    with pytest.raises(SystemExit):
        build_parser(argv).parse_args(["quickstart", "--num-threads", "0"])


def test_choices_spelled_without_torch_equal_the_librarys():
    from sane_hf.cli import probe
    from sane_hf.embedding import DEFAULT_POOLING, POOLINGS
    from sane_hf.evaluation.config import SamplingMode
    from sane_hf.probing import DEFAULT_TARGETS, METHODS
    from sane_hf.sampling import SAMPLING_MODES

    assert get_args(SamplingMode) == SAMPLING_MODES
    assert (probe.DEFAULT_TARGETS, probe.METHODS, probe.POOLINGS, probe.DEFAULT_POOLING) == (
        DEFAULT_TARGETS, METHODS, POOLINGS, DEFAULT_POOLING,
    )  # fmt: skip
