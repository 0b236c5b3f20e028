"""Verdict sentences are derived from the numbers, in both directions, with readable names only."""

from __future__ import annotations

import pytest

from sane_hf.verdicts import (
    degenerate_baselines,
    degenerate_groups,
    gain_verdict,
    group_name,
    method_name,
    overall_verdict,
    probe_verdict,
    probe_verdicts,
    sampling_verdicts,
    sampling_warnings,
    transfer_verdict,
    weak_prompts_warning,
)


def _summary(mean):
    return {"mean": mean, "std": 0.0, "n": 4}


def _sampling(sampled, noise, matched, *, matched_ok=True, distances=(12.0, 8.0), gain=None):
    epochs = ("0", "1")
    return {
        "accuracy": {
            "sampled": {e: _summary(v) for e, v in zip(epochs, sampled)},
            "random_init": {e: _summary(0.1) for e in epochs},
            "noise": {e: _summary(v) for e, v in zip(epochs, noise)},
            "noise_matched_accuracy": {e: _summary(v) for e, v in zip(epochs, matched)},
        },
        "gain_over_random_init": gain or {e: v - 0.1 for e, v in zip(epochs, sampled)},
        "novelty": {
            "sampled": {"nearest_distance": _summary(distances[0])},
            "noise": {"nearest_distance": _summary(9.0)},
            "noise_matched_accuracy": {"nearest_distance": _summary(distances[1]), "matched": matched_ok},
        },
    }


@pytest.mark.parametrize(
    ("sane", "stats", "word"),
    [(0.61, 0.57, "better than"), (0.52, 0.57, "worse than"), (0.571, 0.574, "as well as")],
)
def test_probe_verdict_follows_the_numbers(sane, stats, word):
    line = probe_verdict("test_acc", {"sane": sane, "layer_stats": stats}, "r2")
    assert line == f"SANE predicts test accuracy {word} layer statistics (R² {sane:.2f} vs {stats:.2f})."


@pytest.mark.parametrize(
    ("both", "words"),
    [(0.59, "SANE adds to them"), (0.574, "SANE adds nothing to them"),
     (0.55, "the blend falls below them (the SANE weight chosen on validation did not hold on test)")],
)
def test_probe_verdict_says_whether_sane_adds_to_the_statistics(both, words):
    line = probe_verdict("test_acc", {"sane": 0.53, "layer_stats": 0.57, "sane+stats": both}, "r2")
    assert line == (f"SANE predicts test accuracy worse than layer statistics (R² 0.53 vs 0.57). Blended with layer "
                    f"statistics on validation, {words} (R² {both:.2f} vs 0.57).")


def test_probe_verdicts_name_raw_weights_and_skip_unmeasured():
    lines = probe_verdicts(
        {"activation": {"sane": 0.9, "layer_stats": 0.95, "raw": 0.5}, "epoch": {"sane": None, "layer_stats": 0.3}},
        {"activation": "accuracy", "epoch": "r2"},
    )
    assert lines == ["SANE predicts activation function worse than layer statistics (accuracy 0.90 vs 0.95; "
                     "raw weights 0.50)."]  # fmt: skip


def test_gain_verdict_in_both_directions():
    assert gain_verdict({"0": 0.41, "1": 0.1, "5": -0.02}) == (
        "SANE samples beat random init by +0.41 at epoch 0, by +0.10 after 1 fine-tuning epoch and trail it by "
        "-0.02 after 5 fine-tuning epochs."
    )
    assert gain_verdict({"0": -0.3}) == "SANE samples trail random init by -0.30 at epoch 0."
    assert gain_verdict({"0": 0.001}) == "SANE samples match random init at epoch 0."
    assert gain_verdict({}) is None


def test_sampling_verdicts_above_and_below_the_noise_baselines():
    above = sampling_verdicts(_sampling((0.6, 0.8), (0.4, 0.7), (0.55, 0.75)))
    assert "SANE samples are above prompts + noise (matched distance) at epoch 0 (test accuracy 0.60 vs 0.40)." in above
    assert "SANE samples are above prompts + noise (matched accuracy) at epoch 0 (test accuracy 0.60 vs 0.55)." in above
    assert any("farther from every zoo checkpoint than prompts + noise (matched accuracy) (distance to the nearest "
               "checkpoint after alignment 12.00 vs 8.00)" in line for line in above)  # fmt: skip
    below = sampling_verdicts(_sampling((0.3, 0.5), (0.4, 0.7), (0.35, 0.75), distances=(5.0, 8.0)))
    assert "SANE samples are below prompts + noise (matched distance) at epoch 0 (test accuracy 0.30 vs 0.40)." in below
    assert any("closer to every zoo checkpoint" in line for line in below)
    for line in above + below:
        assert "noise_matched_accuracy" not in line and "random_init" not in line


