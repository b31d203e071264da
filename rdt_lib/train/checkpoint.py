"""Crash-safe training checkpoints and RNG-state capture.

Layout of ``output_dir``::

    checkpoint-<step>/          one complete checkpoint
        meta.json               step, save serial, file list, user metadata (written last)
        <key>.safetensors       each state entry that is a flat {name: tensor} dict (LoRA, EMA weights)
        <key>.pt                every other entry (optimizer / lr-scheduler state, RNG states), torch.save;
                                only types that torch.load(weights_only=True) accepts are allowed
        <extra files>           e.g. config.toml
    latest                      text file naming the newest committed checkpoint directory

Atomicity: a checkpoint is written into a hidden sibling directory ``.tmp-checkpoint-<step>-<id>``; every file
and the directory are fsynced, the directory is renamed to ``checkpoint-<step>`` and the parent fsynced, and
only then is ``latest`` replaced atomically (temporary file, fsync, ``os.replace``). Old checkpoints are
removed after that, so a crash or a full disk at any point leaves the previous checkpoint complete and
``latest()`` pointing at a complete checkpoint. Leftover temporary directories are ignored and cleaned up by
the next save.

Several processes (accelerate / DDP): construct the manager on every process with
``is_main_process=accelerator.is_main_process``. ``save`` performs no collective operation; on other
processes it returns None without touching the disk. Call it on every process like this::

    state = {...}                          # anything that needs a collective (gather_object of per-rank RNG
                                           # states, unwrapping / gathering weights) is done here, on all ranks
    accelerator.wait_for_everyone()        # every rank has finished the step
    manager.save(step, state)              # main process writes, the others return at once
    accelerator.wait_for_everyone()        # nobody reads the checkpoint or exits before it exists

Never wrap a collective in ``if accelerator.is_main_process:``; the main-process branch lives inside ``save``.
Reading (``latest()``, ``load()``) is safe on every process when the output directory is shared.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from ..atomic_io import fsync_dir, write_text_atomic

__all__ = [
    "CheckpointManager",
    "CheckpointError",
    "capture_rng_state",
    "restore_rng_state",
    "check_weights_only_safe",
]

FORMAT_VERSION = 1
META_FILE = "meta.json"
LATEST_FILE = "latest"
RESERVED_KEYS = ("meta",)
_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read (bad state contents, missing or corrupt files)."""


# ------------------------------------------------------------------------------------------------------------
# low-level durable writes


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _write_torch(path: Path, obj: Any) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save as st_save

    # clone: safetensors refuses tensors that share storage (tied or sliced weights)
    data = st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()})
    _write_bytes(path, data)


