"""One exception tree for the whole platform, so callers can catch at the depth they need.

    LeukoflowError
    ├── ConfigError            a key, value or file of the configuration is wrong
    ├── StorageError           an object store (local folder or S3) cannot be read or written
    ├── DataValidationError    a batch or image does not meet the contract (layout, suite)
    ├── TrainingError          a model could not be built, trained or evaluated
    ├── RegistryError          MLflow is unreachable or an alias/version is missing
    └── PublishError           the Bento could not be built, started or smoke-tested
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import TypeVar

__all__ = [
    "ConfigError",
    "DataValidationError",
    "LeukoflowError",
    "PublishError",
    "RegistryError",
    "StorageError",
    "TrainingError",
    "lookup",
]

T = TypeVar("T")


class LeukoflowError(Exception):
    """Base of every error leukoflow raises on purpose; the message says what and where."""


class ConfigError(LeukoflowError):
    """A configuration key, value or file is invalid."""


class StorageError(LeukoflowError):
    """An object store cannot be reached, read or written."""


class DataValidationError(LeukoflowError):
    """Input data does not match any known layout or breaks the data contract."""


class TrainingError(LeukoflowError):
    """A model could not be built, trained or evaluated."""


class RegistryError(LeukoflowError):
    """The model registry is unreachable, or a model/alias/version is missing."""


class PublishError(LeukoflowError):
    """A service could not be built, started or passed its smoke test."""


def lookup(table: Mapping[str, T], name: str, what: str) -> T:
    """``table[name]``; an unknown name is a :class:`ConfigError` that suggests the nearest
    valid one and lists them all (one wording for every table of choices)."""
    try:
        return table[name]
    except KeyError:
        near = difflib.get_close_matches(str(name), list(table), n=1, cutoff=0.3)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise ConfigError(f"unknown {what} '{name}': {hint}"
                          f"valid names: {', '.join(table)}") from None
