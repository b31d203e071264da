"""Crash-safe file writes: a reader (or the next run after a crash or a full disk) sees either the old file
or the new one, never a truncated one. The bytes go to a temporary file in the target's directory, which is
fsynced, then ``os.replace``d onto the target, and the directory is fsynced.

Every file rdt writes (LoRA files, checkpoints, configs, validation grids, the demo's outputs) goes through
:func:`write_bytes_atomic`. The result has the permissions an ordinary ``open(path, "w")`` would give: those
of the file it replaces, or ``0o666`` minus the process umask for a new file (a temporary file alone would be
``0o600``, unreadable for e.g. a ComfyUI running as another user).

A full disk raises :class:`~rdt_lib.errors.DiskFullError` (an ``OSError`` with ``errno`` ENOSPC) saying how many
bytes were needed and how many are free; the target is unchanged and no temporary file is left behind.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from .errors import DiskFullError, format_bytes, is_disk_full

__all__ = ["fsync_dir", "write_bytes_atomic", "write_text_atomic", "write_image_atomic", "current_umask",
           "is_disk_full"]

def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename inside it is durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask (read from /proc on Linux, else set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """The permission bits an ordinary write to ``path`` would leave: the existing file's, or 0o666 & ~umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def _write_all(fh: BinaryIO, data: bytes) -> None:
    """Write ``data`` to the open file (the one place bytes reach the disk; tests replace it to fill the disk)."""
    fh.write(data)


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, sync_dir: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (creating the parent directory); returns the path.

    ``sync_dir=False`` skips the fsync of the parent directory after the rename (for files written into a
    directory that the caller fsyncs and renames as a whole, like a checkpoint's temporary directory).

    Raises:
        DiskFullError: the disk or quota is full; ``path`` is unchanged.
        OSError: any other write failure; ``path`` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _mode_for(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            _write_all(fh, data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            free = _free_bytes(path.parent)
            kept = f"the previous {path.name} is unchanged" if path.exists() else "nothing was written"
            raise DiskFullError(
                f"No space left on device writing {path} ({format_bytes(len(data))} needed"
                + (f", {format_bytes(free)} free" if free is not None else "") + f"); {kept} and files written "
                f"before are intact; free some space or write elsewhere",
                path=path, needed=len(data), free=free, errno_=exc.errno,  # type: ignore[union-attr]
            ) from exc
        raise
    if sync_dir:
        fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_image_atomic(path: str | os.PathLike[str], image: Any, format: str = "PNG", **save_kwargs: Any) -> Path:
    """Encode a PIL image (``format``: a PIL format name, e.g. PNG) in memory and write it atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save_kwargs)
    return write_bytes_atomic(path, buffer.getvalue())
