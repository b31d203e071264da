"""ComfyBackbone inside ComfyUI's own process (``tests/comfy_inprocess_checks.py`` run with ComfyUI's Python): the
sigma-space denoiser equals ComfyUI's ``apply_model``, and a training run that fails half-way leaves ComfyUI's
MODEL / VAE exactly as they were."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from comfyui_server import HOST_HINT, comfyui_dir, comfyui_python

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def checks():
    tree = comfyui_dir()
    if tree is None:
        pytest.skip(HOST_HINT)
    env = {**os.environ, "COMFYUI_DIR": str(tree),
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([comfyui_python(tree), str(HERE / "comfy_inprocess_checks.py")], capture_output=True,
                          text=True, env=env, timeout=3000)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(lines[0][len("RESULT "):])


@pytest.mark.comfyui
def test_denoiser_is_comfyuis_apply_model(checks):
    assert checks["weights_are_inference"]  # ComfyUI loaded them under inference mode: aliasing is needed
    assert checks["denoise_scale"] > 0.1
    assert checks["denoise_vs_apply_model"] < 1e-5
    assert checks["forward_network_vs_apply_model"] < 1e-4


@pytest.mark.comfyui
def test_failed_training_restores_the_model(checks):
    assert checks["error_raised"] and checks["reward_calls"] == 2
    assert checks["snapshot_equal"], checks["snapshot_diff"]
    assert checks["lora_layers_left"] == 0
    assert checks["rng_unchanged"]


@pytest.mark.comfyui
def test_gradient_checkpointing_gives_the_same_lora_and_is_undone(checks):
    assert checks["gc_lora_size"] > 1e-4  # one step moved lora_up away from zero
    assert checks["gc_max_diff"] < 1e-6
    assert checks["gc_wrappers_left"] == 0
    assert checks["gc_snapshot_equal"]


@pytest.mark.comfyui
def test_imagerefl_trains_on_an_image_batch(checks):
    assert checks["imagerefl_steps"] == 1
    assert "diffusion_mse" in checks["imagerefl_metrics"]
    assert checks["imagerefl_lora_size"] > 1e-4
