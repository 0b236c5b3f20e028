"""The main job on embedded defaults: build a zoo, train SANE, probe it, sample from it, report.

``sane-hf quickstart`` (and :func:`run_quickstart`) runs the whole sane-hf flow on a
:class:`QuickstartConfig` — a digits zoo of ``cnn-s`` models, a small SANE, the probing and sampling
protocols of sane-hf — and writes one folder::

    sane-quickstart/
    ├── zoo/                        the model zoo (Hugging Face dataset folder with its card)
    ├── model/                      the trained SANE: config.json (auto_map + custom_pipelines),
    │                               model.safetensors, weight_tokenizer.json, remote code, README.md
    │                               (model card), metrics.json (training), probe_metrics.json,
    │                               sampling_metrics.json, checkpoints/ (resumable training state)
    ├── probe/                      metrics.json, pred_vs_true_test_acc.png, embedding_pca.png, embeddings.npz
    ├── samples/                    metrics.json, accuracy_vs_epoch.png, sample_XXX.safetensors
    ├── report.md                   the probe and sampling tables, stage timings, how to use the model
    └── quickstart_metrics.json     configuration, per-stage timings, the headline numbers

Stages, in order: ``zoo`` (:func:`~sane_hf.zoo.dataset.build_zoo`), ``tokenize``
(:func:`~sane_hf.zoo.dataset.fit_tokenizer_on_zoo` + :func:`~sane_hf.zoo.dataset.tokenize_zoo`),
``train`` (:func:`~sane_hf.training.train_sane`), ``pipeline``
(:func:`~sane_hf.hub.save_sane_pipeline`: remote code and ``custom_pipelines``),
``probe`` (:func:`~sane_hf.probing.evaluate_zoo_probes`), ``sample``
(:func:`~sane_hf.evaluation.evaluate_sampling`), ``card`` (:func:`~sane_hf.cards.render_model_card`)
and ``report``.

Resume. Rerunning with the same ``out_dir`` reuses what is finished: the zoo build and SANE
training resume natively (a killed build continues with its next chunk, a killed training from its
newest checkpoint); a finished zoo or model is loaded as it is; probing and sampling are skipped when
their ``metrics.json`` exists, unless ``overwrite=True`` (``--overwrite``). The card and the report
are always rewritten. A folder made with other settings (``--fast`` vs full, another ``--seed``) is
refused with an error rather than mixed.

The package holds the settings (:mod:`sane_hf.quickstart.config`) and the stage runner
(:mod:`sane_hf.quickstart.runner`); the report is rendered by :mod:`sane_hf.reports`.

Example::

    >>> from sane_hf.quickstart import QuickstartConfig, run_quickstart   # doctest: +SKIP
    >>> result = run_quickstart(QuickstartConfig.fast(), "sane-quickstart-fast")
    >>> print(result.summary)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sane_hf._lazy import lazy_exports
from sane_hf.constants import QUICKSTART_METRICS_FILE as METRICS_FILE
from sane_hf.constants import REPORT_FILE

# imported on first use: `sane_hf.quickstart.config` (what `sane-hf quickstart --help` reads) stays free of torch
_LAZY: dict[str, str] = {
    "ProbeSettings": "sane_hf.quickstart.config",
    "QuickstartConfig": "sane_hf.quickstart.config",
    "STAGES": "sane_hf.quickstart.runner",
    "QuickstartResult": "sane_hf.quickstart.runner",
    "StageRecord": "sane_hf.quickstart.runner",
    "run_quickstart": "sane_hf.quickstart.runner",
    "format_summary": "sane_hf.reports",
    "render_report": "sane_hf.reports",
    "verdict_lines": "sane_hf.reports",
}

__all__ = [
    "STAGES",
    "ProbeSettings",
    "QuickstartConfig",
    "StageRecord",
    "QuickstartResult",
    "run_quickstart",
    "render_report",
    "format_summary",
    "verdict_lines",
    "REPORT_FILE",
    "METRICS_FILE",
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from sane_hf.quickstart.config import ProbeSettings, QuickstartConfig
    from sane_hf.quickstart.runner import STAGES, QuickstartResult, StageRecord, run_quickstart
    from sane_hf.reports import format_summary, render_report, verdict_lines
