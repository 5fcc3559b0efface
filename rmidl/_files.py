"""Why a file could not be opened, in the same words for every rmidl error that names a file."""

from __future__ import annotations

__all__ = ["open_failure"]

_REASONS: tuple[tuple[type[OSError], str], ...] = (
    (FileNotFoundError, "does not exist"),
    (IsADirectoryError, "is a directory"),
    (PermissionError, "cannot be read: permission denied"),
)


def open_failure(error: BaseException) -> str | None:
    """The reason to append to a file's name for a missing, directory or forbidden path; None otherwise."""
    for kind, reason in _REASONS:
        if isinstance(error, kind):
            return reason
    return None
