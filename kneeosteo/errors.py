"""One root for every error kneeosteo expects to happen, so the CLI and the web app catch one type.

A :class:`KneeosteoError` is a user's or a file's fault (a missing folder, a bad setting, a
corrupt image, weights that are not there), never a bug: its message names the culprit on one
line and says what to do. ``exit_code`` is what the command line exits with: 2 for a bad
invocation (a setting out of range, an unknown choice), 1 for everything else. Anything that is
not a ``KneeosteoError`` is a bug and keeps its traceback.

The tree, lowest layer first::

    KneeosteoError
    ├── ConfigError           a setting is unknown, out of range or impossible here (exit 2)
    ├── DataError             a data set as a whole: missing folder, one class only, empty partition
    │   ├── ArrayError        labels, scores or probabilities of the wrong shape, range or length (also a ValueError)
    │   └── ImageReadError    one file could not be decoded (.path, .reason); batches skip it
    │       └── NotAnImageError   plainly not an image: skipped with a warning
    ├── ModelError            a model cannot be found, loaded or used
    │   ├── BackboneWeightsError  pretrained weights missing or not fitting the backbone
    │   ├── CheckpointError       a run folder's weights or config are missing, altered or inconsistent
    │   └── InferenceError        a model cannot serve a prediction (engine, export, run folder)
    └── OutputError           an output folder or file that cannot be written (also an OSError)
"""

from __future__ import annotations

__all__ = [
    "ArrayError",
    "BackboneWeightsError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ImageReadError",
    "InferenceError",
    "KneeosteoError",
    "ModelError",
    "NotAnImageError",
    "OutputError",
]


class KneeosteoError(Exception):
    """An expected failure with a one-line message; the CLI prints it and exits ``exit_code``."""

    exit_code = 1


class ConfigError(KneeosteoError, ValueError):
    """A setting is unknown, out of range, or not possible on this machine (bad usage: exit 2)."""

    exit_code = 2


class DataError(KneeosteoError):
    """A problem with the data set as a whole (missing folder, one class only, empty partition)."""


class ArrayError(DataError, ValueError):
    """Arrays handed to a metric or a trust estimator (labels, scores, probabilities, bounds) of the
    wrong shape, range or length; raised by :mod:`kneeosteo.utils.arrays` only. Also a ``ValueError``,
    as numpy's and scikit-learn's own checks are."""


class ImageReadError(DataError):
    """A file we tried to read could not be decoded; callers report it and skip the file."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep picklable across worker processes
        return type(self), (self.path, self.reason)


class NotAnImageError(ImageReadError):
    """The file is plainly not an image (wrong suffix, no DICOM preamble): skip with a warning."""


class ModelError(KneeosteoError):
    """A model cannot be found, loaded or used."""


class BackboneWeightsError(ModelError):
    """Pretrained weights could not be found or do not fit the backbone. ``summary`` is a short
    form for tables (the message itself also names where we looked and the remedies)."""

    def __init__(self, message: str, summary: str | None = None):
        super().__init__(message)
        self.summary = summary or message


class CheckpointError(ModelError):
    """A checkpoint directory is missing, corrupt, or inconsistent with its config."""


class InferenceError(ModelError):
    """A model could not be found, loaded or used for prediction."""


class OutputError(KneeosteoError, OSError):
    """An output folder or file that cannot be written; the message names it, on one line."""