def _remove_tree(path: Path) -> None:
    """Rename to a hidden name first, so a half-deleted directory never looks like a checkpoint."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------
# weights_only safety

_SAFE_LEAVES = (str, int, float, bool, type(None), bytes, torch.Tensor, torch.dtype, torch.device, torch.Size)


def check_weights_only_safe(obj: Any, where: str = "state") -> None:
    """Raise TypeError if ``obj`` holds a type that ``torch.load(weights_only=True)`` would refuse.

    Accepted: dict / list / tuple (also OrderedDict, namedtuple-free), str, int, float, bool, None, bytes,
    tensors, dtypes, devices, sizes. ``where`` names the object in the message.
    """
    if isinstance(obj, _SAFE_LEAVES):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise TypeError(f"{where}: dict key {k!r} of type {type(k).__name__} cannot be loaded with "
                                f"weights_only=True")
            check_weights_only_safe(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            check_weights_only_safe(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where}: {type(obj).__module__}.{type(obj).__qualname__} cannot be loaded with weights_only=True; "
        f"convert it to tensors, lists, dicts and numbers (e.g. numpy arrays with torch.from_numpy)"
    )


def _is_tensor_dict(value: Any) -> bool:
    return (isinstance(value, Mapping) and len(value) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


# ------------------------------------------------------------------------------------------------------------
# RNG state


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states of Python ``random``, NumPy (if installed), torch CPU and every CUDA device.

    The result only holds tuples, ints, floats, None and tensors, so it round-trips through
    ``torch.save`` / ``torch.load(weights_only=True)``. Each process has its own RNG state: with several
    processes gather one per rank (``accelerate.utils.gather_object``) and restore each rank's own.
    """
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        state["numpy"] = None
    else:
        name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
        state["numpy"] = (str(name), torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured; the next random draws repeat those after the capture.

    CUDA states are restored for ``min(saved, available)`` devices (a warning when the counts differ).
    """
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    np_state = state.get("numpy")
    if np_state is not None:
        import numpy as np

        name, key, pos, has_gauss, gauss = np_state
        np.random.set_state((name, key.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if n != len(cuda):
            warnings.warn(f"checkpoint has CUDA RNG states for {len(cuda)} devices, this process sees {n}; "
                          f"restoring {min(n, len(cuda))}", stacklevel=2)
        for i in range(min(n, len(cuda))):
            torch.cuda.set_rng_state(cuda[i], device=i)
    elif cuda:
        warnings.warn("checkpoint has CUDA RNG states but CUDA is not available; they are ignored", stacklevel=2)


# ------------------------------------------------------------------------------------------------------------
# manager


class CheckpointManager:
    """Atomic ``checkpoint-<step>`` directories in ``output_dir``, keeping the newest ``keep_last``.

    Args:
        output_dir: where checkpoints go (created on the main process at the first save).
        keep_last: complete checkpoints to keep (>= 1); older ones are removed after each successful save.
        is_main_process: only the main process writes (see the module docstring for the multi-process pattern).
    """

    prefix = "checkpoint-"

    def __init__(self, output_dir: str | os.PathLike[str], keep_last: int = 3, *, is_main_process: bool = True):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.output_dir = Path(output_dir)
        self.keep_last = int(keep_last)
        self.is_main_process = bool(is_main_process)

    # ---------------------------------------------------------------------------------------------- reading

    def _read_meta(self, path: Path) -> dict[str, Any] | None:
        try:
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            return None
        if not all((path / name).is_file() for name in meta.get("files", {}).values()):
            return None
        return meta

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint directories, oldest first (in save order)."""
        if not self.output_dir.is_dir():
            return []
        found = []
        for path in self.output_dir.iterdir():
            if not path.name.startswith(self.prefix) or not path.is_dir():
                continue
            meta = self._read_meta(path)
            if meta is not None:
                found.append((int(meta.get("serial", 0)), int(meta["step"]), path))
        return [p for _, _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The newest committed complete checkpoint, or None.

        The ``latest`` pointer decides while it names a complete checkpoint; if it is missing or dangling
        (e.g. deleted by hand) the complete checkpoint saved last is returned. Temporary and incomplete
        directories are never returned.
        """
        pointer = self.output_dir / LATEST_FILE
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except OSError:
            name = ""
        if name and "/" not in name and "\\" not in name:
            candidate = self.output_dir / name
            if candidate.name.startswith(self.prefix) and self._read_meta(candidate) is not None:
                return candidate
        complete = self.checkpoints()
        return complete[-1] if complete else None

    def load(self, path: str | os.PathLike[str] | None = None, *, allow_pickle: bool = False,
             map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """Read a checkpoint (default: :meth:`latest`) back into the dict given to :meth:`save`.

        The result also has ``"meta"``: step, serial, creation time and the metadata given to ``save``.
        ``.pt`` entries load with ``weights_only=True``; ``allow_pickle=True`` lifts that for trusted files.

        Raises:
            CheckpointError: no checkpoint, an incomplete one, or a file that does not load.
        """
        if path is None:
            path = self.latest()
            if path is None:
                raise CheckpointError(f"no complete checkpoint in {self.output_dir}")
        path = Path(path)
        meta = self._read_meta(path)
        if meta is None:
            raise CheckpointError(f"{path} is not a complete checkpoint (missing or invalid {META_FILE}, or files "
                                  f"listed there are missing)")
        from safetensors.torch import load_file

        state: dict[str, Any] = {}
        for key, filename in meta["files"].items():
            file = path / filename
            try:
                if filename.endswith(".safetensors"):
                    state[key] = load_file(str(file), device=str(map_location))
                else:
                    state[key] = torch.load(file, map_location=map_location, weights_only=not allow_pickle)
            except Exception as exc:
                hint = "" if allow_pickle else " (if the file is trusted, load(..., allow_pickle=True))"
                raise CheckpointError(f"cannot load {file}: {exc}{hint}") from exc
        state["meta"] = meta
        return state

    @staticmethod
    def step_of(path: str | os.PathLike[str]) -> int:
        """The step number in a ``checkpoint-<step>`` directory name."""
        name = Path(path).name
        if not name.startswith(CheckpointManager.prefix) or not name[len(CheckpointManager.prefix):].isdigit():
            raise ValueError(f"{name!r} is not a checkpoint-<step> directory name")
        return int(name[len(CheckpointManager.prefix):])

    # ---------------------------------------------------------------------------------------------- writing

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metadata: Mapping[str, Any] | None = None,
        extra_files: Mapping[str, str | bytes] | None = None,
    ) -> Path | None:
        """Write ``checkpoint-<step>`` atomically; returns its path (None on non-main processes).

        Args:
            step: optimizer step count (>= 0).
            state: name -> value. A non-empty flat ``{str: Tensor}`` dict is stored as ``<name>.safetensors``;
                anything else (optimizer / scheduler state dicts, RNG states) as ``<name>.pt``, and must be
                loadable with ``weights_only=True`` (checked before writing). Names: letters, digits, ``_.-``;
                ``meta`` is reserved.
            metadata: JSON-serialisable values stored in ``meta.json`` (e.g. config hash, objective).
            extra_files: more files to put in the checkpoint, name -> text or bytes (e.g. ``config.toml``).

        Raises:
            TypeError: a state entry or metadata value cannot be stored safely (checked before any write).
            OSError: the write failed; the previous checkpoints and ``latest`` are unchanged.
        """
        if not self.is_main_process:
            return None
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        files: dict[str, str] = {}
        for key, value in state.items():
            if key in RESERVED_KEYS or not _KEY_RE.match(key):
                raise ValueError(f"state key {key!r} is reserved or not a safe file name (letters, digits, _.-)")
            if _is_tensor_dict(value):
                files[key] = f"{key}.safetensors"
            else:
                check_weights_only_safe(value, f"state[{key!r}]")
                files[key] = f"{key}.pt"
        for name in extra_files or {}:
            if not _KEY_RE.match(name) or name in (META_FILE, *files.values()):
                raise ValueError(f"extra file name {name!r} is not a safe file name or clashes with a state file")
        user_meta = dict(metadata or {})
        try:
            json.dumps(user_meta)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metadata must be JSON-serialisable: {exc}") from exc

        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        existing = self.checkpoints()
        serial = 1 + max((int((self._read_meta(p) or {}).get("serial", 0)) for p in existing), default=0)
        final = self.output_dir / f"{self.prefix}{int(step)}"
        tmp = self.output_dir / f".tmp-{final.name}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            for key, filename in files.items():
                if filename.endswith(".safetensors"):
                    _write_tensors(tmp / filename, state[key])
                else:
                    _write_torch(tmp / filename, state[key])
            for name, content in (extra_files or {}).items():
                _write_bytes(tmp / name, content.encode("utf-8") if isinstance(content, str) else bytes(content))
            meta = {**user_meta, "format": FORMAT_VERSION, "step": int(step), "serial": serial,
                    "created": time.time(), "files": files}
            _write_bytes(tmp / META_FILE, json.dumps(meta, indent=2, sort_keys=True).encode("utf-8"))
            fsync_dir(tmp)
            if final.exists():  # the same step saved again (e.g. Ctrl-C right after a periodic save)
                replaced = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
                os.rename(final, replaced)
                try:
                    os.rename(tmp, final)
                except BaseException:
                    os.rename(replaced, final)
                    raise
                shutil.rmtree(replaced, ignore_errors=True)
            else:
                os.rename(tmp, final)
            fsync_dir(self.output_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        write_text_atomic(self.output_dir / LATEST_FILE, final.name + "\n")
        self._rotate(final)
        return final

    def _rotate(self, newest: Path) -> None:
        complete = [p for p in self.checkpoints() if p != newest]
        excess = len(complete) + 1 - self.keep_last
        for path in complete[:max(0, excess)]:
            _remove_tree(path)

    def _remove_stale_temporaries(self) -> None:
        for path in self.output_dir.iterdir():
            if path.name.startswith((".tmp-" + self.prefix, ".trash-" + self.prefix)) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
