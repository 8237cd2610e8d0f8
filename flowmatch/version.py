"""The package version, on the bottom floor: a checkpoint records which version wrote it."""

__version__ = "0.1.0"
