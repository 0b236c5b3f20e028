"""The sampling evaluation protocol, behind ``sane-hf sample --evaluate``.

Given a trained SANE, its tokenizer and a zoo:

1. **Prompts**: the best ``num_prompts`` models of the zoo's *test* split at ``prompt_epoch``
   (default: the last stored epoch), by test accuracy, among models with one activation (the best
   model's, unless ``activation`` names one): a state_dict is only meaningful with its
   activation function, so samples, prompts and baselines all use it.
2. **Samples**: :func:`~sane_hf.sampling.sample_models` around the prompts; with ``score="train-acc"``
   candidates are ranked by accuracy on ``score_samples`` training images (after BatchNorm
   conditioning when the architecture has BatchNorm). BatchNorm statistics of every evaluated
   model are re-estimated on ``bn_samples`` training images (:func:`~sane_hf.sampling.condition_batchnorm`).
3. **Accuracy vs fine-tuning epoch** (``finetune_epochs``, e.g. 0, 1, 5) on the test split, mean ± std, of:

   - ``sampled``: the samples;
   - ``random_init``: the same architecture from random initialisation (one per sample);
   - ``noise``: sample ``i``'s nearest prompt (after alignment) plus isotropic Gaussian noise on the
     parameters whose norm equals that distance: "the same prompts perturbed as far as the samples
     are" — so a sampler that keeps only candidates near the best prompts is compared with noise
     around those prompts, not around all of them. Scored samples were each chosen from several
     candidates (:func:`selection_draws`: ``candidates · (bootstrap_rounds + 1) / num_samples``,
     4 by default), so each noise model is the best of as many noise draws by the same score
     (:func:`source_score_fn`): selection alone cannot make the samples beat noise;
   - ``noise_matched_accuracy``: the same prompts with one common noise norm, chosen by bisection so that
     the mean *validation* accuracy equals the samples' (:func:`calibrate_noise`): "prompts
     perturbed until they are as good as the samples" — the reference for "farther from the zoo
     at equal accuracy";
   - ``aligned_average``: the prompts aligned to the best one by weight matching
     (:func:`~sane_hf.alignment.align_to`), then averaged;
   - ``prompts``: the prompts themselves.

   Every model is fine-tuned with the same recipe (:func:`~sane_hf.zoo.train.fine_tune`: Adam,
   ``finetune_lr``, batch 32, dropout off).
4. **Novelty**: for each sample (and noise model, and prompt), the L2 distance over parameters to
   its nearest training-zoo checkpoint after aligning it to that checkpoint (up to
   ``max_neighbours`` train-split checkpoints, seeded subsample), and the fraction of test inputs
   on which it predicts the same class as that neighbour. A sample that copies a training
   checkpoint shows a small distance and an agreement near 1.
5. **Transfer**: samples and prompts with their head reset (:func:`~sane_hf.sampling.reset_head`)
   and random init, fine-tuned ``transfer_epochs`` on another task: ``transfer_task="auto"``
   takes the first installed of Fashion-MNIST, MNIST and digits that differs from the zoo's task
   and has its number of input channels, resampled to the zoo's image size; if none is installed,
   the zoo's own task with a seeded permutation of the class labels (a weak stand-in: the features
   transfer unchanged, only the head must be relearnt — reported as such). As in the paper, the
   transfer samples are chosen by the *new* task (``transfer_score="target"``): candidates are
   drawn again around the same prompts, ranked by :func:`target_score_fn` on
   ``transfer_score_samples`` labelled images of the new task, and the KDE is refit on the best
   ones for ``transfer_bootstrap_rounds`` rounds. Reported beside them: the source-scored samples,
   the prompts, prompts + noise as far as the target-scored samples are (each the best of as many
   draws by the new task's score), and random init.

Everything is written to ``out_dir``: ``metrics.json``, ``accuracy_vs_epoch.png`` and the
samples as ``sample_XXX.safetensors`` (metadata: score, anchor prompt, round, activation).

Layout: :mod:`~sane_hf.evaluation.config` (:class:`SamplingEvalConfig`),
:mod:`~sane_hf.evaluation.draw` (steps 1-2: prompts, samples, their metrics and files),
:mod:`~sane_hf.evaluation.baselines` (scores, noise and average baselines, novelty measurements),
:mod:`~sane_hf.evaluation.protocol` (:func:`evaluate_sampling`: steps 3-5 and the output folder) and
:mod:`~sane_hf.evaluation.plotting` (the figure). Every public name is importable from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sane_hf._lazy import lazy_exports

# imported on first use: `sane_hf.evaluation.config` (what `sane-hf sample --help` reads) stays free of torch
_LAZY: dict[str, str] = {
    "accuracy_score_fn": "sane_hf.evaluation.baselines",
    "aligned_average": "sane_hf.evaluation.baselines",
    "calibrate_noise": "sane_hf.evaluation.baselines",
    "evaluation_spec": "sane_hf.evaluation.baselines",
    "matched_noise": "sane_hf.evaluation.baselines",
    "nearest_mean_loo_accuracy": "sane_hf.evaluation.baselines",
    "nearest_neighbours": "sane_hf.evaluation.baselines",
    "noise_like": "sane_hf.evaluation.baselines",
    "prediction_agreement": "sane_hf.evaluation.baselines",
    "target_score_fn": "sane_hf.evaluation.baselines",
    "GROUPS": "sane_hf.evaluation.config",
    "TRANSFER_CANDIDATES": "sane_hf.evaluation.config",
    "SamplingEvalConfig": "sane_hf.evaluation.config",
    "PromptSelection": "sane_hf.evaluation.draw",
    "SamplingSetup": "sane_hf.evaluation.draw",
    "choose_prompts": "sane_hf.evaluation.draw",
    "diversity_metrics": "sane_hf.evaluation.draw",
    "prompt_metrics": "sane_hf.evaluation.draw",
    "run_sampling": "sane_hf.evaluation.draw",
    "save_samples": "sane_hf.evaluation.draw",
    "select_prompts": "sane_hf.evaluation.draw",
    "selection_draws": "sane_hf.evaluation.draw",
    "source_score_fn": "sane_hf.evaluation.draw",
    "plot_accuracy": "sane_hf.evaluation.plotting",
    "evaluate_sampling": "sane_hf.evaluation.protocol",
    "resolve_transfer_task": "sane_hf.evaluation.protocol",
}

__all__ = [
    "SamplingEvalConfig",
    "SamplingSetup",
    "TRANSFER_CANDIDATES",
    "GROUPS",
    "PromptSelection",
    "choose_prompts",
    "select_prompts",
    "accuracy_score_fn",
    "aligned_average",
    "noise_like",
    "matched_noise",
    "evaluation_spec",
    "target_score_fn",
    "nearest_mean_loo_accuracy",
    "calibrate_noise",
    "nearest_neighbours",
    "prediction_agreement",
    "resolve_transfer_task",
    "run_sampling",
    "selection_draws",
    "source_score_fn",
    "diversity_metrics",
    "prompt_metrics",
    "evaluate_sampling",
    "plot_accuracy",
    "save_samples",
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from sane_hf.evaluation.baselines import (
        accuracy_score_fn,
        aligned_average,
        calibrate_noise,
        evaluation_spec,
        matched_noise,
        nearest_mean_loo_accuracy,
        nearest_neighbours,
        noise_like,
        prediction_agreement,
        target_score_fn,
    )
    from sane_hf.evaluation.config import GROUPS, TRANSFER_CANDIDATES, SamplingEvalConfig
    from sane_hf.evaluation.draw import (
        PromptSelection,
        SamplingSetup,
        choose_prompts,
        diversity_metrics,
        prompt_metrics,
        run_sampling,
        save_samples,
        select_prompts,
        selection_draws,
        source_score_fn,
    )
    from sane_hf.evaluation.plotting import plot_accuracy
    from sane_hf.evaluation.protocol import evaluate_sampling, resolve_transfer_task
