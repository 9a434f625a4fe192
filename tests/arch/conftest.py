"""The tiny zoo of tests/families, shared (one build per session)."""

from tests.families.conftest import zoo_checkpoint  # noqa: F401  (a fixture, registered by import)
