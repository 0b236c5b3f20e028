"""The version of sane-hf (the one of ``pyproject.toml``), importable without the package's public API."""

__version__ = "0.1.0"
