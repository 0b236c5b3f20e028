"""transformers pipelines for SANE: ``"weight-sampling"`` and ``"weight-embedding"``.

Thin shells over :func:`~sane_hf.sampling.sample_models` and
:func:`~sane_hf.embedding.embed_models`: ``preprocess`` turns the inputs (state_dicts,
``nn.Module``\\ s, a list of them, zoo rows or a zoo split) into state_dicts, ``_forward`` runs the
model (window batching happens inside), ``postprocess`` returns plain Python objects.
Neither pipeline loads a text tokenizer or processor; the :class:`WeightTokenizer` is read from
the model's folder (local, or the Hub cache) — ``weight_tokenizer.json`` next to ``config.json``.

Remote code. :func:`save_sane_pipeline` (or ``pipe.save_pretrained(dir)`` on a pipeline made
from this module) writes a folder that loads in a fresh Python without ``sane_hf``::

    dir/
    ├── config.json              SaneConfig + auto_map (AutoConfig/AutoModel) + custom_pipelines
    ├── model.safetensors
    ├── weight_tokenizer.json
    ├── configuration_sane.py    remote code of the model (copied by SaneModel.save_pretrained)
    ├── modeling_sane.py
    ├── pipeline_sane.py         this file: the pipelines (copied by Pipeline.save_pretrained)
    ├── sampling.py              relative imports of pipeline_sane.py, copied with it
    ├── embedding.py
    └── tokenization_sane.py

so that ``pipeline(model=dir, trust_remote_code=True)`` and
``pipeline("weight-sampling", model=dir, trust_remote_code=True)`` both work. transformers copies
a pipeline's file and, recursively, the files it imports *relatively* (``from .x import``). This
package's modules import each other relatively where they travel; any absolute ``sane_hf``
import left in a copied file is rewritten in the saved copy by :func:`make_self_contained`
(to a relative import when the module travels too, else wrapped in ``try``/``except ImportError``
so that transformers' import check skips it and it fails with a clear message only if reached).
Remote users need ``torch``, ``transformers``, ``numpy``, ``scikit-learn``, ``safetensors`` and
``tqdm``.

Example::

    >>> from transformers import pipeline
    >>> import sane_hf.pipeline_sane  # registers "weight-sampling" and "weight-embedding"
    >>> pipe = pipeline("weight-sampling", model="runs/sane-digits")          # doctest: +SKIP
    >>> samples = pipe(prompt_models, num_samples=8, seed=0)                  # doctest: +SKIP
    >>> samples[0]["score"], samples[0]["state_dict"].keys()                  # doctest: +SKIP
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .embedding import POOLINGS, embed_models
from .sampling import as_state_dicts, sample_models
from .tokenization_sane import TOKENIZER_FILE, WeightTokenizer

__all__ = [
    "SAMPLING_TASK",
    "EMBEDDING_TASK",
    "WeightSamplingPipeline",
    "WeightEmbeddingPipeline",
    "register_pipelines",
    "save_sane_pipeline",
    "make_self_contained",
]

SAMPLING_TASK = "weight-sampling"
EMBEDDING_TASK = "weight-embedding"
_PACKAGE = "sane_hf"


class _Prompts:
    """One prompt set. Opaque to ``Pipeline.__call__`` (no list splitting) and to its device moves."""

    def __init__(self, items: Any, single: bool = False):
        self.items = items
        self.single = single


def _load_weight_tokenizer(model: Any) -> WeightTokenizer:
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        raise ValueError(
            "the model has no name_or_path to read its WeightTokenizer from; pass weight_tokenizer= "
            "(WeightTokenizer.from_pretrained(model_dir)) when building the pipeline"
        )
    try:
        return WeightTokenizer.from_pretrained(path)
    except OSError as err:
        raise OSError(
            f"the pipeline needs the model's {TOKENIZER_FILE} next to its config.json ({path!r}): {err}. "
            "Save both with save_sane_pipeline(model, tokenizer, dir), or pass weight_tokenizer="
        ) from err


class _WeightPipeline(Pipeline):
    """Shared plumbing: no text tokenizer/processor, a WeightTokenizer, one prompt set per call."""

    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, model: Any, weight_tokenizer: WeightTokenizer | None = None, **kwargs: Any):
        self.weight_tokenizer = weight_tokenizer if weight_tokenizer is not None else _load_weight_tokenizer(model)
        super().__init__(model=model, **kwargs)

    def _window_batch_size(self, value: int | None) -> int:
        return int(value if value is not None else (self._batch_size or 32))

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the model, its WeightTokenizer, the pipeline code and ``custom_pipelines`` (remote code)."""
        super().save_pretrained(save_directory, **kwargs)
        self.weight_tokenizer.save_pretrained(save_directory)
        make_self_contained(save_directory)


