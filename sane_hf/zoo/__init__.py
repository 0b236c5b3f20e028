"""Model zoos: offline tasks, architectures, population training, datasets, importers."""

from sane_hf.zoo.architectures import create_model, list_architectures, register_architecture

__all__ = ["create_model", "list_architectures", "register_architecture"]
