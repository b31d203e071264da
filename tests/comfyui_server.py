"""A real ComfyUI server for integration tests: start, talk to, stop.

The host is a ComfyUI tree (``COMFYUI_DIR``, with ``main.py``) and the Python that runs it (``COMFYUI_PYTHON``;
``scripts/comfyui_host.sh`` builds one and prints both). Tests use the session fixtures ``comfy_models`` and
``comfy_server`` from ``tests/conftest.py``; this module holds the pieces:

- :func:`comfyui_dir` / :func:`comfyui_python`: the host from the environment (``None`` when unset).
- :class:`ComfyServer`: ``main.py --cpu`` on a free loopback port with its own base directory (models, input,
  output, user, temp and custom_nodes all under it, nothing written into the host), this pack linked into its
  ``custom_nodes``; HTTP helpers ``object_info``, ``queue``, ``wait``, ``run``. ``stop()`` kills the server's
  process group (the server is started in a session of its own), also from an ``atexit`` hook.
- :class:`ComfyNodeError`: a rejected prompt (``node_errors``) or a failed execution, with the server's JSON.
- :func:`read_latent`: the tensor of a ``SaveLatent`` ``.latent`` file.

Model lists: ComfyUI caches folder listings and re-reads a folder when its mtime changes, so files written into
``models/loras`` etc. after the server started are listed (``tests/test_comfyui_host.py`` checks this).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_LINK_NAME = "rdt"  # custom_nodes/<this> -> the repository under test
TINY_CHECKPOINT = "rdt_tiny_sd15.safetensors"  # in comfy_models/checkpoints
HOST_HINT = ('ComfyUI tests need a host: eval "$(bash scripts/comfyui_host.sh)" (sets COMFYUI_DIR and '
             'COMFYUI_PYTHON), then run the tests again')


def comfyui_dir() -> Path | None:
    """The ComfyUI tree named by ``COMFYUI_DIR`` (a folder with ``main.py``), or ``None`` when unset/empty."""
    value = os.environ.get("COMFYUI_DIR", "").strip()
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not (path / "main.py").is_file():
        raise FileNotFoundError(f"COMFYUI_DIR={value!r} is not a ComfyUI tree (no main.py in {path})")
    return path


def comfyui_python(tree: Path | None = None) -> str:
    """The interpreter that runs ComfyUI: ``COMFYUI_PYTHON``, else ``<tree>/../venv/bin/python`` when it
    exists (the layout of ``scripts/comfyui_host.sh``), else this interpreter."""
    value = os.environ.get("COMFYUI_PYTHON", "").strip()
    if value:
        return value
    if tree is not None:
        candidate = tree.parent / "venv" / "bin" / "python"
        if candidate.exists():
            return str(candidate)
    return sys.executable


def comfyui_version(tree: Path) -> str:
    """The tree's ``comfyui_version.__version__`` (read from the file, e.g. ``"0.3.75"``), ``""`` if absent."""
    path = tree / "comfyui_version.py"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
    return ""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyNodeError(RuntimeError):
    """ComfyUI rejected a prompt (``error`` / ``node_errors``) or an execution failed (``execution_error``).

    ``.error`` is the server's JSON: the body of a rejected ``POST /prompt``, or the ``execution_error``
    message data (``node_type``, ``exception_message``, ``traceback`` ...) of a failed run.
    """

    def __init__(self, message: str, error: Any):
        super().__init__(f"{message}: {json.dumps(error, indent=1, default=str)[:4000]}")
        self.error = error


def read_latent(path: str | os.PathLike):
    """The latent tensor ``[B, C, H/8, W/8]`` (float32, unscaled model latents) of a ``.latent`` file
    written by ComfyUI's ``SaveLatent``."""
    from safetensors.torch import load_file

    data = load_file(str(path))
    if "latent_tensor" not in data:
        raise KeyError(f"{path} has no 'latent_tensor' (keys: {sorted(data)}): not a SaveLatent file")
    return data["latent_tensor"]


