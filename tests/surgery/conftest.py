"""The tiny zoo of tests/families, shared (one build per session): permute's MoE and encoder cases use it."""

from tests.families.conftest import zoo_checkpoint  # noqa: F401  (a fixture, registered by import)