class WeightSamplingPipeline(_WeightPipeline):
    """Sample new models around prompt models in SANE's latent space (task ``"weight-sampling"``).

    Call parameters (also accepted when building the pipeline) go to
    :func:`~sane_hf.sampling.sample_models`: ``num_samples``, ``mode``, ``bandwidth``,
    ``bandwidth_scale``, ``score_fn``, ``bootstrap_rounds``, ``keep_top``, ``candidates``,
    ``seed``, ``target_tokenizer``, ``window``, ``halo``; ``batch_size`` is the number of windows
    per forward pass. The output is one list of ``{"state_dict", "score"}``, best first.
    """

    _FORWARD_KEYS = (
        "num_samples", "mode", "bandwidth", "bandwidth_scale", "score_fn", "bootstrap_rounds", "keep_top",
        "candidates", "seed", "target_tokenizer", "window", "halo", "window_batch_size", "progress",
    )

    def _sanitize_parameters(self, **kwargs: Any):
        unknown = sorted(set(kwargs) - set(self._FORWARD_KEYS))
        if unknown:
            raise TypeError(f"weight-sampling got unknown parameters {unknown}; accepted: {list(self._FORWARD_KEYS)}")
        forward = {k: v for k, v in kwargs.items() if v is not None}
        return {}, forward, {}

    def __call__(self, prompt_models: Any, **kwargs: Any) -> list[dict[str, Any]]:
        """Sample ``num_samples`` models around ``prompt_models``; one list of ``{"state_dict", "score"}``, best first.

        ``prompt_models`` is ONE prompt set: a state_dict, an ``nn.Module``, a list of them, zoo
        rows or a zoo split (``datasets.Dataset`` with a ``weights`` column). A list is never split
        into separate calls. Keyword arguments: see :func:`~sane_hf.sampling.sample_models`
        (``batch_size`` = windows per forward pass). ``score_fn`` runs inside the pipeline's
        ``torch.no_grad()``; wrap a training step in ``torch.enable_grad()``.

        Example:

        ```python
        >>> import torch
        >>> from transformers import pipeline
        >>> from sane_hf import SaneModel, WeightTokenizer
        >>> from sane_hf.pipeline_sane import save_sane_pipeline
        >>> from sane_hf.zoo.architectures import create_model
        >>> from sane_hf.zoo.dataset import load_zoo, zoo_model, load_zoo_config
        >>> from sane_hf.zoo.tasks import load_task
        >>> from sane_hf.zoo.train import evaluate_model

        >>> # a trained model folder (sane-hf train) -> a self-contained pipeline folder
        >>> model = SaneModel.from_pretrained("runs/sane-digits")
        >>> tok = WeightTokenizer.from_pretrained("runs/sane-digits")
        >>> save_sane_pipeline(model, tok, "pipes/sane-digits")

        >>> # anywhere (no sane_hf needed): load it as remote code
        >>> pipe = pipeline(model="pipes/sane-digits", trust_remote_code=True)   # task from config.json

        >>> # prompts: the best test models of the zoo
        >>> zoo, config = load_zoo("zoos/digits-cnn"), load_zoo_config("zoos/digits-cnn")
        >>> test = zoo["test"].filter(lambda r: r["epoch"] == config.epochs).sort("test_acc", reverse=True)
        >>> test = test.filter(lambda r: r["activation"] == test[0]["activation"])  # one activation function
        >>> prompts = [zoo_model(config, test[i]) for i in range(min(5, len(test)))]
        >>> arch = dict(image_size=8, activation=test[0]["activation"])

        >>> # score candidates by accuracy on 256 training images, keep the best 8 of 32, bootstrap once
        >>> task = load_task("digits")
        >>> def score_fn(state_dict):
        ...     net = create_model("cnn-s", **arch)
        ...     net.load_state_dict(state_dict)
        ...     net.eval()
        ...     with torch.no_grad():
        ...         return (net(task.x_train[:256]).argmax(-1) == task.y_train[:256]).float().mean().item()
        >>> samples = pipe(prompts, num_samples=8, candidates=32, score_fn=score_fn, bootstrap_rounds=1, seed=0)
        >>> [round(s["score"], 3) for s in samples]          # best first
        >>> net = create_model("cnn-s", **arch)
        >>> net.load_state_dict(samples[0]["state_dict"], strict=True)
        >>> evaluate_model(net, task, "test")              # (accuracy, loss) before any fine-tuning
        ```
        """
        if "batch_size" in kwargs:  # windows per forward pass, not Pipeline's DataLoader batching
            kwargs["window_batch_size"] = kwargs.pop("batch_size")
        return super().__call__(_Prompts(prompt_models), **kwargs)

    def preprocess(self, inputs: _Prompts) -> dict[str, Any]:
        return {"prompts": _Prompts(as_state_dicts(inputs.items))}

    def _forward(self, model_inputs: dict[str, Any], window_batch_size: int | None = None, **params: Any) -> dict[str, Any]:
        samples = sample_models(
            self.model, self.weight_tokenizer, model_inputs["prompts"].items,
            batch_size=self._window_batch_size(window_batch_size), **params,
        )
        return {"samples": samples}

    def postprocess(self, model_outputs: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"state_dict": s.state_dict, "score": s.score} for s in model_outputs["samples"]]


