"""Errors a user can cause and fix, and the command-line wrapper that shows them as one line.

Every error a user can cause (a bad config value, a missing or wrong weights file, a corrupt checkpoint, a full
disk, an unreachable hub id) should reach them as::

    error: <what is wrong>; <what is accepted or what to do>

with exit status 2 and no traceback; only a bug in rdt itself shows a traceback. Library code raises a
:class:`UserError` subclass (or one of the registered error types of other modules, see
:data:`USER_ERROR_TYPES`), whose ``str()`` is that one line; :func:`run_cli` turns them into the message and the
exit status. The ComfyUI nodes show ``str(exc)`` of the same exceptions, so they read the same messages.

``--debug`` on the command line or ``RDT_DEBUG=1`` in the environment prints the traceback as well.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
import traceback
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

__all__ = [
    "UserError",
    "DiskFullError",
    "ModelLoadError",
    "InputError",
    "MissingFileError",
    "hub_unreachable",
    "as_user_error",
    "USER_ERROR_TYPES",
    "EXIT_USER_ERROR",
    "user_error_types",
    "is_user_error",
    "is_disk_full",
    "one_line",
    "format_bytes",
    "run_cli",
    "debug_enabled",
]

EXIT_USER_ERROR = 2

#: errno values of OSErrors that come from the user's files or machine (full disk, permissions, missing
#: paths), not from a bug: shown as one line.
USER_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "ENOENT", "ENOTDIR", "EISDIR", "ENAMETOOLONG", "EIO",
        "EEXIST", "ENOTEMPTY", "EXDEV", "EFBIG",
    ) if hasattr(errno, name)
)
_DISK_FULL_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EFBIG") if hasattr(errno, n))


def is_disk_full(exc: BaseException) -> bool:
    """True for an OSError meaning the device or quota is full (ENOSPC, EDQUOT, EFBIG)."""
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS


class UserError(Exception):
    """An error the user caused and can fix. ``str()`` is one line: what is wrong; what is accepted / what
    to do. Subclass it (together with a builtin such as ValueError or OSError where callers expect one)."""


class DiskFullError(UserError, OSError):
    """No space left on the device (``errno`` ENOSPC). ``needed`` / ``free``: bytes, where known."""

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None, needed: int | None = None,
                 free: int | None = None, errno_: int = errno.ENOSPC) -> None:
        OSError.__init__(self, errno_, message)
        self.message = message
        self.filename = None if path is None else os.fspath(path)
        self.needed = needed
        self.free = free

    def __str__(self) -> str:
        return self.message


class InputError(UserError, ValueError):
    """A file or value given by the user is not what is accepted (the message says what is)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist (or lacks a required part)."""


class ModelLoadError(UserError, OSError):
    """A model (base model, reward model) cannot be loaded from the given path or hub id."""

    def __init__(self, message: str) -> None:
        OSError.__init__(self, errno.ENOENT, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@contextmanager
def as_user_error() -> Iterator[None]:
    """Re-raise a ValueError / FileNotFoundError of the wrapped checks of user input as :class:`InputError` /
    :class:`MissingFileError` with the same message (as one line), chained to the original."""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError as exc:
        raise MissingFileError(one_line(exc)) from exc
    except ValueError as exc:
        raise InputError(one_line(exc)) from exc


#: Exception types of other modules that are user errors although they do not derive from UserError, as
#: ``"module:Class"``; ``"module:*"`` takes every exception class defined in that module except those listed
#: in :data:`NOT_USER_ERRORS`. Resolved lazily, so importing this module imports nothing heavy.
USER_ERROR_TYPES: list[str] = [
    "rdt_lib.settings:ConfigError",
    "rdt_lib.train.data:DataError",
    "rdt_lib.rewards.errors:*",
]
#: exceptions of those modules that signal a wrong call from code (a bug), not a user mistake
NOT_USER_ERRORS: set[str] = {"rdt_lib.rewards.errors:RewardInputError"}


def user_error_types() -> tuple[type[BaseException], ...]:
    """:class:`UserError` plus the importable types named in :data:`USER_ERROR_TYPES`."""
    found: list[type[BaseException]] = [UserError]
    for spec in USER_ERROR_TYPES:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - a module that fails to import has raised nothing
            continue
        names = [n for n in vars(module) if attr == "*" or n == attr]
        for name in names:
            obj = getattr(module, name, None)
            if (isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == module.__name__
                    and f"{module_name}:{name}" not in NOT_USER_ERRORS):
                found.append(obj)
    return tuple(found)


def is_user_error(exc: BaseException) -> bool:
    """True for errors the user caused (see the module docstring), False for bugs."""
    if isinstance(exc, user_error_types()):
        return True
    return isinstance(exc, OSError) and exc.errno in USER_ERRNOS


_OFFLINE_MARKERS = ("not fully cached", "outgoing traffic has been disabled", "couldn't connect",
                    "could not connect", "connection error", "offline mode", "max retries exceeded",
                    "name or service not known", "temporary failure in name resolution", "network is unreachable")
_OFFLINE_TYPES = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "ConnectTimeout",
                  "NameResolutionError", "MaxRetryError")


def hub_unreachable(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception in its cause / context chain) says the Hugging Face hub could not be
    reached or the files are not in the local cache while offline."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if any(type_.__name__ in _OFFLINE_TYPES for type_ in type(cur).__mro__):
            return True
        text = str(cur).lower()
        if any(marker in text for marker in _OFFLINE_MARKERS):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def format_bytes(n: int | float) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units, one decimal)."""
    n = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line (continuation lines joined with ``; ``)."""
    if isinstance(exc, OSError) and not isinstance(exc, UserError) and exc.strerror:
        text = exc.strerror
        if exc.filename is not None:
            text += f": {os.fspath(exc.filename)!s}"
            if exc.filename2 is not None:
                text += f" -> {os.fspath(exc.filename2)!s}"
        if exc.errno in _DISK_FULL_ERRNOS:
            text += "; free some space (files written before are intact)"
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            text += "; choose a location you can write to, or fix its permissions"
    else:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, KeyError) and exc.args:
            text = str(exc.args[0])
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(exc).__name__


def debug_enabled(argv: Sequence[str] | None = None) -> bool:
    """``--debug`` in ``argv`` or ``RDT_DEBUG`` set to something other than ``""`` / ``0`` / ``false``."""
    if argv is not None and "--debug" in argv:
        return True
    return os.environ.get("RDT_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def run_cli(main_fn: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None, *,
            stderr=None) -> int:
    """Call ``main_fn(argv)`` and return its exit status; a user error becomes ``error: <message>`` on stderr
    and exit status 2 (the traceback too with ``--debug`` / ``RDT_DEBUG=1``). Other exceptions (bugs)
    propagate with their traceback. ``argv`` None means ``sys.argv[1:]`` (``--debug`` is looked for there)."""
    err = stderr or sys.stderr
    try:
        return main_fn(argv)
    except Exception as exc:  # noqa: BLE001 - sorted into user errors and bugs right here
        if not is_user_error(exc):
            raise
        if debug_enabled(sys.argv[1:] if argv is None else argv):
            traceback.print_exc(file=err)
        print(f"error: {one_line(exc)}", file=err)
        return EXIT_USER_ERROR
