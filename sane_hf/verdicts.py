"""Words for numbers: human-readable names and one verdict sentence per claim.

Every output a person reads (``report.md``, the summaries of ``sane-hf probe`` and ``sane-hf sample``,
the model card, plot labels) names methods, sampling groups and properties through the tables here,
and states what the numbers mean through the verdict functions, so the wording is derived from the
numbers and the same everywhere. Pure functions over the metric dicts the jobs write
(``probe/metrics.json``, ``samples/metrics.json``); nothing here computes a metric or renders Markdown.

A comparison is worded from the numbers *as shown* (two decimals by default): when the two shown
values are equal the sentence says "as well as" / "level with", never "better" with equal numbers.

Example::

    >>> probe_verdicts({"test_acc": {"sane": 0.61, "layer_stats": 0.57}}, {"test_acc": "r2"})
    ['SANE predicts test accuracy better than layer statistics (R² 0.61 vs 0.57).']
    >>> gain_verdict({"0": 0.41, "1": -0.02})
    'SANE samples beat random init by +0.41 at epoch 0 and trail it by -0.02 after 1 fine-tuning epoch.'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "METHOD_NAMES",
    "GROUP_NAMES",
    "PROPERTY_NAMES",
    "METRIC_NAMES",
    "method_name",
    "group_name",
    "property_name",
    "metric_name",
    "probe_verdicts",
    "probe_verdict",
    "gain_verdict",
    "sampling_verdicts",
    "transfer_verdict",
    "degenerate_baselines",
    "degenerate_groups",
    "weak_prompts_warning",
    "sampling_warnings",
    "WEAK_PROMPT_MARGIN",
    "overall_verdict",
    "join_lines",
    "readable_note",
]

#: Feature sets of the property probes (keys of ``probe.metrics.<property>``).
METHOD_NAMES = {"sane": "SANE", "layer_stats": "layer statistics", "raw": "raw weights",
                "sane+stats": "SANE + layer statistics"}
#: Model groups of the sampling evaluation (keys of ``sampling.accuracy``).
GROUP_NAMES = {
    "sampled": "SANE samples",
    "random_init": "random init",
    "noise": "prompts + noise (matched distance)",
    "noise_matched_accuracy": "prompts + noise (matched accuracy)",
    "aligned_average": "aligned prompt average",
    "prompts": "prompt models",
    "sampled_source_score": "SANE samples ranked on the source task",
}
#: Zoo properties (columns) as a sentence names them.
PROPERTY_NAMES = {
    "test_acc": "test accuracy",
    "train_acc": "training accuracy",
    "val_acc": "validation accuracy",
    "test_loss": "test loss",
    "train_loss": "training loss",
    "ggap": "generalisation gap",
    "epoch": "training epoch",
    "activation": "activation function",
    "optimizer": "optimizer",
    "init": "initialisation",
    "lr": "learning rate",
    "weight_decay": "weight decay",
    "dropout": "dropout",
    "batch_size": "batch size",
    "seed": "seed",
}
METRIC_NAMES = {"r2": "R²", "accuracy": "accuracy"}


def method_name(key: str) -> str:
    """``"layer_stats"`` → ``"layer statistics"`` (unknown keys: underscores become spaces)."""
    return METHOD_NAMES.get(key, key.replace("_", " "))


def group_name(key: str) -> str:
    """``"noise_matched_accuracy"`` → ``"prompts + noise (matched accuracy)"``."""
    return GROUP_NAMES.get(key, key.replace("_", " "))


def property_name(key: str) -> str:
    """``"test_acc"`` → ``"test accuracy"``."""
    return PROPERTY_NAMES.get(key, key.replace("_", " "))


def metric_name(key: str) -> str:
    """``"r2"`` → ``"R²"``."""
    return METRIC_NAMES.get(key, key)


def _number(value: Any) -> float | None:
    if isinstance(value, Mapping):  # an evaluation summary {"mean", "std", "n"}
        value = value.get("mean")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _show(value: float, digits: int, sign: bool = False) -> str:
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _order(a: float, b: float, digits: int) -> int:
    """1 when ``a`` shows larger than ``b`` at ``digits`` decimals, -1 when smaller, 0 when they show equal."""
    sa, sb = float(_show(a, digits)), float(_show(b, digits))
    return (sa > sb) - (sa < sb)


def _epoch_phrase(epoch: Any) -> str:
    e = int(epoch)
    return "at epoch 0 (no fine-tuning)" if e == 0 else f"after {e} fine-tuning epoch{'s' if e != 1 else ''}"


def _short_epoch(epoch: Any) -> str:
    e = int(epoch)
    return "at epoch 0" if e == 0 else f"after {e} fine-tuning epoch{'s' if e != 1 else ''}"


# ----------------------------------------------------------------------------------------------
# property prediction
# ----------------------------------------------------------------------------------------------


def probe_verdict(prop: str, row: Mapping[str, Any], metric: str = "r2", *, digits: int = 2) -> str | None:
    """One sentence: how SANE predicts ``prop`` compared with layer statistics (and raw weights).

    ``row`` is ``{method: test metric}``; None when SANE or layer statistics was not measured.
    """
    sane, stats = _number(row.get("sane")), _number(row.get("layer_stats"))
    if sane is None or stats is None:
        return None
    word = {1: "better than", -1: "worse than", 0: "as well as"}[_order(sane, stats, digits)]
    shown = metric_name(metric)
    text = (f"SANE predicts {property_name(prop)} {word} {method_name('layer_stats')} "
            f"({shown} {_show(sane, digits)} vs {_show(stats, digits)}")
    raw = _number(row.get("raw"))
    if raw is not None:
        text += f"; {method_name('raw')} {_show(raw, digits)}"
    text += ")."
    both = _number(row.get("sane+stats"))
    if both is not None:
        what = {1: "SANE adds to them", 0: "SANE adds nothing to them",
                -1: "the blend falls below them (the SANE weight chosen on validation did not hold on test)"}
        text += (f" Blended with {method_name('layer_stats')} on validation, {what[_order(both, stats, digits)]} "
                 f"({shown} {_show(both, digits)} vs {_show(stats, digits)}).")
    return text


def probe_verdicts(
    metrics: Mapping[str, Mapping[str, Any]], metric_names: Mapping[str, str] | None = None, *, digits: int = 2
) -> list[str]:
    """One :func:`probe_verdict` per property of ``{property: {method: value}}`` that has both numbers."""
    names = metric_names or {}
    out = []
    for prop, row in (metrics or {}).items():
        if isinstance(row, Mapping):
            line = probe_verdict(prop, row, names.get(prop, "r2"), digits=digits)
            if line:
                out.append(line)
    return out


def _probe_tally(metrics: Mapping[str, Mapping[str, Any]], digits: int) -> tuple[int, int]:
    """(properties where SANE ≥ layer statistics as shown, properties compared)."""
    wins = total = 0
    for row in (metrics or {}).values():
        if not isinstance(row, Mapping):
            continue
        sane, stats = _number(row.get("sane")), _number(row.get("layer_stats"))
        if sane is None or stats is None:
            continue
        total += 1
        wins += _order(sane, stats, digits) >= 0
    return wins, total


# ----------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------


def gain_verdict(gain: Mapping[str, Any], *, subject: str = "SANE samples", digits: int = 2) -> str | None:
    """``"SANE samples beat random init by +0.41 at epoch 0 and ..."`` from ``{epoch: sampled − random}``."""
    parts = []
    for epoch in sorted(gain or {}, key=lambda e: int(e)):
        value = _number(gain[epoch])
        if value is None:
            continue
        sign = _order(value, 0.0, digits)
        where = _short_epoch(epoch)
        if sign > 0:
            parts.append(("beat", f"by {_show(value, digits, sign=True)} {where}"))
        elif sign < 0:
            parts.append(("trail", f"by {_show(value, digits, sign=True)} {where}"))
        else:
            parts.append(("match", where))
    if not parts:
        return None
    clauses: list[str] = []
    previous = None
    for verb, rest in parts:
        if verb == previous:
            clauses.append(rest)  # "..., by +0.10 after 1 fine-tuning epoch"
        else:
            clauses.append(f"{verb} {'it' if clauses else 'random init'} {rest}")
        previous = verb
    text = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]
    return f"{subject} {text}."


def _versus(sampled: Any, other: Any, other_key: str, epoch: str, digits: int) -> str | None:
    a, b = _number(sampled), _number(other)
    if a is None or b is None:
        return None
    word = {1: "above", -1: "below", 0: "level with"}[_order(a, b, digits)]
    return (f"SANE samples are {word} {group_name(other_key)} {_short_epoch(epoch)} "
            f"(test accuracy {_show(a, digits)} vs {_show(b, digits)}).")


#: A matched-accuracy noise norm this many times the prompts' own weight norm means random weights.
_HUGE_NOISE = 10.0


def degenerate_groups(sampling: Mapping[str, Any]) -> dict[str, str]:
    """``{group: why}`` for every sampling baseline that degenerated and must not be read as a comparison.

    ``prompts + noise (matched accuracy)`` adds the one noise norm at which the noisy prompts are as
    accurate as the samples. It degenerates two ways: when the samples are better than the prompts
    themselves, no noise can match and the baseline *is* the prompt models
    (``novelty.noise_matched_accuracy.matched`` false); when the samples are near chance, the matching
    noise dwarfs the weights (norm over ``10x`` the prompts' weight norm) and the baseline is random
    weights, whose distance to the zoo says nothing.
    """
    out: dict[str, str] = {}
    novelty = (sampling or {}).get("novelty") or {}
    matched = novelty.get("noise_matched_accuracy")
    if not isinstance(matched, Mapping):
        return out
    name = group_name("noise_matched_accuracy")
    norm = _number(matched.get("noise_norm"))
    prompts_norm = _number(((novelty.get("prompts") or {}).get("param_norm")) or None)
    if matched.get("matched") is False:
        out["noise_matched_accuracy"] = (
            f"{name} is degenerate: the samples are more accurate than the prompt models themselves, so no amount "
            "of noise matches their accuracy and this baseline is the prompt models unchanged (its numbers, "
            "distances included, are the prompts')."
        )
    elif norm is not None and prompts_norm and norm > _HUGE_NOISE * prompts_norm:
        out["noise_matched_accuracy"] = (
            f"{name} is degenerate: matching the samples' accuracy took noise of norm {norm:.3g}, "
            f"{norm / prompts_norm:.0f}x the prompts' own weight norm ({prompts_norm:.3g}), because the samples are "
            "near chance; this baseline is random weights and its distance to the zoo says nothing."
        )
    return out


def degenerate_baselines(sampling: Mapping[str, Any]) -> list[str]:
    """A warning sentence per degenerate baseline (:func:`degenerate_groups`)."""
    return list(degenerate_groups(sampling).values())


#: Prompts less than this far above random init at epoch 0 did not learn the task (the protocol's
#: "well above random init" margin).
WEAK_PROMPT_MARGIN = 0.10


def weak_prompts_warning(sampling: Mapping[str, Any], *, digits: int = 2) -> str | None:
    """A warning when the prompt models are within :data:`WEAK_PROMPT_MARGIN` of random init at epoch 0.

    Every group is drawn around (or is) the prompts, so when they never learned the task (e.g. an
    activation whose models stayed at chance) the comparisons are between untrained models.
    """
    accuracy = (sampling or {}).get("accuracy") or {}
    prompts = _number(((accuracy.get("prompts") or {}).get("0") or {}).get("mean"))
    random = _number(((accuracy.get("random_init") or {}).get("0") or {}).get("mean"))
    if prompts is None or random is None or prompts - random >= WEAK_PROMPT_MARGIN:
        return None
    activation = (sampling or {}).get("activation")
    which = f"; activation {activation!r}" if isinstance(activation, str) and activation != "any" else ""
    return (
        f"the {group_name('prompts')} are barely better than random init at epoch 0 (test accuracy "
        f"{_show(prompts, digits)} vs {_show(random, digits)}{which}): every group starts from models that did not "
        "learn the task, so these comparisons say little. Choose other prompts with --activation, --prompt-epoch "
        "or --num-prompts."
    )


def sampling_warnings(sampling: Mapping[str, Any]) -> list[str]:
    """Warning sentences about the sampling evaluation itself: weak prompts, degenerate baselines."""
    weak = weak_prompts_warning(sampling)
    return ([weak] if weak else []) + degenerate_baselines(sampling)


def _novelty_verdict(novelty: Mapping[str, Any], digits: int) -> str | None:
    """Distance to the nearest zoo checkpoint: samples vs noise at equal accuracy (or at matched distance)."""
    sampled = _number((novelty.get("sampled") or {}).get("nearest_distance"))
    if sampled is None:
        return None
    matched = novelty.get("noise_matched_accuracy") or {}
    other_key = "noise_matched_accuracy"
    if (not isinstance(matched, Mapping) or other_key in degenerate_groups({"novelty": novelty})
            or _number(matched.get("nearest_distance")) is None):
        other_key = "noise"
    other = _number((novelty.get(other_key) or {}).get("nearest_distance"))
    if other is None:
        return None
    word = {1: "farther from", -1: "closer to", 0: "as far from"}[_order(sampled, other, digits)]
    if word == "as far from":
        relation = f"as far from every zoo checkpoint as {group_name(other_key)}"
    else:
        relation = f"{word} every zoo checkpoint than {group_name(other_key)}"
    return (f"SANE samples are {relation} (distance to the nearest checkpoint after alignment "
            f"{_show(sampled, digits)} vs {_show(other, digits)}).")


def transfer_verdict(transfer: Mapping[str, Any] | None, *, digits: int = 2) -> str | None:
    """The transfer gain in words, saying loudly when the target task is the permuted-labels stand-in."""
    if not isinstance(transfer, Mapping) or not isinstance(transfer.get("accuracy"), Mapping):
        return None
    gain = _number(transfer.get("gain_over_random_init"))
    if gain is None:
        return None
    epochs = transfer.get("epochs", 1)
    target = transfer.get("description") or transfer.get("task")
    sign = _order(gain, 0.0, digits)
    word = {1: f"beat random init by {_show(gain, digits, sign=True)}",
            -1: f"trail random init by {_show(gain, digits, sign=True)}", 0: "match random init"}[sign]
    ranked = " ranked on the new task" if transfer.get("score") == "target" else ""
    text = f"On transfer to {target}, SANE samples{ranked} (head reset) {word} {_short_epoch(epochs)}."
    acc = transfer["accuracy"]
    sampled = _number(((acc.get("sampled") or {}).get(str(epochs)) or {}).get("mean"))
    for group in ("noise", "prompts"):
        other = _number(((acc.get(group) or {}).get(str(epochs)) or {}).get("mean"))
        if sampled is not None and other is not None:
            verb = {1: "beat", -1: "trail", 0: "match"}[_order(sampled, other, digits)]
            text += f" They {verb} {group_name(group)} ({_show(sampled, digits)} vs {_show(other, digits)})."
    if transfer.get("fallback"):
        text += (" WARNING: no other task was installed, so this is the fallback — the zoo's own task with "
                 "permuted labels, a weak stand-in for a new task (install Fashion-MNIST or MNIST for a real one).")
    return text


def sampling_verdicts(sampling: Mapping[str, Any], *, digits: int = 2) -> list[str]:
    """The sampling claims of ``samples/metrics.json`` (``sane-hf sample --evaluate``) in words.

    Lines: the gain over random init per epoch; samples vs each prompts + noise baseline at
    epoch 0 (skipping a degenerate one); distance to the zoo vs noise; transfer; and the warnings of
    :func:`sampling_warnings` (weak prompts, each degenerate baseline).
    """
    accuracy = (sampling or {}).get("accuracy") or {}
    out: list[str] = []
    line = gain_verdict(sampling.get("gain_over_random_init") or {}, digits=digits)
    if line:
        out.append(line)
    sampled = accuracy.get("sampled") or {}
    degenerate = bool(degenerate_baselines(sampling))
    epochs = sorted(sampled, key=lambda e: int(e))
    first = epochs[0] if epochs else None
    for key in ("noise", "noise_matched_accuracy"):
        if first is None or key not in accuracy or (key == "noise_matched_accuracy" and degenerate):
            continue
        line = _versus(sampled.get(first), (accuracy.get(key) or {}).get(first), key, first, digits)
        if line:
            out.append(line)
    novelty = sampling.get("novelty")
    if isinstance(novelty, Mapping):
        line = _novelty_verdict(novelty, digits)
        if line:
            out.append(line)
    line = transfer_verdict(sampling.get("transfer"), digits=digits)
    if line:
        out.append(line)
    out += [f"WARNING: {w}" for w in sampling_warnings(sampling)]
    return out


def _sampling_tally(sampling: Mapping[str, Any], digits: int) -> tuple[bool | None, list[str]]:
    """Whether the samples are ≥ both prompts + noise baselines at every shown epoch, and which lost."""
    accuracy = (sampling or {}).get("accuracy") or {}
    sampled = accuracy.get("sampled") or {}
    degenerate = bool(degenerate_baselines(sampling))
    lost, compared = [], False
    for key in ("noise", "noise_matched_accuracy"):
        if key not in accuracy or (key == "noise_matched_accuracy" and degenerate):
            continue
        for epoch in sorted(sampled, key=lambda e: int(e)):
            a, b = _number(sampled.get(epoch)), _number((accuracy.get(key) or {}).get(epoch))
            if a is None or b is None:
                continue
            compared = True
            if _order(a, b, digits) < 0:
                lost.append(f"{group_name(key)} {_short_epoch(epoch)}")
    return (None if not compared else not lost), lost


def overall_verdict(
    probe: Mapping[str, Any] | None = None, sampling: Mapping[str, Any] | None = None, *, digits: int = 2
) -> str | None:
    """Did SANE win? SANE ≥ layer statistics on every probed property, and samples ≥ both prompts + noise
    baselines at every fine-tuning epoch (a degenerate baseline is left out and said so)."""
    parts, won = [], []
    if probe:
        wins, total = _probe_tally(probe.get("metrics", probe) if isinstance(probe, Mapping) else {}, digits)
        if total:
            won.append(wins == total)
            parts.append(f"SANE matches or beats {method_name('layer_stats')} on {wins} of {total} properties")
    if sampling and sampling.get("accuracy"):
        ok, lost = _sampling_tally(sampling, digits)
        if ok is not None:
            won.append(ok)
            parts.append("the samples are at least as accurate as both prompts + noise baselines at every epoch"
                         if ok else "the samples fall below " + "; ".join(lost))
    if not parts:
        return None
    head = "SANE wins" if all(won) else "SANE does not win"
    return f"Verdict: {head} on this run — " + ", and ".join(parts) + "."


def readable_note(note: str) -> str:
    """A probe note ``"layer_stats/optimizer: ..."`` (or ``"fold 2, raw/init: ..."``) with readable names."""
    prefix, sep, rest = note.partition(": ")
    head, comma, key = prefix.rpartition(", ")
    method, slash, prop = key.partition("/")
    if not sep or not slash or method not in METHOD_NAMES:
        return note
    return f"{head}{comma}{method_name(method)}, {property_name(prop)}: {rest}"


def join_lines(lines: Sequence[str], bullet: str = "- ") -> str:
    """Lines as a bulleted block (Markdown or plain text)."""
    return "\n".join(f"{bullet}{line}" for line in lines)
