"""Model zoos as Hugging Face Datasets: build, load, tokenize.

A zoo is a folder that ``datasets.load_dataset(folder)`` (or ``load_dataset(repo_id)`` once pushed)
reads as a :class:`datasets.DatasetDict` with splits ``train``, ``validation`` and ``test``::

    out_dir/
    ├── README.md                           dataset card (YAML ``configs`` → data files per split)
    ├── zoo_config.json                     the :class:`ZooConfig` that made the zoo
    ├── zoo_summary.json                    counts, property ranges, drops, build time
    └── data/
        ├── train-00000-of-00001.parquet
        ├── validation-00000-of-00001.parquet
        └── test-00000-of-00001.parquet

One row per checkpoint (model × epoch), columns in :data:`ZOO_FEATURES`. The weights are stored
tokenizer-free as safetensors bytes (``Value("binary")``), so one zoo serves any token size;
:func:`tokenize_zoo` adds ``tokens``/``positions``/``mask`` for a given :class:`WeightTokenizer`.
Splits are by model (a seeded permutation of model ids), never by checkpoint.

While a zoo is built (or imported) finished pieces are written to ``out_dir/.partial/`` as
parquet part files, each followed by a small JSON marker, both atomically (temp file +
``os.replace``). A rerun after an interruption skips finished pieces and then assembles the
splits, so the result equals an uninterrupted build. ``.partial`` is removed when the zoo is
complete.

Pitfalls measured here and handled:

- binary columns lose trailing NUL bytes under ``with_format("torch"/"numpy")``: format only
  the numeric columns (:func:`with_numeric_format`) and decode weights from Python bytes;
- an empty parquet file breaks ``load_dataset``: an empty split is left out of the card's
  ``configs`` and :func:`load_zoo` adds it back as an empty :class:`datasets.Dataset`.

The code lives in :mod:`sane_hf.zoo.config` (:class:`ZooConfig`, without torch),
:mod:`sane_hf.zoo.schema` (columns, weights as bytes),
:mod:`sane_hf.zoo.build` (part store, assembly, splits, :func:`build_zoo`),
:mod:`sane_hf.zoo.loading` (:func:`load_zoo`, iteration, tokenization) and
:mod:`sane_hf.cards.dataset_card` (the dataset card); every public name is importable from here and
from :mod:`sane_hf.zoo`.
"""

from __future__ import annotations

from sane_hf.zoo.build import build_zoo, split_model_ids
from sane_hf.zoo.loading import (
    fit_tokenizer_on_zoo,
    iter_state_dicts,
    load_zoo,
    tokenize_zoo,
    with_numeric_format,
    zoo_model,
)
from sane_hf.zoo.schema import (
    HPARAM_COLUMNS,
    NUMERIC_COLUMNS,
    PROPERTY_COLUMNS,
    SPLITS,
    ZOO_FEATURES,
    ZooConfig,
    load_zoo_config,
    load_zoo_summary,
    state_dict_from_bytes,
    state_dict_to_bytes,
)

__all__ = [
    "SPLITS",
    "ZOO_FEATURES",
    "HPARAM_COLUMNS",
    "PROPERTY_COLUMNS",
    "NUMERIC_COLUMNS",
    "ZooConfig",
    "build_zoo",
    "load_zoo",
    "load_zoo_config",
    "load_zoo_summary",
    "zoo_model",
    "iter_state_dicts",
    "tokenize_zoo",
    "fit_tokenizer_on_zoo",
    "with_numeric_format",
    "state_dict_to_bytes",
    "state_dict_from_bytes",
    "split_model_ids",
]

# the build helpers the importers and the zoo command share, importable from their old place too
from sane_hf.zoo.build import (  # noqa: E402, F401
    _TEMP_JOURNAL,
    _assemble,
    _distributed_state,
    _make_row,
    _PartStore,
    _prepare_out_dir,
    _writes_zoo,
)
from sane_hf.zoo.schema import _is_finite_state_dict  # noqa: E402, F401
