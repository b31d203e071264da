"""The dual-model sampling nodes on SD3 (and Flux) MODELs in a real ComfyUI, with rdt's LoRA files (marker ``comfyui``).

A tiny SD3 transformer (diffusers layout, 2 blocks of width 128 = ComfyUI's ``64 * depth``, one SD3.5-style
``attn2`` block) and a rank-2 LoRA on its attention projections written by ``rdt_lib.lora_io.save_lora`` are loaded
by ComfyUI's own code in ComfyUI's Python (``tests/comfy_sd3_sampling_checks.py``): the base MODEL by
``comfy.sd.load_diffusion_model_state_dict`` (which fuses q / k / v), the tuned MODEL by ``LoraLoaderModelOnly``
(whose SD3 key map puts the q / k / v LoRAs on slices of the fused weights: patches with an ``offset``).
A tiny Flux transformer (1 double + 1 single block) with rdt's Flux LoRA is checked the same way, at CFG 1 (ComfyUI's
detection fixes Flux's 24 heads and rope axes, so the tiny model's are set in the detected config). The guider runs
those offset patches as per-row LoRA terms on slices of the fused outputs (one batched pass for
base and tuned, as on SD1.5); the weight-function fallback is checked too, forced. References are ComfyUI's KSampler
on each MODEL and the KSamplerAdvanced chain; every comparison first asserts that the references differ by far more
than its tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from comfyui_server import HOST_HINT, comfyui_dir, comfyui_python

HERE = Path(__file__).resolve().parent
DEPTH = 2
STEPS = 4   # the check script's step count
TOL = 1e-4  # latents of size ~3; float32 rounding of a LoRA added at forward time vs merged into the weight


def _write_model_files(work: Path) -> None:
    from safetensors.torch import save_file

    from flow_fixtures import make_tiny_sd3_transformer
    from rdt_lib.backbones.flow import FLOW_LORA_TARGETS
    from rdt_lib.lora import add_lora
    from rdt_lib.lora_io import save_lora

    network = make_tiny_sd3_transformer(seed=3, num_layers=DEPTH, attention_head_dim=64, num_attention_heads=DEPTH,
                                        caption_projection_dim=64 * DEPTH, dual_attention_layers=(0,))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        add_lora(network, "tuned", rank=2, alpha=4.0, target_modules=FLOW_LORA_TARGETS, init_lora_weights=False)
    save_lora(network, work / "loras" / "rdt_sd3.safetensors", "tuned")
    plain = {k.replace(".base_layer", ""): v.detach().contiguous() for k, v in network.state_dict().items()
             if "lora_" not in k}
    save_file(plain, str(work / "transformer.safetensors"))


FLUX_HEADS, FLUX_AXES = 2, (4, 6, 6)  # head width 16 = the rope axes' sum


def _write_flux_files(work: Path) -> int:
    """A tiny Flux transformer (1 double + 1 single block, width 32) and rdt's LoRA file for it; returns the
    number of LoRA'd modules."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from rdt_lib.backbones.flow import FLOW_LORA_TARGETS
    from rdt_lib.lora import add_lora
    from rdt_lib.lora_io import save_lora

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        network = FluxTransformer2DModel(
            patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=FLUX_HEADS, joint_attention_dim=96, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=FLUX_AXES).eval()
        torch.manual_seed(0)
        add_lora(network, "tuned", rank=2, alpha=4.0, target_modules=FLOW_LORA_TARGETS, init_lora_weights=False)
    save_lora(network, work / "loras" / "rdt_flux.safetensors", "tuned")
    plain = {k.replace(".base_layer", ""): v.detach().contiguous() for k, v in network.state_dict().items()
             if "lora_" not in k}
    save_file(plain, str(work / "flux_transformer.safetensors"))
    (work / "flux_config.json").write_text(json.dumps({"num_heads": FLUX_HEADS, "axes_dim": list(FLUX_AXES)}))
    return sum(1 for _, m in network.named_modules() if hasattr(m, "lora_A"))


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    tree = comfyui_dir()
    if tree is None:
        pytest.skip(HOST_HINT)
    work = tmp_path_factory.mktemp("sd3_sampling")
    _write_model_files(work)
    flux_modules = _write_flux_files(work)
    env = {**os.environ, "COMFYUI_DIR": str(tree),
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([comfyui_python(tree), str(HERE / "comfy_sd3_sampling_checks.py"), str(work)],
                          capture_output=True, text=True, env=env, timeout=1200)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(lines[0][len("RESULT "):])
    result["flux"]["file_modules"] = flux_modules
    return result


@pytest.mark.comfyui
def test_comfyui_loads_an_sd3_model_and_rdts_lora_as_offset_patches(checks):
    assert checks["model_type"] == "SD3" and checks["latent_format"] == "SD3"
    assert checks["model_sampling"][1] == 3.0  # SD3's shift
    # 2 blocks: x qkv + proj, context qkv (+ proj but in the last, context-only block), attn2 qkv + proj = 19 LoRAs;
    # the 15 on q / k / v are slices of ComfyUI's fused qkv weights
    assert checks["lora_patches"] == 19 and checks["offset_patches"] == 15


@pytest.mark.comfyui
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_base_and_tuned_schedules_equal_ksampler_on_sd3(checks, sampler):
    assert checks[f"{sampler}_ref_gap"] > 100 * TOL, "the LoRA barely changes the result"
    assert checks[f"{sampler}_base_vs_ksampler"] <= TOL
    assert checks[f"{sampler}_tuned_vs_ksampler"] <= TOL


@pytest.mark.comfyui
def test_one_euler_step_mixes_the_two_models_by_hand(checks):
    """One Euler step to sigma 0 returns the denoised prediction, so keyframes:0=0.3 gives exactly
    0.7 * KSampler(base) + 0.3 * KSampler(base + LoRA) (one-step runs)."""
    assert checks["one_step_ref_gap"] > 100 * TOL
    assert checks["one_step_mix_vs_hand"] <= TOL
    assert checks["one_step_mix_vs_base"] > 20 * TOL
    # the offset patches run as per-row LoRA terms: base and tuned in one batched forward pass
    assert checks["one_step_mode"] == "rows"
    assert checks["one_step_evaluations"] == {"base": 0, "tuned": 0, "joint": 1}


@pytest.mark.comfyui
def test_the_weight_function_fallback_gives_the_same_on_sd3(checks):
    """Patches the rows plan cannot take run through weight functions (two passes); forced here for the LoRA."""
    assert checks["weights_one_step_mode"] == "weights"
    assert checks["weights_one_step_mix_vs_hand"] <= TOL
    assert checks["weights_tuned_vs_ksampler"] <= TOL


@pytest.mark.comfyui
def test_switch_equals_the_ksampleradvanced_chain_on_sd3(checks):
    assert checks["chain_vs_base"] > 100 * TOL
    assert checks["switch_vs_late_switch"] > 20 * TOL  # switching one step later is another result
    assert checks["switch_vs_chain"] <= TOL


@pytest.mark.comfyui
def test_flow_sigmas_drive_the_step_index(checks):
    """ComfyUI's ``simple`` list on SD3 is shift(1 - i/N) with shift(t) = 3t / (1 + 2t), then 0; each Euler
    evaluation sits at one of its sigmas and gets the linear schedule's weight i / N of that step."""
    shift = checks["model_sampling"][1]
    expected = [shift * t / (1 + (shift - 1) * t) for t in (1 - i / STEPS for i in range(STEPS))] + [0.0]
    assert checks["ksampler_sigmas"] == pytest.approx(expected, abs=1e-6)
    assert checks["linear_sigmas"] == pytest.approx(expected[:-1], abs=1e-6)
    assert checks["linear_weights"] == pytest.approx([i / STEPS for i in range(STEPS)], abs=1e-12)
    # Heun: each step's second evaluation sits at the next sigma and gets that step's weight; the last step
    # (to sigma 0) is a plain Euler step
    pairs = [(i, i + 1) for i in range(STEPS - 1)]
    assert checks["heun_sigmas"] == pytest.approx([expected[j] for p in pairs for j in p] + [expected[STEPS - 1]],
                                                  abs=1e-6)
    assert checks["heun_weights"] == pytest.approx([j / STEPS for p in pairs for j in p] + [(STEPS - 1) / STEPS],
                                                   abs=1e-12)
    assert checks["linear_mode"] == "rows"  # step 0 (w = 0) runs the base alone, the others one joint pass each
    assert checks["linear_evaluations"] == {"base": 1, "tuned": 0, "joint": STEPS - 1}


@pytest.mark.comfyui
def test_guider_with_sampler_custom_advanced_equals_the_node_on_sd3(checks):
    assert checks["power_vs_base"] > 100 * TOL
    assert checks["guider_vs_node"] <= TOL


@pytest.mark.comfyui
def test_flux_with_rdts_lora_runs_batched_and_equals_ksampler(checks):
    """Flux at CFG 1 (no negative pass): every LoRA in rdt's Flux file becomes a ComfyUI patch (the q / k / v ones
    slices of the fused double-block qkv and single-block linear1 weights), schedules base / tuned equal KSampler
    and a one-step constant mix is the hand-made mix of the two one-step results."""
    flux = checks["flux"]
    assert flux["model_type"] == "Flux"
    assert flux["lora_patches"] == flux["file_modules"] == 11 and flux["offset_patches"] == 9
    assert flux["ref_gap"] > 100 * TOL and flux["one_step_ref_gap"] > 100 * TOL
    assert flux["base_vs_ksampler"] <= TOL
    assert flux["tuned_vs_ksampler"] <= TOL
    assert flux["one_step_mix_vs_hand"] <= TOL and flux["one_step_mix_vs_base"] > 20 * TOL
    assert flux["one_step_mode"] == "rows"
    assert flux["one_step_evaluations"] == {"base": 0, "tuned": 0, "joint": 1}
