"""The ComfyUI test host is a real ComfyUI: its own nodes and this pack load, a KSampler run on the tiny SD1.5
checkpoint produces latents that depend on the model and the seed, and model files added while it runs are
listed. Plus the rule that a skipped ComfyUI test fails when a host is configured."""

from __future__ import annotations

import re
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

import comfyui_server as cs

PACK_LINK = f"custom_nodes/{cs.PACK_LINK_NAME}"


def combo_options(spec) -> list:
    """The choices of a COMBO input in ``/object_info``: ``[[choices...], {opts}]`` (classic) or
    ``["COMBO", {"options": [...]}]`` (newer schema)."""
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return spec[1]["options"]
    raise AssertionError(f"not a combo input: {spec!r}")


def ksampler_graph(seed: int, *, steps: int = 4, size: int = 64, prefix: str = "rdt_host") -> dict:
    """CheckpointLoaderSimple -> CLIPTextEncode x2 -> KSampler (euler, normal) -> SaveLatent (API format)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "rdt_tiny_sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"{prefix}_{seed}"}},
    }


def test_host_serves_comfyui_and_loads_the_pack(comfy_server):
    info = comfy_server.object_info()
    for core in ("KSampler", "CheckpointLoaderSimple", "SaveLatent", "LoraLoader"):
        assert core in info, f"ComfyUI's own {core} is not registered"
    assert info["KSampler"]["python_module"] == "nodes"

    log = comfy_server.log_text()
    failures = [line for line in log.splitlines() if "Cannot import" in line and PACK_LINK in line]
    assert not failures, "the pack failed to import:\n" + "\n".join(failures) + "\n" + log[-4000:]
    # "Import times for custom nodes:" lists every module ComfyUI tried, "(IMPORT FAILED)" on failure.
    timing = [line for line in log.splitlines() if re.search(r"seconds.*:\s.*" + re.escape(PACK_LINK) + r"\s*$", line)]
    assert timing, f"no import line for {PACK_LINK} in the server log:\n{log[-4000:]}"
    assert all("IMPORT FAILED" not in line for line in timing), timing

    from comfy_rdt_nodes import NODE_CLASS_MAPPINGS

    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert name in info, f"the pack's node {name} is not registered"
        assert info[name]["python_module"].startswith("custom_nodes."), info[name]["python_module"]


def test_ksampler_on_the_tiny_checkpoint_returns_model_and_seed_dependent_latents(comfy_server):
    latents = {}
    for seed in (1, 2):
        entry = comfy_server.run(ksampler_graph(seed), timeout=600)
        files = comfy_server.output_files(entry, node_id="6", kind="latents")
        assert len(files) == 1 and files[0].is_file(), entry.get("outputs")
        latents[seed] = cs.read_latent(files[0])
    log = comfy_server.log_text()
    assert "clip missing" not in log, "the checkpoint's text encoder is incomplete"
    assert "not a checkpoint file" not in log, "ComfyUI did not detect the checkpoint's model type"

    for seed, lat in latents.items():
        assert lat.shape == (1, 4, 8, 8), lat.shape  # 64x64 pixels, SD's 8x downscale, 4 channels
        assert lat.dtype == torch.float32 and torch.isfinite(lat).all()
        # A UNet that outputs 0 (zero norms) leaves Euler's x at the initial noise * sigma_max. ComfyUI's CPU
        # noise for a batch is torch.randn(shape, generator=manual_seed(seed)); SD1.5's sigma_max is 14.6146.
        noise_only = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed)) * 14.6146
        assert (lat - noise_only).abs().mean() > 0.1 * noise_only.abs().mean(), "the model did not act"
    diff = (latents[1] - latents[2]).abs().mean()
    assert diff > 0.1 * latents[1].abs().mean(), f"seeds 1 and 2 gave nearly the same latent ({diff})"


def test_model_files_added_while_the_server_runs_are_listed(comfy_server, comfy_models):
    from safetensors.torch import save_file

    name = f"rdt_added_{uuid.uuid4().hex[:8]}.safetensors"
    before = combo_options(comfy_server.object_info("LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"])
    assert name not in before
    save_file({"x": torch.zeros(1)}, str(comfy_models / "loras" / name))
    sub = comfy_models / "loras" / f"sub_{uuid.uuid4().hex[:6]}"
    sub.mkdir()
    save_file({"x": torch.zeros(1)}, str(sub / "nested.safetensors"))
    after = combo_options(comfy_server.object_info("LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"])
    assert name in after, after
    assert f"{sub.name}/nested.safetensors" in after, after


# ---- the skip -> failure rule (an inner pytest run with this conftest) -------------------------------------

@pytest.mark.parametrize("host_set", [True, False])
def test_skipped_comfyui_test_fails_only_when_a_host_is_set(pytester, monkeypatch, tmp_path, host_set):
    here = Path(__file__).resolve().parent
    pytester.makeconftest((here / "conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(comfyui_server=(here / "comfyui_server.py").read_text(encoding="utf-8"))
    pytester.makeini(textwrap.dedent("""\
        [pytest]
        markers =
            comfyui: needs ComfyUI
        """))
    pytester.makepyfile(test_inner=textwrap.dedent("""\
        import pytest

        @pytest.mark.comfyui
        def test_marked_skip():
            pytest.skip("no reason")

        def test_fixture_skip(comfy_server):
            pass

        def test_plain_skip():
            pytest.skip("an ordinary skip")
        """))
    if host_set:
        tree = tmp_path / "ComfyUI"
        tree.mkdir()
        (tree / "main.py").write_text("raise SystemExit('not started by this test')\n")
        monkeypatch.setenv("COMFYUI_DIR", str(tree))
    else:
        monkeypatch.delenv("COMFYUI_DIR", raising=False)
    result = pytester.runpytest_inprocess("-rA", "-k", "marked_skip or plain_skip")
    if host_set:
        result.assert_outcomes(failed=1, skipped=1)
        result.stdout.fnmatch_lines(["*skipped although COMFYUI_DIR=*"])
    else:
        result.assert_outcomes(skipped=2)
    if not host_set:
        result = pytester.runpytest_inprocess("-rs", "-k", "fixture_skip")
        result.assert_outcomes(skipped=1)
        result.stdout.fnmatch_lines(["*scripts/comfyui_host.sh*"])
