"""Flags from config dataclasses: the one builder behind every ``sane-hf`` subcommand's options.

Each field of a config (:class:`~sane_hf.zoo.ZooConfig`, :class:`~sane_hf.training.SaneTrainingConfig`,
:class:`~sane_hf.evaluation.SamplingEvalConfig`, :class:`~sane_hf.quickstart.QuickstartConfig`) becomes
a flag spelled ``--field-name`` and ``--field_name``, with the field's ``metadata["help"]`` and its
default, typed from the annotation the way ``transformers.HfArgumentParser`` types it:

- ``bool``: ``--x`` alone means yes, ``--x yes|no`` (also true/false, on/off, 1/0) sets it; a field that
  is on by default also gets ``--no-x`` / ``--no_x``;
- ``int``, ``float``, ``str``, and ``X | None`` as ``X``;
- ``Literal[...]``: one of its values;
- ``list[X]``, ``tuple[X, ...]``: one or more values; ``tuple[X, X, X]``: exactly three;
- ``dict``: a JSON object.

A flag that is not given stays out of the parsed namespace (``argparse.SUPPRESS``), so
:func:`config_values` returns only what the user typed and the config fills in its own defaults:
parsing ``--a 1`` and calling ``Config(a=1)`` give equal configs. Nothing here imports torch or
transformers, and no ``default_factory`` runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
from collections.abc import Collection, Mapping
from typing import Any, Literal, Union, get_args, get_origin

__all__ = ["add_config_flags", "config_values", "to_bool", "json_object"]

_TRUE = ("yes", "true", "t", "y", "1", "on")
_FALSE = ("no", "false", "f", "n", "0", "off")


def to_bool(text: str | bool) -> bool:
    """``yes``/``no`` (also true/false, t/f, y/n, 1/0, on/off; any case) as a bool."""
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {text!r}")


def json_object(text: str) -> dict[str, Any]:
    """A JSON object given on the command line."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"width\": 16}'")
    return value


def _choice(choices: tuple[Any, ...]):
    by_text = {str(c): c for c in choices}
    return lambda text: by_text.get(text, text)


def _field_type(cls: type, field: dataclasses.Field) -> Any:
    """The field's annotation as a type (``from __future__ import annotations`` leaves a string)."""
    if not isinstance(field.type, str):
        return field.type
    return eval(field.type, vars(sys.modules[cls.__module__]))  # noqa: S307 - the class's own annotation


def _kwargs_for(tp: Any, where: str) -> dict[str, Any]:
    """``add_argument`` keyword arguments for a value of annotation ``tp``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union or origin is types.UnionType:
        kept = [a for a in args if a is not type(None)]
        if len(kept) != 1:
            raise TypeError(f"{where}: a flag takes one type, not {tp}; give it a 'type' override")
        return _kwargs_for(kept[0], where)
    if tp is bool:
        return {"type": to_bool, "nargs": "?", "const": True, "metavar": "{yes,no}"}
    if origin is Literal:
        return {"type": _choice(args), "choices": args}
    if tp in (list, tuple) or origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return {"type": args[0], "nargs": len(args)}
        return {"type": args[0] if args else str, "nargs": "+"}
    if tp is dict or origin is dict:
        return {"type": json_object, "metavar": "JSON"}
    return {"type": tp}


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def add_config_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    only: Collection[str] | None = None,
    skip: Collection[str] = (),
    names: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[str]:
    """Add a flag for each field of the dataclass ``cls`` to ``parser``; returns the fields added.

    ``only``/``skip`` choose fields (default: all, in field order); ``names`` renames a field's flag
    (``{"fast_mode": "fast"}`` gives ``--fast``; the value still lands in ``fast_mode``); ``overrides``
    replaces ``add_argument`` keyword arguments of a field (e.g. a ``type`` that reads ``0,1,5``), with
    ``"shown"``: how its default reads in the help.
    """
    names, overrides = dict(names or {}), dict(overrides or {})
    added = []
    for field in dataclasses.fields(cls):
        if (only is not None and field.name not in only) or field.name in skip:
            continue
        extra = dict(overrides.get(field.name, {}))
        shown = extra.pop("shown", None)
        tp = _field_type(cls, field)
        kwargs = {**(_kwargs_for(tp, f"{cls.__name__}.{field.name}") if "type" not in extra else {}), **extra}
        text = kwargs.pop("help", field.metadata.get("help", ""))
        if shown is None and field.default is not dataclasses.MISSING and field.default not in (None, ""):
            shown = _shown(field.default)
        if shown is not None and "(default" not in text:
            text = f"{text} (default: {shown})"
        flag = names.get(field.name, field.name)
        spellings = [f"--{flag.replace('_', '-')}"] + ([f"--{flag}"] if "_" in flag else [])
        parser.add_argument(*spellings, dest=field.name, default=argparse.SUPPRESS,
                            help=text.replace("%", "%%"), **kwargs)  # fmt: skip
        if tp is bool and field.default is True:  # after the positive flag: same dest, switched off
            positive = spellings[0]
            negative = [f"--no-{flag.replace('_', '-')}", f"--no_{flag}"]
            parser.add_argument(*negative, dest=field.name, action="store_false", default=argparse.SUPPRESS,
                                help=f"turn {positive} off (it is on by default). {positive}: "
                                     + field.metadata.get("help", "").replace("%", "%%"))  # fmt: skip
        added.append(field.name)
    return added


def config_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line, by name (the rest keep the config's defaults)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
