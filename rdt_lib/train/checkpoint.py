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

import errno
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..atomic_io import fsync_dir, is_disk_full, write_bytes_atomic, write_text_atomic
from ..errors import DiskFullError, UserError, format_bytes

__all__ = [
    "CheckpointManager",
    "CheckpointError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "CheckpointMismatchError",
    "OutputDirError",
    "check_output_dir",
    "estimate_checkpoint_bytes",
    "capture_rng_state",
    "restore_rng_state",
    "check_weights_only_safe",
]

FORMAT_VERSION = 1
META_FILE = "meta.json"
LATEST_FILE = "latest"
RESERVED_KEYS = ("meta",)
_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be read: none there, an incomplete one, or one of the subclasses below."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated or corrupt (size or checksum differ from ``meta.json``, or it does not
    parse)."""


class UnsafeCheckpointError(CheckpointError):
    """A ``.pt`` file holds a pickle that needs code to load, refused by ``torch.load(weights_only=True)``."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's LoRA (rank, target modules) differs from the model it is loaded into."""


class OutputDirError(UserError, OSError):
    """The output directory cannot be created or written to."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        OSError.__init__(self, errno_ or errno.EACCES, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# ------------------------------------------------------------------------------------------------------------
# low-level durable writes (all through rdt_lib.atomic_io; the checkpoint's temporary directory is fsynced once
# at the end, so the single files skip their own directory fsync)


def _write_bytes(path: Path, data: bytes) -> str:
    """Write ``data`` durably; returns its SHA-256 (hex) for ``meta.json``."""
    write_bytes_atomic(path, data, sync_dir=False)
    return hashlib.sha256(data).hexdigest()


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save as st_save

    # clone: safetensors refuses tensors that share storage (tied or sliced weights)
    return st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()})


def _write_torch(path: Path, obj: Any) -> str:
    return _write_bytes(path, _torch_bytes(obj))


def _write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> str:
    return _write_bytes(path, _tensor_bytes(tensors))


def _state_nbytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state object: a lower bound of its size on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_nbytes(v) for v in obj)
    return 0


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
# reading one file, with the reason when it does not load


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _strip_path(message: str, path: Path) -> str:
    """``"/out/checkpoint-2/x.pt is ..."`` -> ``"x.pt is ..."`` (the checkpoint is named by the caller)."""
    return message.replace(f"{path}{os.sep}", "").replace(f"{path}: ", "")


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _load_file(file: Path, meta: Mapping[str, Any], *, allow_pickle: bool,
               map_location: str | torch.device) -> Any:
    """One state entry of a checkpoint, checked against the size / SHA-256 in ``meta`` (when recorded)."""
    name = file.name
    expected_size = (meta.get("sizes") or {}).get(name)
    expected_sha = (meta.get("sha256") or {}).get(name)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise CorruptCheckpointError(f"{file} cannot be read: {exc.strerror or exc}") from exc

    def size_problem() -> str | None:
        if expected_size is None or len(data) == expected_size:
            return None
        if len(data) < expected_size:
            return f"{file} is truncated ({len(data):,} of {expected_size:,} bytes)"
        return f"{file} is corrupt ({len(data):,} bytes, {expected_size:,} were written)"

    try:
        if name.endswith(".safetensors"):
            from safetensors.torch import load as st_load

            value: Any = st_load(data)
            if str(map_location) != "cpu":
                value = {k: v.to(map_location) for k, v in value.items()}
        else:
            value = torch.load(io.BytesIO(data), map_location=map_location, weights_only=not allow_pickle)
    except Exception as exc:  # noqa: BLE001 - classified below; every parse failure is a file problem
        text = str(exc)
        if (not allow_pickle and isinstance(exc, pickle.UnpicklingError)
                and ("Unsupported global" in text or _GLOBAL_RE.search(text))):
            found = _GLOBAL_RE.search(text)
            what = f" ({found.group(1)})" if found else ""
            raise UnsafeCheckpointError(
                f"{file} holds a pickled object that needs code to load{what}, refused for safety (rdt never "
                f"writes such files); if you trust the file, load it from Python with "
                f"CheckpointManager.load(path, allow_pickle=True)") from exc
        raise CorruptCheckpointError(size_problem() or f"{file} is truncated or corrupt ({_first_line(exc)})") \
            from exc
    problem = size_problem()
    if problem is None and expected_sha is not None and hashlib.sha256(data).hexdigest() != expected_sha:
        problem = f"{file} is corrupt (its SHA-256 differs from the one recorded when it was written)"
    if problem is not None:
        raise CorruptCheckpointError(problem)
    return value


def _module_suffix(module_path: str) -> str:
    """``"...attn1.to_q"`` -> ``"to_q"``, ``"...attn1.to_out.0"`` -> ``"to_out.0"`` (the target-module name)."""
    parts = module_path.split(".")
    return ".".join(parts[-2:]) if len(parts) > 1 and parts[-1].isdigit() else parts[-1]


def _lora_summary(shapes: Mapping[str, Sequence[int]]) -> str:
    """``"rank 2 on to_k, to_q (8 tensors)"`` from LoRA parameter names and shapes (lora_A: [rank, in])."""
    ranks = sorted({int(shape[0]) for name, shape in shapes.items() if ".lora_A" in name and len(shape) >= 1})
    targets = sorted({_module_suffix(name.split(".lora_")[0]) for name in shapes if ".lora_" in name})
    rank = "rank " + "/".join(map(str, ranks)) if ranks else "unknown rank"
    return f"{rank} on {', '.join(targets) or 'no modules'} ({len(shapes)} tensors)"


def _check_lora(state: Mapping[str, Any], expected: Mapping[str, Sequence[int]] | None, path: Path) -> None:
    """Raise CheckpointMismatchError when ``state['lora']`` differs from ``expected`` (name -> shape)."""
    if expected is None:
        return
    lora = state.get("lora")
    if not isinstance(lora, Mapping):
        raise CheckpointMismatchError(f"{path} has no LoRA weights ('lora' entry); is it a reward-trainer "
                                      f"checkpoint?")
    have = {k: tuple(v.shape) for k, v in lora.items()}
    want = {k: tuple(v) for k, v in expected.items()}
    if have != want:
        raise CheckpointMismatchError(
            f"{path} holds a LoRA of {_lora_summary(have)}, the configuration asks for {_lora_summary(want)}; "
            f"resume with the checkpoint's lora.rank and lora.target_modules (see its config.toml) or use "
            f"another output directory for the new settings")


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
        Each file is checked against the size and SHA-256 recorded in ``meta.json`` (checkpoints written
        before those were recorded are only checked by parsing).

        Raises:
            CorruptCheckpointError: a file is truncated, corrupt, or missing.
            UnsafeCheckpointError: a ``.pt`` file needs code to load (only without ``allow_pickle``).
            CheckpointError: no checkpoint, or an incomplete one.
        """
        if path is None:
            path = self.latest()
            if path is None:
                raise CheckpointError(f"no complete checkpoint in {self.output_dir}")
        path = Path(path)
        meta = self._read_meta(path)
        if meta is None:
            raise CorruptCheckpointError(f"{path} is not a complete checkpoint: {self._meta_problem(path)}")
        state: dict[str, Any] = {}
        for key, filename in meta["files"].items():
            state[key] = _load_file(path / filename, meta, allow_pickle=allow_pickle, map_location=map_location)
        state["meta"] = meta
        return state

    def _meta_problem(self, path: Path) -> str:
        """Why :meth:`_read_meta` rejects ``path``, in words."""
        file = path / META_FILE
        if not path.is_dir():
            return "no such directory" if not path.exists() else "not a directory"
        try:
            meta = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return f"{META_FILE} is missing (the save did not finish)"
        except (OSError, ValueError) as exc:
            return f"{META_FILE} is truncated or corrupt ({_first_line(exc)})"
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            return f"{META_FILE} is not an rdt checkpoint description of format {FORMAT_VERSION}"
        missing = [n for n in meta.get("files", {}).values() if not (path / n).is_file()]
        return f"files listed in {META_FILE} are missing: {', '.join(missing)}" if missing else "unreadable"

    def problem(self, path: str | os.PathLike[str]) -> str | None:
        """Why the checkpoint at ``path`` cannot be loaded (one line), or None when it loads."""
        try:
            self.load(path)
        except CheckpointError as exc:
            return _strip_path(str(exc), Path(path))
        return None

    def intact(self) -> list[Path]:
        """The complete checkpoints whose files all load, oldest first (reads every file: for error paths)."""
        return [p for p in self.checkpoints() if self.problem(p) is None]

    def _candidates(self) -> list[Path]:
        """Checkpoints for ``resume = latest``, newest first: the ``latest`` pointer's, then save order."""
        ordered = list(reversed(self.checkpoints()))
        pointed = self.latest()
        if pointed is not None and pointed in ordered:
            ordered.remove(pointed)
            ordered.insert(0, pointed)
        return ordered

    def load_for_resume(
        self,
        resume: str | os.PathLike[str],
        *,
        expected_lora: Mapping[str, Sequence[int]] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> tuple[dict[str, Any] | None, Path | None]:
        """The state to resume from and its path; ``(None, None)`` when ``resume="latest"`` finds no checkpoint.

        ``resume="latest"``: the newest checkpoint that loads; newer ones that are truncated, corrupt or refused
        (pickle with code) are skipped, each reported through ``log`` with the reason. A named directory is
        loaded or refused (the message lists the intact checkpoints). ``expected_lora``: parameter name -> shape
        of the model's LoRA; a checkpoint with other names (target modules) or shapes (rank) is refused.

        Raises:
            CorruptCheckpointError / UnsafeCheckpointError: the named checkpoint does not load, or no checkpoint
                of ``latest`` does.
            CheckpointMismatchError: the LoRA differs from ``expected_lora``.
        """
        say = log or (lambda msg: None)
        if str(resume) != "latest":
            path = Path(resume).expanduser()
            inner = CheckpointManager(path).checkpoints() if not path.name.startswith(self.prefix) else []
            if inner and not (path / META_FILE).exists():
                raise CheckpointError(
                    f"{path} is an output directory, not a checkpoint; name one of its checkpoints "
                    f"({', '.join(p.name for p in inner)}) or resume = latest with that output directory")
            try:
                state = self.load(path)
            except CheckpointError as exc:
                others = [p for p in (self.intact() if path.parent.resolve() == self.output_dir.resolve()
                                      else CheckpointManager(path.parent).intact()) if p != path]
                hint = (f"intact checkpoints: {', '.join(p.name for p in others)} (or resume = latest for the "
                        f"newest of them)" if others else "no intact checkpoint in " + str(path.parent))
                raise type(exc)(f"cannot resume from {path}: {_strip_path(str(exc), path)}; {hint}") from exc
            _check_lora(state, expected_lora, path)
            return state, path

        skipped: list[str] = []
        for path in self._candidates():
            try:
                state = self.load(path)
            except (CorruptCheckpointError, UnsafeCheckpointError) as exc:
                skipped.append(f"{path.name}: {_strip_path(str(exc), path)}")
                continue
            newer = [p for p in self._unfinished() if p.stat().st_mtime > path.stat().st_mtime]
            for item in [f"{p.name}: {self._meta_problem(p)}" for p in newer] + skipped:
                say(f"resume: skipped {item}")
            _check_lora(state, expected_lora, path)
            return state, path
        skipped += [f"{p.name}: {self._meta_problem(p)}" for p in self._unfinished()]
        if skipped:
            raise CorruptCheckpointError(
                f"no intact checkpoint to resume from in {self.output_dir}: " + "; ".join(skipped)
                + "; start afresh with another output directory (or without resume)")
        return None, None

    def _unfinished(self) -> list[Path]:
        """``checkpoint-*`` directories without a usable ``meta.json`` (not temporaries, which are hidden)."""
        if not self.output_dir.is_dir():
            return []
        return [p for p in self.output_dir.iterdir()
                if p.name.startswith(self.prefix) and p.is_dir() and self._read_meta(p) is None]

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
        sizes: dict[str, int] = {}
        digests: dict[str, str] = {}
        try:
            for key, filename in files.items():
                if filename.endswith(".safetensors"):
                    digests[filename] = _write_tensors(tmp / filename, state[key])
                else:
                    digests[filename] = _write_torch(tmp / filename, state[key])
                sizes[filename] = (tmp / filename).stat().st_size
            for name, content in (extra_files or {}).items():
                _write_bytes(tmp / name, content.encode("utf-8") if isinstance(content, str) else bytes(content))
            meta = {**user_meta, "format": FORMAT_VERSION, "step": int(step), "serial": serial,
                    "created": time.time(), "files": files, "sizes": sizes, "sha256": digests}
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
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(exc):
                raise self._disk_full(final, state, extra_files, exc) from exc
            raise
        write_text_atomic(self.output_dir / LATEST_FILE, final.name + "\n")
        self._rotate(final)
        return final

    def _disk_full(self, final: Path, state: Mapping[str, Any], extra_files: Mapping[str, str | bytes] | None,
                   exc: BaseException) -> DiskFullError:
        needed = _state_nbytes(state) + sum(len(v) for v in (extra_files or {}).values())
        try:
            free: int | None = shutil.disk_usage(self.output_dir).free
        except OSError:
            free = None
        previous = self.latest()
        kept = (f"the earlier checkpoints are intact (latest: {previous.name}), resume = latest continues from "
                f"there" if previous is not None else "no earlier checkpoint existed")
        return DiskFullError(
            f"No space left on device saving {final.name} in {self.output_dir} (about {format_bytes(needed)} "
            f"needed" + (f", {format_bytes(free)} free" if free is not None else "") + f"); {kept}; free some "
            f"space or use another output directory", path=self.output_dir, needed=needed, free=free,
            errno_=getattr(exc, "errno", None) or errno.ENOSPC)

    def _rotate(self, newest: Path) -> None:
        complete = [p for p in self.checkpoints() if p != newest]
        excess = len(complete) + 1 - self.keep_last
        for path in complete[:max(0, excess)]:
            _remove_tree(path)

    def _remove_stale_temporaries(self) -> None:
        for path in self.output_dir.iterdir():
            if path.name.startswith((".tmp-" + self.prefix, ".trash-" + self.prefix)) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------
# pre-flight: can one checkpoint be written at all?


def estimate_checkpoint_bytes(n_params: int, n_tensors: int = 0, *, ema: bool = False, param_bytes: int = 4,
                              export_bytes: int = 4) -> int:
    """A generous estimate (bytes) of one reward-trainer checkpoint plus the exported LoRA file.

    ``n_params`` LoRA parameters in ``n_tensors`` tensors of ``param_bytes`` each (fp32: 4): the checkpoint
    holds the LoRA, its initial copy, AdamW's two moments (and the EMA copy with ``ema``); the export holds the
    LoRA once more at ``export_bytes`` per parameter. Per tensor 512 bytes of header and pickle overhead,
    256 KiB for the RNG / scheduler / config files.
    """
    copies = 4 + (1 if ema else 0)
    return (n_params * (param_bytes * copies + export_bytes) + n_tensors * 512 * (copies + 1) + 256 * 1024)


def check_output_dir(output_dir: str | os.PathLike[str], needed_bytes: int = 0, *, what: str = "") -> Path:
    """Make sure ``output_dir`` exists, is writable and has ``needed_bytes`` free; returns it as a Path.

    Call it before spending any training time. ``what`` describes the need in the message (e.g. "one
    checkpoint of 4,992 LoRA parameters + optimizer state").

    Raises:
        OutputDirError: it cannot be created, is not a directory, or cannot be written to.
        DiskFullError: less than ``needed_bytes`` free there.
    """
    out = Path(output_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"output directory {out} cannot be created ({exc.strerror or exc}); choose a "
                             f"location you can write to", exc.errno) from exc
    if not out.is_dir():
        raise OutputDirError(f"output directory {out} is not a directory; choose another one", errno.ENOTDIR)
    try:
        with tempfile.TemporaryFile(dir=out, prefix=".rdt-write-test-"):
            pass
    except OSError as exc:
        raise OutputDirError(f"output directory {out} is not writable ({exc.strerror or exc}); choose a "
                             f"location you can write to, or fix its permissions", exc.errno) from exc
    if needed_bytes > 0:
        free = shutil.disk_usage(out).free
        if free < needed_bytes:
            raise DiskFullError(
                f"not enough space in output directory {out}: {format_bytes(free)} free, about "
                f"{format_bytes(needed_bytes)} needed for {what or 'one checkpoint'}; free some space or choose "
                f"another output directory", path=out, needed=needed_bytes, free=free)
    return out
