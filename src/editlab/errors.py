"""Exception types raised by editlab. Every user-facing failure is one of these, with a message that
names the offending field, file, record or option."""

from __future__ import annotations


class EditlabError(Exception):
    """Base class for every error editlab raises on purpose."""


class EditRequestError(EditlabError, ValueError):
    """An EditRequest was built from invalid fields (the message names the field)."""


class ModelNotFoundError(EditlabError):
    """A model name/path could not be resolved to local weights."""


class UnsupportedArchitectureError(EditlabError):
    """The model's config.model_type has no ArchSpec."""


class HparamsError(EditlabError, ValueError):
    """Unknown hyper-parameter key or out-of-range value."""


class UnknownMethodError(EditlabError, KeyError):
    """No editing method is registered under the given name."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class DataFormatError(EditlabError, ValueError):
    """A data file is missing, is not valid JSON, or a record lacks a field."""


class StatsCacheError(EditlabError):
    """A cached statistics file is corrupt or does not match what was asked for."""


class EditMismatchError(EditlabError):
    """A saved edit does not belong to the model it is being loaded onto."""


class EditStackError(EditlabError):
    """An edit was restored or extended out of stack order (only the newest active edit can be)."""


class CheckpointError(EditlabError):
    """A learned editor's checkpoint is missing, damaged or was trained for another model or data."""
