"""sane-hf: SANE (Sequential Autoencoder for Neural Embeddings) for weight-space learning.

Public names are imported lazily so that ``import sane_hf`` stays fast and a command that only
needs the tokenizer does not import the trainer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sane_hf._version import __version__

_LAZY: dict[str, str] = {
    # tokenization
    "WeightTokenizer": "sane_hf.tokenization_sane",
    "WeightTokens": "sane_hf.tokenization_sane",
    # model
    "SaneConfig": "sane_hf.configuration_sane",
    "SaneModel": "sane_hf.modeling_sane",
    # zoo
    "ZooConfig": "sane_hf.zoo.dataset",
    "build_zoo": "sane_hf.zoo.dataset",
    "load_zoo": "sane_hf.zoo.dataset",
    "tokenize_zoo": "sane_hf.zoo.dataset",
    # training
    "SaneTrainingConfig": "sane_hf.training",
    "train_sane": "sane_hf.training",
    # embeddings, probing, sampling
    "EmbeddingOutput": "sane_hf.embedding",
    "embed_models": "sane_hf.embedding",
    "probe_properties": "sane_hf.probing",
    "SampledModel": "sane_hf.sampling",
    "sample_models": "sane_hf.sampling",
    "WeightSamplingPipeline": "sane_hf.pipeline_sane",
    "WeightEmbeddingPipeline": "sane_hf.pipeline_sane",
}

__all__ = [
    "__version__",
    "WeightTokenizer",
    "WeightTokens",
    "SaneConfig",
    "SaneModel",
    "ZooConfig",
    "build_zoo",
    "load_zoo",
    "tokenize_zoo",
    "SaneTrainingConfig",
    "train_sane",
    "EmbeddingOutput",
    "embed_models",
    "probe_properties",
    "SampledModel",
    "sample_models",
    "WeightSamplingPipeline",
    "WeightEmbeddingPipeline",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sane_hf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from sane_hf.configuration_sane import SaneConfig
    from sane_hf.embedding import EmbeddingOutput, embed_models
    from sane_hf.modeling_sane import SaneModel
    from sane_hf.pipeline_sane import WeightEmbeddingPipeline, WeightSamplingPipeline
    from sane_hf.probing import probe_properties
    from sane_hf.sampling import SampledModel, sample_models
    from sane_hf.tokenization_sane import WeightTokenizer, WeightTokens
    from sane_hf.training import SaneTrainingConfig, train_sane
    from sane_hf.zoo.dataset import ZooConfig, build_zoo, load_zoo, tokenize_zoo
