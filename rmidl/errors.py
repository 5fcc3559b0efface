"""rmidl's exception tree, and its registration with Pyro5 so remote errors arrive as these classes."""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationError",
    "BankError",
    "BankNotFound",
    "BudgetExceeded",
    "ClusterError",
    "ConfigError",
    "DTypeError",
    "DataPlaneError",
    "ImageNotFound",
    "ImageReadError",
    "InputError",
    "KernelTooLarge",
    "MissingFile",
    "NonFiniteInput",
    "OptionError",
    "RegistryError",
    "RmidlError",
    "ShapeError",
    "SharedMemoryUnavailable",
    "TaskFailed",
    "WorkerBusy",
    "WorkerLost",
    "WorkerNotFound",
    "register_with_pyro",
]


class RmidlError(Exception):
    """Base of every error rmidl raises on purpose."""


class InputError(RmidlError, ValueError):
    """The caller's input is wrong; retrying the same input elsewhere cannot help."""


class ShapeError(InputError):
    """Wrong ndim, empty array, or channel count that does not match."""


class KernelTooLarge(InputError):
    """A kernel does not fit the image in valid mode."""


class NonFiniteInput(InputError):
    """NaN or Inf in the image or the kernels."""


class DTypeError(InputError, TypeError):
    """A dtype rmidl refuses (bool, complex, object, ...)."""


class OptionError(InputError):
    """A bad option value: mode, engine, thread or worker count, address, ..."""


class ImageReadError(InputError):
    """An image file that is missing, unreadable, corrupt or of an unsupported format."""


class BankError(InputError):
    """A kernel-bank spec or file that cannot be turned into a (K, kh, kw[, C]) bank."""


class MissingFile(FileNotFoundError):
    """Mixin: also a FileNotFoundError (with errno and filename set), as open() would raise; str() stays
    rmidl's one-line message, where OSError would print "[Errno 2] ..."."""

    __str__ = BaseException.__str__


class ImageNotFound(ImageReadError, MissingFile):
    """An image file that does not exist."""


class BankNotFound(BankError, MissingFile):
    """A kernel-bank file that does not exist."""


class BudgetExceeded(InputError):
    """A request whose memory or message size exceeds the configured budget (refused before work)."""


class ConfigError(RmidlError):
    """An unknown or malformed configuration name or value."""


class ClusterError(RmidlError):
    """The cluster could not do the work (not the input's fault)."""


class RegistryError(ClusterError):
    """The name server is unreachable, or its address is malformed."""


class WorkerNotFound(ClusterError):
    """No worker is registered under the requested name."""


class WorkerLost(ClusterError):
    """A worker died or stopped answering."""


class WorkerBusy(ClusterError):
    """A worker refused a task for now (its task slots or its memory are taken by others' tasks): run it
    elsewhere or later; it says nothing about the task."""


class DataPlaneError(ClusterError):
    """A worker answers, but one way of moving data to or from it does not work (its bulk channel does not
    deliver, it cannot map our shared memory): the caller moves that worker's data another way."""


class SharedMemoryUnavailable(DataPlaneError):
    """A worker cannot map the caller's shared block (another user, another pid namespace, no capability):
    the caller sends that worker its data over TCP instead."""


class TaskFailed(ClusterError):
    """A task failed on too many workers; the job is abandoned."""


class AuthenticationError(ClusterError):
    """A connection was refused: missing or wrong cluster secret, or TLS verification failed."""


def _all_error_classes() -> list[type[RmidlError]]:
    classes: list[type[RmidlError]] = []
    pending: list[type[RmidlError]] = [RmidlError]
    while pending:
        cls = pending.pop()
        classes.append(cls)
        pending.extend(cls.__subclasses__())
    return classes


def _rebuild(classname: str, data: dict[str, Any]) -> RmidlError:
    cls = {f"{c.__module__}.{c.__qualname__}": c for c in _all_error_classes()}[classname]
    error = cls(*data.get("args", ()))
    for name, value in (data.get("attributes") or {}).items():
        setattr(error, name, value)
    return error


def register_with_pyro() -> None:
    """Let Pyro5 rebuild rmidl errors raised on a worker as the same classes in the caller."""
    from Pyro5.api import register_dict_to_class

    for cls in _all_error_classes():
        register_dict_to_class(f"{cls.__module__}.{cls.__qualname__}", _rebuild)