class WeightEmbeddingPipeline(_WeightPipeline):
    """One SANE embedding per input model (task ``"weight-embedding"``), over :func:`~sane_hf.embedding.embed_models`.

    Returns ``{"embedding": ...}`` for a single model and a list of them for a list or a zoo
    split; with ``return_token_latents=True`` each dict also holds ``"token_latents"``
    ``(n_tokens, latent_dim)``. Values are lists of floats, or float32 tensors with
    ``return_tensors=True``. Other parameters: ``pooling``, ``window``, ``halo``, ``batch_size``
    (windows per forward pass).
    """

    _FORWARD_KEYS = ("pooling", "return_token_latents", "window", "halo", "window_batch_size", "normalize")

    def _sanitize_parameters(self, return_tensors: bool | None = None, **kwargs: Any):
        unknown = sorted(set(kwargs) - set(self._FORWARD_KEYS))
        if unknown:
            raise TypeError(
                f"weight-embedding got unknown parameters {unknown}; accepted: {[*self._FORWARD_KEYS, 'return_tensors']}"
            )
        if kwargs.get("pooling") is not None and kwargs["pooling"] not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {kwargs['pooling']!r}")
        post = {} if return_tensors is None else {"return_tensors": bool(return_tensors)}
        return {}, {k: v for k, v in kwargs.items() if v is not None}, post

    def __call__(self, models: Any, **kwargs: Any) -> dict[str, Any] | list[dict[str, Any]]:
        """Embed ``models`` (a state_dict, an ``nn.Module``, a list of them or a zoo split).

        Example:

        ```python
        >>> import sane_hf.pipeline_sane  # registers the tasks in this process
        >>> from transformers import pipeline
        >>> embed = pipeline("weight-embedding", model="runs/sane-digits")
        >>> out = embed([net_a, net_b.state_dict()], return_tensors=True)
        >>> out[0]["embedding"].shape          # (latent_dim,)
        ```
        """
        if "batch_size" in kwargs:
            kwargs["window_batch_size"] = kwargs.pop("batch_size")
        single = isinstance(models, (Mapping, nn.Module))
        return super().__call__(_Prompts(models, single=single), **kwargs)

    def preprocess(self, inputs: _Prompts) -> dict[str, Any]:
        return {"models": _Prompts(as_state_dicts(inputs.items), single=inputs.single)}

    def _forward(self, model_inputs: dict[str, Any], window_batch_size: int | None = None, **params: Any) -> dict[str, Any]:
        models = model_inputs["models"]
        out = embed_models(
            self.model, self.weight_tokenizer, models.items, batch_size=self._window_batch_size(window_batch_size),
            **params,
        )
        return {"embeddings": out.embeddings, "token_latents": out.token_latents, "single": models.single}

    def postprocess(self, model_outputs: dict[str, Any], return_tensors: bool = False) -> Any:
        embeddings, token_latents = model_outputs["embeddings"], model_outputs["token_latents"]

        def convert(t: torch.Tensor) -> Any:
            return t.clone() if return_tensors else t.tolist()

        rows = []
        for i in range(embeddings.shape[0]):
            row = {"embedding": convert(embeddings[i])}
            if token_latents is not None:
                row["token_latents"] = convert(token_latents[i])
            rows.append(row)
        return rows[0] if model_outputs["single"] else rows


