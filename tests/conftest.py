"""Shared fixtures: seeded tiny models of every family the tokenizer must handle."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class TinyCNNBN(nn.Module):
    """A CNN with BatchNorm (running stats + integer num_batches_tracked buffer)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _seeded(builder, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return builder()


def make_mlp() -> nn.Module:
    from sane_hf.zoo.architectures import create_model

    return create_model("mlp", image_size=8, seed=0)


def make_cnn() -> nn.Module:
    from sane_hf.zoo.architectures import create_model

    return create_model("cnn-s", image_size=8, seed=0)


def make_cnn_bn() -> nn.Module:
    model = _seeded(TinyCNNBN)
    # give the BN layers non-trivial running stats and a non-zero counter
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 1, 8, 8))
    return model.eval()


def make_resnet18(width: int = 8) -> nn.Module:
    from sane_hf.zoo.architectures import create_model

    model = create_model("resnet18", in_channels=3, image_size=32, width=width, seed=0)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 16, 16))
    return model.eval()


def make_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=32, type_vocab_size=2,
    )
    return BertModel(config).eval()


TINY_MODEL_BUILDERS = {
    "mlp": make_mlp,
    "cnn": make_cnn,
    "cnn_bn": make_cnn_bn,
    "resnet18": make_resnet18,
    "bert": make_bert,
}


@pytest.fixture(params=sorted(TINY_MODEL_BUILDERS))
def tiny_model(request) -> nn.Module:
    """Each tiny model family in turn (parametrized)."""
    return TINY_MODEL_BUILDERS[request.param]()


@pytest.fixture
def mlp() -> nn.Module:
    return make_mlp()


@pytest.fixture
def cnn() -> nn.Module:
    return make_cnn()


@pytest.fixture
def cnn_bn() -> nn.Module:
    return make_cnn_bn()


@pytest.fixture
def resnet18() -> nn.Module:
    return make_resnet18()


@pytest.fixture
def bert() -> nn.Module:
    return make_bert()


# ----------------------------------------------------------------------------------------------
# tiny zoos shared by the training, data, probe and sample tests (built once per session)

TINY_ZOO = dict(task="digits", arch="cnn-s", num_models=6, epochs=2, train_subset=128, eval_subset=64,
                models_per_chunk=6)  # fmt: skip


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory):
    """A raw digits cnn-s zoo (6 models, epochs 0..2) as `sane-hf zoo build` writes it."""
    from sane_hf.zoo.dataset import ZooConfig, build_zoo

    out = tmp_path_factory.getbasetemp() / "tiny-digits-cnn-zoo"
    build_zoo(ZooConfig(**TINY_ZOO), out, progress=False, cache_dir=str(tmp_path_factory.getbasetemp() / "hf-cache"))
    return out


@pytest.fixture(scope="session")
def zoo_and_model(tmp_path_factory):
    """A 9-model digits zoo (3 models per split, the fewest a probe accepts) and an untrained tiny SANE
    saved with its fitted tokenizer: ``root/zoo`` and ``root/sane``."""
    import datasets

    from sane_hf.configuration_sane import SaneConfig
    from sane_hf.modeling_sane import SaneModel
    from sane_hf.zoo.dataset import ZooConfig, build_zoo, fit_tokenizer_on_zoo

    root = tmp_path_factory.mktemp("zoo-and-sane")
    old_cache = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = root / "hf-cache"
    config = ZooConfig(task="digits", arch="cnn-s", num_models=9, epochs=2, train_subset=128, eval_subset=64,
                       models_per_chunk=9, split_fractions=(0.34, 0.33, 0.33))
    zoo = build_zoo(config, root / "zoo", progress=False)
    tok = fit_tokenizer_on_zoo(zoo, token_size=16)
    torch.manual_seed(0)
    model = SaneModel(SaneConfig(token_size=16, d_model=32, num_encoder_layers=1, num_decoder_layers=1, latent_dim=8,
                                 projection_dim=8, window_size=32, halo_size=4))
    model.save_pretrained(root / "sane")
    tok.save_pretrained(root / "sane")
    yield root
    datasets.config.HF_DATASETS_CACHE = old_cache
