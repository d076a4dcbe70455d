"""Exception types raised by editlab. Every user-facing failure is one of these, with a message that
names the offending field, file, record or option.

All derive from `EditlabError`, so `except EditlabError` catches every mistake editlab reports on
purpose (the CLI turns exactly these into one `error:` line and exit status 2). Each also derives from
the built-in exception a Python user would reach for first: bad values are `ValueError`s, unknown names
`KeyError`/`LookupError`s, unusable files `OSError`s. The tree:

    EditlabError
    ├── EditRequestError (ValueError)          a request field is invalid
    │   └── PromptTooLongError                 a prompt does not fit the model's context
    ├── HparamsError (ValueError)              unknown hyper-parameter, wrong type, out of range
    ├── OptionError (ValueError)               a run option: mode, batch size, checkpoints, --set syntax
    │   ├── DtypeError                         unknown dtype name
    │   └── DeviceError                        device unknown or absent on this machine/build
    ├── UnknownMethodError (KeyError)          no such editing method
    ├── ModelNotFoundError (OSError)           a model name/path resolves to no local weights
    ├── UnsupportedArchitectureError (ValueError)
    ├── DataFormatError (ValueError)           a data file is missing, malformed or lacks a field
    ├── OutputPathError (OSError)              an output file/folder cannot be written
    ├── StoreError (OSError)                   a result database is unusable
    │   ├── StoreCorruptError                  ... damaged (says how to recover)
    │   └── StoreBusyError                     ... locked by another writer for too long
    ├── StatsCacheError                        cached statistics are corrupt
    ├── EditMismatchError (ValueError)         a saved edit does not fit this model
    │   └── EditIntegrityError                 a saved edit's files are damaged, truncated or missing
    ├── EditStackError                         restore/extend out of stack order
    ├── CheckpointError                        a learned editor's checkpoint is missing or damaged
    └── ExecutorError (RuntimeError)           the Ray cluster is unreachable, lacks editlab, or lost a task too often
"""

from __future__ import annotations


class EditlabError(Exception):
    """Base class for every error editlab raises on purpose."""


class EditRequestError(EditlabError, ValueError):
    """An EditRequest was built from invalid fields (the message names the field)."""


class PromptTooLongError(EditRequestError):
    """A prompt (with its target) is longer than the model's context window."""


class ModelNotFoundError(EditlabError, OSError):
    """A model name/path could not be resolved to local weights (and fetching was not allowed)."""

    def __str__(self) -> str:  # OSError formats (errno, strerror) pairs; keep the plain message
        return str(self.args[0]) if self.args else ""


class UnsupportedArchitectureError(EditlabError, ValueError):
    """The model's config.model_type has no ArchSpec."""


class HparamsError(EditlabError, ValueError):
    """Unknown hyper-parameter key or out-of-range value."""


class OptionError(EditlabError, ValueError):
    """A run option (mode, batch size, checkpoints, `--set` syntax, ...) is invalid."""


class DtypeError(OptionError):
    """A dtype name editlab does not know."""


class DeviceError(OptionError):
    """A device string that torch cannot parse, or a device this machine or torch build lacks."""


class UnknownMethodError(EditlabError, KeyError):
    """No editing method is registered under the given name."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class DataFormatError(EditlabError, ValueError):
    """A data file is missing, is not valid JSON, or a record lacks a field."""


class OutputPathError(EditlabError, OSError):
    """An output file or folder cannot be created or written (checked before the work that fills it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StoreError(EditlabError, OSError):
    """The database file is not an editlab store, is from an incompatible version, or is unusable."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StoreCorruptError(StoreError):
    """The database file is damaged; the message names the file and the recovery step."""


class StoreBusyError(StoreError):
    """Another process held the database locked for longer than the busy timeout and its retries."""


class StatsCacheError(EditlabError):
    """A cached statistics file is corrupt or does not match what was asked for."""


class EditMismatchError(EditlabError, ValueError):
    """A saved edit does not belong to the model it is being loaded onto."""


class EditIntegrityError(EditMismatchError):
    """A saved edit's files are missing, truncated, altered or contradict their manifest."""


class EditStackError(EditlabError):
    """An edit was restored or extended out of stack order (only the newest active edit can be)."""


class CannotExtendError(EditStackError, HparamsError, EditRequestError):
    """This edit cannot extend the `on=` edit it names: another layer, module or adapter shape, a setting
    that must stay fixed within a sequence, or a prompt the sequence already holds. Applied without `on=`
    it would go on top as a new edit (the playground does that by default). Nothing was changed. It is
    also an `EditStackError`, `HparamsError` or `EditRequestError`, whichever names the cause."""


class BusyError(EditlabError, RuntimeError):
    """The playground is applying another edit; try again when it has finished (nothing was changed)."""


class CheckpointError(EditlabError):
    """A learned editor's checkpoint is missing, damaged or was trained for another model or data."""


class ExecutorError(EditlabError, RuntimeError):
    """A distributed run cannot go on: Ray is not installed, the cluster cannot be reached or lacks the
    resources or the editlab package, or a task failed on its workers more often than allowed."""
