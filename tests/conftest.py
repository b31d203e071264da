"""Test-wide settings and the real-ComfyUI fixtures.

- torch runs the tiny test models on one thread (set RDT_TEST_THREADS to change). Several threads on a 2-core
  machine cost far more in synchronisation than they gain here.
- ComfyUI integration tests carry ``@pytest.mark.comfyui`` (added automatically to every test that uses
  ``comfy_models`` / ``comfy_server``) and run against the host in ``COMFYUI_DIR`` / ``COMFYUI_PYTHON``
  (``eval "$(bash scripts/comfyui_host.sh)"``). Without ``COMFYUI_DIR`` they are skipped with one line saying
  how to build the host; with it set, a skipped ComfyUI test is reported as a FAILURE: CI must not pass by
  skipping them. Browser tests (``browser`` marker) without Chromium / selenium stay skipped (one line saying
  what to install) unless ``RDT_REQUIRE_BROWSER=1`` (set by ``.ci/run``), where that skip is a failure too.
"""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("RDT_TEST_THREADS", "1")))

# diffusers and transformers bind their log handler to the sys.stderr of the moment they first log: let that be
# now, not inside a test's capsys, whose stream is closed when that test ends (a later test's warning would then
# print a "--- Logging error ---" traceback into the stderr it checks).
from diffusers.utils import logging as _diffusers_logging  # noqa: E402
from transformers.utils import logging as _transformers_logging  # noqa: E402

_diffusers_logging.get_logger("diffusers")
_transformers_logging.get_logger("transformers")

import comfyui_server as cs  # noqa: E402  (tests/ is on sys.path: pytest's rootdir-relative conftest import)

pytest_plugins = ["pytester"]

COMFY_FIXTURES = {"comfy_models", "comfy_server"}
TINY_CHECKPOINT = cs.TINY_CHECKPOINT
BROWSER_HINT = "browser tests need Chromium and selenium"  # the start of comfyui_browser.BROWSER_HINT


def pytest_collection_modifyitems(config, items):
    for item in items:
        if COMFY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.comfyui)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and item.get_closest_marker("comfyui") is not None):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    no_browser = BROWSER_HINT in reason and not os.environ.get("RDT_REQUIRE_BROWSER")
    if not os.environ.get("COMFYUI_DIR") or no_browser:
        if isinstance(report.longrepr, tuple) and (reason.endswith(cs.HOST_HINT) or no_browser):
            # one summary line for all of them: the same location groups them in pytest's -r summary
            report.longrepr = ("tests/conftest.py", 0, reason)
        return
    report.outcome = "failed"
    report.longrepr = (f"ComfyUI test skipped although COMFYUI_DIR={os.environ['COMFYUI_DIR']} is set "
                       f"(a skip is a failure here): {reason}")


def _require_host() -> Path:
    tree = cs.comfyui_dir()
    if tree is None:
        pytest.skip(cs.HOST_HINT)
    return tree


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory) -> Path:
    """The session's ComfyUI base directory (``--base-directory``): models/, custom_nodes/, input/ ..."""
    _require_host()
    return tmp_path_factory.mktemp("comfyui")


@pytest.fixture(scope="session")
def comfy_models(comfy_base) -> Path:
    """``<base>/models`` with ``checkpoints/rdt_tiny_sd15.safetensors`` (random-weight SD1.5 family, non-zero
    norms), ``loras/`` and ``rewards/``. Files may be added before or after the server starts."""
    from comfy_checkpoint import write_tiny_sd15_checkpoint

    models = comfy_base / "models"
    for sub in ("checkpoints", "loras", "rewards"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    write_tiny_sd15_checkpoint(models / "checkpoints" / TINY_CHECKPOINT, seed=0)
    return models


@pytest.fixture(scope="session")
def comfy_server(comfy_base, comfy_models):
    """A running ComfyUI (``main.py --cpu``) with this pack linked as ``custom_nodes/rdt``; stopped (its
    process group killed) at the end of the session, whatever the tests did."""
    tree = _require_host()
    server = cs.ComfyServer(tree, cs.comfyui_python(tree), comfy_base)
    try:
        server.start(timeout=float(os.environ.get("RDT_COMFY_START_TIMEOUT", "600")))
        yield server
    finally:
        server.stop()