def test_degenerate_baseline_is_flagged_and_not_compared():
    sampling = _sampling((0.9, 0.9), (0.4, 0.7), (0.8, 0.85), matched_ok=False)
    warnings = degenerate_baselines(sampling)
    assert len(warnings) == 1 and "prompts + noise (matched accuracy) is degenerate" in warnings[0]
    lines = sampling_verdicts(sampling)
    assert lines[-1] == f"WARNING: {warnings[0]}"
    assert not any(line.startswith("SANE samples are above prompts + noise (matched accuracy)") for line in lines)
    # the distance claim falls back to the matched-distance noise
    assert any("than prompts + noise (matched distance)" in line for line in lines)
    assert degenerate_baselines(_sampling((0.9, 0.9), (0.4, 0.7), (0.8, 0.85))) == []


def test_weak_prompts_are_flagged_from_the_numbers():
    # the digits zoo with ten sigmoid prompts, nine at chance: prompts 0.119, random init 0.100
    sampling = _sampling((0.147, 0.126), (0.15, 0.128), (0.126, 0.126))
    sampling["activation"] = "sigmoid"
    sampling["accuracy"]["prompts"] = {"0": _summary(0.119), "1": _summary(0.13)}
    warning = weak_prompts_warning(sampling)
    assert warning == (
        "the prompt models are barely better than random init at epoch 0 (test accuracy 0.12 vs 0.10; activation "
        "'sigmoid'): every group starts from models that did not learn the task, so these comparisons say little. "
        "Choose other prompts with --activation, --prompt-epoch or --num-prompts."
    )
    assert sampling_verdicts(sampling)[-1] == f"WARNING: {warning}" and sampling_warnings(sampling) == [warning]
    # 0.10 above random init is enough (the protocol's "well above random init"); no prompts, no claim
    sampling["accuracy"]["prompts"]["0"] = _summary(0.2)
    assert weak_prompts_warning(sampling) is None
    del sampling["accuracy"]["prompts"]
    assert weak_prompts_warning(sampling) is None and sampling_warnings(sampling) == []


def test_transfer_verdict_says_when_it_is_the_fallback():
    transfer = {"accuracy": {"sampled": {}}, "gain_over_random_init": 0.05, "epochs": 1,
                "description": "digits with permuted labels (fallback)", "fallback": True}  # fmt: skip
    line = transfer_verdict(transfer)
    assert line.startswith("On transfer to digits with permuted labels (fallback), SANE samples (head reset) beat "
                           "random init by +0.05 after 1 fine-tuning epoch.")  # fmt: skip
    assert "WARNING" in line and "permuted labels" in line
    assert "WARNING" not in transfer_verdict({**transfer, "fallback": False, "gain_over_random_init": -0.2})


def test_overall_verdict_wins_only_when_every_claim_holds():
    probe = {"metrics": {"test_acc": {"sane": 0.6, "layer_stats": 0.5}}}
    assert overall_verdict(probe, _sampling((0.6, 0.8), (0.4, 0.7), (0.55, 0.75))).startswith("Verdict: SANE wins")
    lost = overall_verdict(probe, _sampling((0.6, 0.6), (0.4, 0.7), (0.55, 0.75)))
    assert lost.startswith("Verdict: SANE does not win") and "prompts + noise (matched distance) after 1" in lost
    assert overall_verdict({"metrics": {"test_acc": {"sane": 0.4, "layer_stats": 0.5}}}).startswith(
        "Verdict: SANE does not win on this run — SANE matches or beats layer statistics on 0 of 1 properties.")
    assert overall_verdict(None, None) is None


def test_readable_names():
    assert method_name("layer_stats") == "layer statistics"
    assert group_name("noise_matched_accuracy") == "prompts + noise (matched accuracy)"
    assert group_name("something_new") == "something new"


def test_huge_matching_noise_is_flagged_as_random_weights():
    sampling = _sampling((0.1, 0.3), (0.2, 0.5), (0.1, 0.2))
    sampling["novelty"]["noise_matched_accuracy"]["noise_norm"] = 6775693.3
    sampling["novelty"]["prompts"] = {"param_norm": _summary(11.0)}
    groups = degenerate_groups(sampling)
    assert list(groups) == ["noise_matched_accuracy"]
    assert "noise of norm 6.78e+06, 615972x the prompts' own weight norm (11)" in groups["noise_matched_accuracy"]
    lines = sampling_verdicts(sampling)
    assert lines[-1].startswith("WARNING: prompts + noise (matched accuracy) is degenerate")
    assert not any("than prompts + noise (matched accuracy)" in line for line in lines)
    sampling["novelty"]["noise_matched_accuracy"]["noise_norm"] = 5.0  # half the weights' norm: a real baseline
    assert degenerate_groups(sampling) == {}
