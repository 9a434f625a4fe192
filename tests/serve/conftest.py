"""The serving tests use the families suite's tiny zoo."""

from ..families.conftest import zoo_checkpoint  # noqa: F401  (a fixture, found by name)
