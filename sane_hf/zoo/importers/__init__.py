"""Importers: existing model populations → the zoo dataset layout of :mod:`sane_hf.zoo.dataset`.

Every importer writes the same folder as :func:`~sane_hf.zoo.dataset.build_zoo` (parquet shards
per split, dataset card, ``zoo_config.json``, ``zoo_summary.json``) with the columns of
:data:`~sane_hf.zoo.dataset.ZOO_FEATURES`. What a source does not record is filled with
"unknown" values: ``-1`` for integer columns, NaN for float columns (hyperparameters and
properties), ``"unknown"`` for strings. Model ids are assigned in sorted order of the source's
model names (file stems, trial folders, ``modeldir`` values); ``zoo_summary.json`` lists them
under ``sources`` (index = model id). Splits are by model, seeded, 70/15/15 by default.

Checkpoints are only ever read as tensors: ``*.safetensors`` with safetensors, ``*.pt``/``*.pth``
and Model Zoos ``checkpoints`` files with ``torch.load(..., weights_only=True)`` (never a full
unpickle). Checkpoints with NaN/Inf weights are dropped and counted; missing properties are
filled with NaN and reported (warning, card note, summary).

Importing resumes: each model is converted into ``out_dir/.partial/model-XXXXXX.parquet``
(atomically, with a JSON marker); a rerun skips models already converted.

Formats
-------
``folder`` (:func:`import_folder`)
    Checkpoint files (one checkpoint each) anywhere below the folder (e.g.
    ``model_003/epoch_05.safetensors``; ``recursive=False`` reads the top level only) and an
    optional ``properties.csv`` or ``properties.json`` with one row per checkpoint, keyed by a
    ``path`` column relative to the folder (``model_003/epoch_05.safetensors``, suffix optional;
    ``file``/``name``/``stem`` columns, the file name, are still accepted where names are unique;
    JSON: an object ``{path: {column: value}}`` or a list of records). Columns named like zoo
    columns (``test_acc``, ``epoch``, ``lr``, ``model_id``, ...) are used, others are ignored.
    Model and epoch come from the ``model_id`` (or ``model``) and ``epoch`` columns, else from
    the layout: a file name ending in ``epoch_5``/``ep5``/``checkpoint-5``/``step_5`` is epoch 5
    of the model named by its folder (plus the name's prefix); other files are their own model
    with epoch ``-1`` (unknown). Rows naming no file or the same file twice, two files for one
    (model, epoch), and mixed architectures are errors that name them.

Every format takes ``arch="module:callable"`` / ``task="module:callable"`` (or ``build=``/``task=``
callables) for your own architecture and task (:mod:`sane_hf.zoo.custom`): the importer then
checks that every checkpoint loads strictly into your module and records both in
``zoo_config.json`` for ``train``, ``probe`` and ``sample``. This imports your code.
``modelzoos`` (:func:`import_modelzoos`)
    The Model Zoos layout (Schürholt et al. 2022): one folder per trained model (found anywhere
    below ``src`` by its ``params.json``) with ``params.json`` (flat ``"group::name"`` keys or
    nested objects), ``result.json`` (JSON lines, one per epoch) and
    ``checkpoint_<epoch>/checkpoints`` (a state_dict saved with ``torch.save``). Mapping:
    :data:`MODELZOOS_PARAMS`; the epoch of a result line is its ``epoch`` key, else its
    ``training_iteration``, and it is matched to ``checkpoint_<epoch>``.
``unterthiner`` (:func:`import_unterthiner`)
    The CNN zoo of Unterthiner et al. 2020 ("Predicting Neural Network Accuracy from Weights"):
    ``weights.npy`` (``[n_checkpoints, n_params]``), ``metrics.csv`` (row ``i`` describes weight row
    ``i``) and ``layout.csv`` (``varname,start_idx,end_idx,shape``; ``end_idx`` exclusive) or
    ``layout.json`` (a list of such records). Mapping: :data:`UNTERTHINER_COLUMNS`; models are the
    distinct ``modeldir`` values, the epoch is the ``epoch`` column, else ``step`` as stored.
    TensorFlow variable names become state_dict keys: the ``:0`` suffix and a prefix shared by
    all variables (e.g. ``sequential/``) are dropped, ``/`` becomes ``.``, and ``kernel``/``gamma``
    → ``weight``, ``beta`` → ``bias``, ``moving_mean``/``moving_variance`` →
    ``running_mean``/``running_var``. With ``torch_layout=True`` (default) kernels are transposed
    to PyTorch's layout: conv ``(h, w, in, out)`` → ``(out, in, h, w)``, dense ``(in, out)`` →
    ``(out, in)``.

Layout
------
:mod:`~sane_hf.zoo.importers.checkpoints` (reading checkpoint files),
:mod:`~sane_hf.zoo.importers.common` (user code, the shared resumable driver), one module per
format (:mod:`~sane_hf.zoo.importers.folder`, :mod:`~sane_hf.zoo.importers.modelzoos`,
:mod:`~sane_hf.zoo.importers.unterthiner`) and :mod:`~sane_hf.zoo.importers.dispatch`
(:func:`import_zoo`, the entry of ``sane-hf zoo import``). Every public name is importable from here.
"""

from sane_hf.zoo.importers.checkpoints import CHECKPOINT_SUFFIXES, load_checkpoint_file
from sane_hf.zoo.importers.dispatch import IMPORT_FORMATS, import_zoo
from sane_hf.zoo.importers.folder import import_folder
from sane_hf.zoo.importers.modelzoos import MODELZOOS_PARAMS, import_modelzoos
from sane_hf.zoo.importers.unterthiner import UNTERTHINER_COLUMNS, import_unterthiner

__all__ = [
    "IMPORT_FORMATS",
    "MODELZOOS_PARAMS",
    "UNTERTHINER_COLUMNS",
    "CHECKPOINT_SUFFIXES",
    "import_zoo",
    "import_folder",
    "import_modelzoos",
    "import_unterthiner",
    "load_checkpoint_file",
]