# ----------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------


def _register(task: str, cls: type) -> None:
    registered = PIPELINE_REGISTRY.supported_tasks.get(task)
    impl = registered.get("impl") if registered else None
    if impl is not None and impl is not cls and impl.__name__ == cls.__name__ and impl.__module__.endswith("pipeline_sane"):
        # a copy of this file (remote code, or sane_hf's own) already serves the task: keep it, but let
        # this class save its task into config.json like a registered one
        cls._registered_impl = {task: {"impl": cls, "pt": (AutoModel,)}}
        return
    PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=cls, pt_model=AutoModel)


def register_pipelines() -> None:
    """Register ``"weight-sampling"`` and ``"weight-embedding"`` with transformers (done on import)."""
    _register(SAMPLING_TASK, WeightSamplingPipeline)
    _register(EMBEDDING_TASK, WeightEmbeddingPipeline)


register_pipelines()


# ----------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------


def save_sane_pipeline(
    model: Any,
    tokenizer: WeightTokenizer,
    out_dir: str | os.PathLike,
    *,
    tasks: tuple[str, ...] = (SAMPLING_TASK,),
) -> Path:
    """Write a folder that ``pipeline(model=out_dir, trust_remote_code=True)`` loads anywhere.

    Saves the model (weights, ``config.json`` with ``auto_map`` and ``custom_pipelines``, its
    remote code), ``weight_tokenizer.json`` and the pipeline code with everything it imports
    (see the module docstring). ``tasks`` lists the pipelines written into ``custom_pipelines``:
    with only ``"weight-sampling"`` (the default) ``pipeline(model=out_dir, trust_remote_code=True)``
    needs no task name; adding ``"weight-embedding"`` also makes
    ``pipeline("weight-embedding", model=out_dir, trust_remote_code=True)`` work without
    ``sane_hf`` installed, but then the task must always be named.

    Returns the folder.
    """
    unknown = [t for t in tasks if t not in (SAMPLING_TASK, EMBEDDING_TASK)]
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {(SAMPLING_TASK, EMBEDDING_TASK)}, got {tasks}")
    out = Path(out_dir)
    device = next(model.parameters()).device
    classes = {SAMPLING_TASK: WeightSamplingPipeline, EMBEDDING_TASK: WeightEmbeddingPipeline}
    entries: dict[str, Any] = {}
    for task in tasks:
        pipe = classes[task](model=model, weight_tokenizer=tokenizer, device=device, task=task)
        pipe.save_pretrained(out)
        entries.update(model.config.custom_pipelines)
    if len(entries) > 1:  # each save wrote only its own task: merge them into config.json
        config_file = out / "config.json"
        data = json.loads(config_file.read_text())
        data["custom_pipelines"] = entries
        config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    model.config.custom_pipelines = entries
    return out


_MARK = "# made self-contained by sane_hf.pipeline_sane.make_self_contained"


def _sane_module(node: ast.AST) -> str | None:
    """``"x.y"`` for ``from sane_hf.x.y import ...`` / ``import sane_hf.x.y``, ``""`` for bare ``sane_hf``."""
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module]
    elif isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        return None
    for name in names:
        if name == _PACKAGE or name.startswith(_PACKAGE + "."):
            return name[len(_PACKAGE) + 1 :]
    return None


