"""Errors of a training run. Each message names what is wrong and what to do about it."""

from __future__ import annotations


class TrainingError(Exception):
    """Base of every error a training run raises on purpose."""


class DatasetError(TrainingError, ValueError):
    """The dataset directory is missing, empty, or holds a record or image that cannot be read."""


class IncompatibleModelError(TrainingError, ValueError):
    """The base pipeline is not a DSD pipeline that can be trained (layout, adapters already loaded)."""


class CheckpointError(TrainingError, ValueError):
    """A checkpoint to resume from is missing, damaged, or was written with different settings."""


class TrainingOutOfMemoryError(TrainingError, RuntimeError):
    """The device ran out of memory; the message lists the settings that lower the footprint."""
