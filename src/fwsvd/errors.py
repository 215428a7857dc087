"""Exceptions a user can cause. The CLI turns each into one line and a non-zero exit."""

from __future__ import annotations


class FwsvdError(ValueError):
    """A problem with the user's input (model, data, options) that they can fix.

    The message names the bad value and the fix, in one line.
    """


class DataError(FwsvdError):
    """The data file or dataset cannot be used as given."""


class ModelError(FwsvdError):
    """The model folder or hub id cannot be used as given."""
