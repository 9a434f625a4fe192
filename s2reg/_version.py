"""s2reg version."""

__version__ = "0.1.0"
