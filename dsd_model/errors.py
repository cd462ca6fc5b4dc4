"""Errors raised for bad input.

Every client fault is an `InputError`: it names the field, the offending value and the limit, so each transport can
map it to a 4xx / INVALID_ARGUMENT without parsing messages.
"""

from __future__ import annotations


class InputError(ValueError):
    """A request or argument value outside its documented limits."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class WeightsError(ValueError):
    """Model or adapter weights that are missing, malformed or do not fit the model."""
