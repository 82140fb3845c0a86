"""The package version: the one place it is written (pyproject.toml reads it for the metadata)."""

__version__ = "0.1.0"
