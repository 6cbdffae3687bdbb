"""The one base class of errors that mean "the input is wrong, and here is the fix".

Every stage and CLI catches :class:`UserError`, prints its message (which names the file or key and
the fix) without a traceback, and exits with :data:`EXIT_USER_ERROR`. Anything else is a bug and keeps
its traceback. Subclasses live next to the code that raises them (``ConfigError`` in
:mod:`ctxseg.config`, ``DownloadError`` and ``DataValidationError`` in :mod:`ctxseg.data`, ...).
"""
from __future__ import annotations

__all__ = ["UserError", "EXIT_USER_ERROR", "EXIT_INTERRUPTED"]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Bad input: params, data, archives, checksums, downloads, model files. Exit code 2, no traceback."""
