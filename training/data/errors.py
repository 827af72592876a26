"""The one exception every loader raises for unusable data."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset file, folder, field or class is missing or unusable. The message names the
    file or field, because the CLI prints it as the single line a user sees."""
