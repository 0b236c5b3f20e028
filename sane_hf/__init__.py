"""sane-hf: SANE (Sequential Autoencoder for Neural Embeddings) for weight-space learning.

Public names are imported lazily so that ``import sane_hf`` stays fast and a command that only
needs the tokenizer does not import the trainer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sane_hf._lazy import lazy_exports
from sane_hf._version import __version__

_LAZY: dict[str, str] = {
    # tokenization
    "WeightTokenizer": "sane_hf.tokenization_sane",
    "WeightTokens": "sane_hf.tokenization_sane",
    # model
    "SaneConfig": "sane_hf.configuration_sane",
    "SaneModel": "sane_hf.modeling_sane",
    # zoo
    "ZooConfig": "sane_hf.zoo.config",
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


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


if TYPE_CHECKING:  # pragma: no cover
    from sane_hf.configuration_sane import SaneConfig
    from sane_hf.embedding import EmbeddingOutput, embed_models
    from sane_hf.modeling_sane import SaneModel
    from sane_hf.pipeline_sane import WeightEmbeddingPipeline, WeightSamplingPipeline
    from sane_hf.probing import probe_properties
    from sane_hf.sampling import SampledModel, sample_models
    from sane_hf.tokenization_sane import WeightTokenizer, WeightTokens
    from sane_hf.training import SaneTrainingConfig, train_sane
    from sane_hf.zoo.config import ZooConfig
    from sane_hf.zoo.dataset import build_zoo, load_zoo, tokenize_zoo