def _module_level(tree: ast.Module) -> set[int]:
    """ids of import nodes executed at import time (module body, incl. plain ``if``/``try`` blocks)."""
    ids: set[int] = set()

    def walk(body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                ids.add(id(stmt))
            elif isinstance(stmt, ast.If):
                walk(stmt.body)
                walk(stmt.orelse)
            elif isinstance(stmt, ast.Try):
                walk(stmt.body)

    walk(tree.body)
    return ids


def make_self_contained(folder: str | os.PathLike) -> list[str]:
    """Rewrite the ``*.py`` files of a saved folder so they import no ``sane_hf`` (remote code).

    For every absolute import of ``sane_hf.<name>`` in a copied file:

    - ``<name>.py`` is in the folder → a relative import ``from .<name> import ...``;
    - executed at import time and ``sane_hf/<name>.py`` is a single-level module of the installed
      package → that file is copied into the folder (and rewritten in turn), then imported relatively;
    - otherwise (imports inside functions of modules that do not travel, e.g. the zoo) → wrapped in
      ``try``/``except ImportError`` raising a message that names the missing package. transformers'
      import check skips ``try`` blocks, so the folder loads; the code path fails only if reached.

    Already self-contained files are left byte for byte. Returns the names of the files changed
    or added. Raises ``RuntimeError`` if a ``sane_hf`` import remains visible to transformers.
    """
    from transformers.dynamic_module_utils import get_imports

    folder = Path(folder)
    changed: list[str] = []
    todo = sorted(p.name for p in folder.glob("*.py"))
    done: set[str] = set()
    while todo:
        name = todo.pop(0)
        if name in done:
            continue
        done.add(name)
        path = folder / name
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        top = _module_level(tree)
        guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for s in t.body for n in ast.walk(s)}
        lines = source.splitlines(keepends=True)
        edits: list[tuple[int, int, list[str]]] = []  # (first line, last line) 0-based inclusive -> new lines
        for node in ast.walk(tree):
            module = _sane_module(node)
            if module is None:
                continue
            target = module.split(".")[0] if module else ""
            bundled = bool(target) and "." not in module and (folder / f"{target}.py").exists()
            if id(node) in guarded and not bundled:
                continue  # already invisible to transformers' import check
            first, last = node.lineno - 1, node.end_lineno - 1
            text = "".join(lines[first : last + 1])
            indent = lines[first][: node.col_offset]
            if indent.strip() or not text[node.col_offset :].lstrip().startswith(("from", "import")):
                raise RuntimeError(f"{name}:{node.lineno}: cannot rewrite an import that shares its line")
            if not bundled and target and "." not in module and id(node) in top and isinstance(node, ast.ImportFrom):
                try:
                    spec = importlib.util.find_spec(f"{_PACKAGE}.{target}")
                except ImportError:  # sane_hf itself is not installed (re-saving remote code)
                    spec = None
                if spec is not None and spec.origin and Path(spec.origin).name == f"{target}.py":
                    shutil.copyfile(spec.origin, folder / f"{target}.py")
                    changed.append(f"{target}.py")
                    todo.append(f"{target}.py")
                    bundled = True
            if bundled and isinstance(node, ast.ImportFrom):
                new = re.sub(rf"\bfrom\s+{_PACKAGE}\.{target}\s+import", f"from .{target} import", text, count=1)
                edits.append((first, last, [new]))
            else:
                body = [indent + "    " + line[len(indent) :] if line.startswith(indent) else line
                        for line in lines[first : last + 1]]
                if body and not body[-1].endswith("\n"):
                    body[-1] += "\n"
                message = (f"this code path needs the sane-hf package ({_PACKAGE}.{module or ''}); "
                           "install it with: pip install sane-hf")
                edits.append((first, last, [
                    f"{indent}try:  {_MARK}\n", *body,
                    f"{indent}except ImportError as _sane_hf_error:\n",
                    f"{indent}    raise ImportError({message!r}) from _sane_hf_error\n",
                ]))
        if edits:
            for first, last, new in sorted(edits, reverse=True):
                lines[first : last + 1] = new
            path.write_text("".join(lines), encoding="utf-8")
            if name not in changed:
                changed.append(name)
    for path in sorted(folder.glob("*.py")):
        if _PACKAGE in get_imports(path):
            raise RuntimeError(f"{path.name} still imports {_PACKAGE} outside a try block; it cannot travel as remote code")
    return changed
