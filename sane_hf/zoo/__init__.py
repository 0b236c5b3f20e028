"""Model zoos: offline tasks, architectures, population training, datasets, importers.

Every public name is imported on first use, so ``import sane_hf.zoo.config`` (:class:`ZooConfig`,
what ``sane-hf zoo build --help`` reads) imports neither torch nor ``datasets``, and
``import sane_hf.zoo.architectures`` does not pull in ``datasets`` or the trainer.

>>> from sane_hf.zoo import ZooConfig, build_zoo, load_zoo   # doctest: +SKIP
>>> zoo = build_zoo(ZooConfig(task="digits", arch="cnn-s", num_models=8, epochs=2), "zoos/tiny")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sane_hf._lazy import lazy_exports

_LAZY: dict[str, str] = {
    # architectures
    "create_model": "sane_hf.zoo.architectures",
    "list_architectures": "sane_hf.zoo.architectures",
    "register_architecture": "sane_hf.zoo.architectures",
    # tasks
    "TaskData": "sane_hf.zoo.tasks",
    "list_tasks": "sane_hf.zoo.tasks",
    "load_task": "sane_hf.zoo.tasks",
    # population training
    "HyperParams": "sane_hf.zoo.train",
    "CheckpointMetrics": "sane_hf.zoo.train",
    "CheckpointRecord": "sane_hf.zoo.train",
    "sample_grid": "sane_hf.zoo.train",
    "train_population": "sane_hf.zoo.train",
    # datasets
    "SPLITS": "sane_hf.zoo.dataset",
    "ZOO_FEATURES": "sane_hf.zoo.dataset",
    "NUMERIC_COLUMNS": "sane_hf.zoo.dataset",
    "ZooConfig": "sane_hf.zoo.config",
    "build_zoo": "sane_hf.zoo.dataset",
    "load_zoo": "sane_hf.zoo.dataset",
    "load_zoo_config": "sane_hf.zoo.config",
    "load_zoo_summary": "sane_hf.zoo.config",
    "zoo_model": "sane_hf.zoo.dataset",
    "iter_state_dicts": "sane_hf.zoo.dataset",
    "tokenize_zoo": "sane_hf.zoo.dataset",
    "fit_tokenizer_on_zoo": "sane_hf.zoo.dataset",
    "with_numeric_format": "sane_hf.zoo.dataset",
    "state_dict_to_bytes": "sane_hf.state_dict_io",
    "state_dict_from_bytes": "sane_hf.state_dict_io",
    "split_model_ids": "sane_hf.zoo.dataset",
    # importers
    "import_zoo": "sane_hf.zoo.importers",
    "import_folder": "sane_hf.zoo.importers",
    "import_modelzoos": "sane_hf.zoo.importers",
    "import_unterthiner": "sane_hf.zoo.importers",
}

__all__ = [
    "create_model",
    "list_architectures",
    "register_architecture",
    "TaskData",
    "list_tasks",
    "load_task",
    "HyperParams",
    "CheckpointMetrics",
    "CheckpointRecord",
    "sample_grid",
    "train_population",
    "SPLITS",
    "ZOO_FEATURES",
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
    "import_zoo",
    "import_folder",
    "import_modelzoos",
    "import_unterthiner",
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from sane_hf.state_dict_io import state_dict_from_bytes, state_dict_to_bytes
    from sane_hf.zoo.architectures import create_model, list_architectures, register_architecture
    from sane_hf.zoo.config import ZooConfig, load_zoo_config, load_zoo_summary
    from sane_hf.zoo.dataset import (
        NUMERIC_COLUMNS,
        SPLITS,
        ZOO_FEATURES,
        build_zoo,
        fit_tokenizer_on_zoo,
        iter_state_dicts,
        load_zoo,
        split_model_ids,
        tokenize_zoo,
        with_numeric_format,
        zoo_model,
    )
    from sane_hf.zoo.importers import import_folder, import_modelzoos, import_unterthiner, import_zoo
    from sane_hf.zoo.tasks import TaskData, list_tasks, load_task
    from sane_hf.zoo.train import (
        CheckpointMetrics,
        CheckpointRecord,
        HyperParams,
        sample_grid,
        train_population,
    )