class ComfyServer:
    """One ``main.py --cpu`` process on ``127.0.0.1:<free port>``.

    Args:
        tree: the ComfyUI folder (``main.py``).
        python: the interpreter with ComfyUI's requirements.
        base_dir: ``--base-directory``: ``models/``, ``custom_nodes/``, ``input/``, ``output/``, ``temp/`` and
            ``user/`` live here (created when missing); the server's log is ``base_dir/comfyui.log``.
        pack_dir: the node pack to link as ``custom_nodes/rdt`` (default: this repository); ``None`` links none.
        threads: ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` of the server (default ``RDT_COMFY_THREADS`` or 1).
        extra_args: more ``main.py`` arguments.
    """

    def __init__(self, tree: str | os.PathLike, python: str, base_dir: str | os.PathLike, *,
                 pack_dir: str | os.PathLike | None = REPO_ROOT, threads: int | None = None,
                 extra_args: tuple[str, ...] = ()):
        self.tree = Path(tree)
        self.python = python
        self.base_dir = Path(base_dir)
        self.pack_dir = Path(pack_dir) if pack_dir is not None else None
        self.threads = threads if threads is not None else int(os.environ.get("RDT_COMFY_THREADS", "1"))
        self.extra_args = tuple(extra_args)
        self.version = comfyui_version(self.tree)
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        for sub in ("models", "custom_nodes", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        self.log_path = self.base_dir / "comfyui.log"

    # ---- paths -----------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (no trailing slash)."""
        if self.port is None:
            raise RuntimeError("the server has not been started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def custom_nodes_dir(self) -> Path:
        return self.base_dir / "custom_nodes"

    def log_text(self) -> str:
        """Everything the server wrote to stdout / stderr so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    # ---- life cycle --------------------------------------------------------------------------------------
    def _link_pack(self) -> None:
        if self.pack_dir is None:
            return
        link = self.custom_nodes_dir / PACK_LINK_NAME
        if link.is_symlink() or link.exists():
            if link.is_symlink() and Path(os.readlink(link)) == self.pack_dir:
                return
            raise FileExistsError(f"{link} exists and is not a link to {self.pack_dir}")
        link.symlink_to(self.pack_dir, target_is_directory=True)

    def command(self) -> list[str]:
        return [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(self.base_dir), "--disable-auto-launch", *self.extra_args]

    def start(self, timeout: float = 300.0) -> "ComfyServer":
        """Start the server and wait until ``/object_info`` answers (custom nodes are loaded by then)."""
        if self.proc is not None:
            raise RuntimeError("already started")
        self._link_pack()
        self.port = free_port()
        env = dict(os.environ)
        env.pop("VIRTUAL_ENV", None)
        env.pop("PYTHONPATH", None)  # the test process's path must not leak into ComfyUI's imports
        env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                   PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.command(), cwd=str(self.tree), env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            log.close()
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with status {self.proc.returncode} while starting; "
                                   f"log {self.log_path}:\n{self.log_text()[-6000:]}")
            try:
                self._get("/object_info/KSampler", timeout=5)
                self._get("/object_info", timeout=60)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"ComfyUI did not serve /object_info within {timeout:.0f} s; "
                                   f"log {self.log_path}:\n{self.log_text()[-6000:]}")
            time.sleep(0.5)

    def stop(self, timeout: float = 20.0) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL after ``timeout`` s). Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # start_new_session: the group id is the server's pid
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout)
        else:  # the server is gone; children it left in its group still go
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "ComfyServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- HTTP ------------------------------------------------------------------------------------------
    def _get(self, path: str, timeout: float = 30.0) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read().decode("utf-8"))

    def _post(self, path: str, body: Mapping[str, Any], timeout: float = 60.0) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode("utf-8"),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read().decode("utf-8")
                return r.status, (json.loads(raw) if raw.strip() else None)
        except urllib.error.HTTPError as e:
            raw = e.read().decode("utf-8", errors="replace")
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, {"error": raw}

    def object_info(self, node_class: str | None = None) -> dict:
        """``GET /object_info`` (every registered node) or ``/object_info/<node_class>`` (that node only)."""
        return self._get("/object_info" if node_class is None else f"/object_info/{node_class}", timeout=120)

    def queue(self, graph: Mapping[str, Any], client_id: str | None = None) -> str:
        """``POST /prompt`` with an API-format graph ``{id: {"class_type", "inputs"}}``; returns the prompt id.

        Raises:
            ComfyNodeError: the server rejected the graph, or answered with non-empty ``node_errors``.
        """
        body = {"prompt": dict(graph), "client_id": client_id or uuid.uuid4().hex}
        status, data = self._post("/prompt", body)
        if status != 200 or not isinstance(data, dict) or "prompt_id" not in data:
            raise ComfyNodeError(f"ComfyUI rejected the prompt (HTTP {status})", data)
        if data.get("node_errors"):
            raise ComfyNodeError("ComfyUI reported node errors", data)
        return data["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        """The ``/history/<prompt_id>`` entry, or ``None`` while the prompt has not finished."""
        return self._get(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll ``/history`` until the prompt finished (successfully or not); returns its history entry
        (``outputs``, ``status`` with ``status_str`` and ``messages``). Raises ``TimeoutError`` after
        ``timeout`` seconds and ``RuntimeError`` when the server died."""
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            entry = self.history(prompt_id)
            if entry is not None:  # ComfyUI adds a prompt to the history when it has finished
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited (status {self.proc.returncode}) while running {prompt_id}:"
                                   f"\n{self.log_text()[-6000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s;\n"
                                   f"{self.log_text()[-3000:]}")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def run(self, graph: Mapping[str, Any], timeout: float = 300.0) -> dict:
        """Queue ``graph``, wait for it and return its history entry.

        Raises:
            ComfyNodeError: node errors at queue time, or an ``execution_error`` / non-success status.
        """
        entry = self.wait(self.queue(graph), timeout=timeout)
        status = entry.get("status") or {}
        if status.get("status_str") != "success":
            errors = [data for event, data in status.get("messages", []) if event == "execution_error"]
            raise ComfyNodeError("ComfyUI execution failed", errors[0] if errors else status)
        return entry

    def output_files(self, entry: Mapping[str, Any], node_id: str | None = None, kind: str | None = None
                     ) -> list[Path]:
        """Paths of the files a history entry's outputs name (``images``, ``latents`` ...), optionally of one
        node and one kind. Only files of type ``output`` (under :attr:`output_dir`) and ``temp``."""
        paths: list[Path] = []
        for nid, outputs in (entry.get("outputs") or {}).items():
            if node_id is not None and str(nid) != str(node_id):
                continue
            for k, items in outputs.items():
                if (kind is not None and k != kind) or not isinstance(items, list):
                    continue
                for item in items:
                    if not isinstance(item, dict) or "filename" not in item:
                        continue
                    root = {"output": self.output_dir, "temp": self.base_dir / "temp"}.get(item.get("type"))
                    if root is not None:
                        paths.append(root / item.get("subfolder", "") / item["filename"])
        return paths
