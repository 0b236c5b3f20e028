"""transformers pipelines for SANE: ``"weight-sampling"`` and ``"weight-embedding"``.

Thin shells over :func:`~sane_hf.sampling.sample_models` and
:func:`~sane_hf.embedding.embed_models`: ``preprocess`` turns the inputs (state_dicts,
``nn.Module``\\ s, a list of them, zoo rows or a zoo split) into state_dicts, ``_forward`` runs the
model (window batching happens inside), ``postprocess`` returns plain Python objects.
Neither pipeline loads a text tokenizer or processor; the :class:`WeightTokenizer` is read from
the model's folder (local, or the Hub cache) — ``weight_tokenizer.json`` next to ``config.json``.

Remote code. :func:`sane_hf.hub.save_sane_pipeline` (or ``pipe.save_pretrained(dir)`` on a
pipeline made from this module) writes a folder that loads in a fresh Python without ``sane_hf``::

    dir/
    ├── config.json              SaneConfig + auto_map (AutoConfig/AutoModel) + custom_pipelines
    ├── model.safetensors
    ├── weight_tokenizer.json
    ├── configuration_sane.py    remote code of the model (copied by SaneModel.save_pretrained)
    ├── modeling_sane.py
    ├── pipeline_sane.py         this file: the pipelines (copied by Pipeline.save_pretrained)
    ├── sampling.py              ... with every file it imports relatively, recursively
    ├── adaptation.py
    ├── embedding.py
    ├── latent_kde.py
    ├── state_dict_io.py
    ├── tokenization_layout.py
    └── tokenization_sane.py

so that ``pipeline(model=dir, trust_remote_code=True)`` and
``pipeline("weight-sampling", model=dir, trust_remote_code=True)`` both work. transformers copies
a pipeline's file and, recursively, the files it imports *relatively* (``from .x import``), byte
for byte. The modules that travel therefore import each other only relatively and never import
``sane_hf`` absolutely: the same files work as ``sane_hf.x`` and as Hub remote code. Remote users
need ``torch``, ``transformers``, ``numpy``, ``scikit-learn``, ``safetensors`` and ``tqdm``.

Example::

    >>> from transformers import pipeline
    >>> import sane_hf.pipeline_sane  # registers "weight-sampling" and "weight-embedding"
    >>> pipe = pipeline("weight-sampling", model="runs/sane-digits")          # doctest: +SKIP
    >>> samples = pipe(prompt_models, num_samples=8, seed=0)                  # doctest: +SKIP
    >>> samples[0]["score"], samples[0]["state_dict"].keys()                  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping
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
]

SAMPLING_TASK = "weight-sampling"
EMBEDDING_TASK = "weight-embedding"


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
            "Save both with sane_hf.hub.save_sane_pipeline(model, tokenizer, dir), or pass weight_tokenizer="
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
        >>> from sane_hf.hub import save_sane_pipeline
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
