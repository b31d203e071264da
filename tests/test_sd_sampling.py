"""Dual-model sampling on tiny SD1.5- and SDXL-architecture pipelines (random weights, CPU).

References: diffusers' own StableDiffusionPipeline / StableDiffusionXLPipeline for single-model
sampling (our sigma-space samplers fed with the sigmas of diffusers' DDIM / Euler / DPM++ 2M schedulers), and
a hand-written loop over two separate UNets for per-model CFG and switching.
"""

import copy

import pytest
import torch

from rdt_lib.backbones.stable_diffusion import StableDiffusionBackbone
from rdt_lib.denoisers import ModelBranch
from rdt_lib.lora import add_lora, lora_layers
from rdt_lib.sampling import SAMPLERS, initial_noise, sample
from sd_fixtures import make_tiny_pipeline, save_tiny_sd_pipeline

# diffusers scheduler for the same steps as our sampler of that name; integer timesteps only (the network sees
# timestep(sigma), the nearest integer, as in ComfyUI; diffusers' Euler would pass fractional "linspace" timesteps)
DIFFUSERS = {"ddim": ("DDIMScheduler", {}), "euler": ("EulerDiscreteScheduler", {"timestep_spacing": "leading"}),
             "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2})}


def diffusers_scheduler(name, config, steps):
    """A diffusers scheduler with ``steps`` timesteps set, its sigma list (sigma space) and the factor that turns our
    final latent (at the last sigma) into diffusers' variance-preserving one: 1 / sqrt(1 + sigma_last^2)."""
    import diffusers

    cls_name, overrides = DIFFUSERS[name]
    base = {k: v for k, v in dict(config).items() if k != "_use_default_values"}  # else diffusers drops overrides
    sch = getattr(diffusers, cls_name).from_config({**base, **overrides})
    sch.set_timesteps(steps)
    if name == "ddim":  # VP scheduler: sigma of each timestep, then of the final alpha (alphas_cumprod[0] here)
        ac = sch.alphas_cumprod[sch.timesteps.long()]
        sigmas = torch.cat([((1 - ac) / ac) ** 0.5, ((1 - sch.final_alpha_cumprod) / sch.final_alpha_cumprod).reshape(1) ** 0.5])
    else:
        sigmas = sch.sigmas.clone().float()
    return sch, sigmas, float(1 / (1 + sigmas[-1] ** 2) ** 0.5)

PROMPTS = ["a cat", "the dog"]
STEPS = 6


def perturbed_lora(unet, seed=0, std=0.2):
    add_lora(unet, "tuned", rank=4, init_lora_weights=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(unet):
            w = layer.lora_B["tuned"].weight
            w.copy_(torch.randn(w.shape, generator=g) * std)
    return unet


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    pipe = make_tiny_pipeline(tmp_path_factory.mktemp("tok"))
    bb = StableDiffusionBackbone.from_pipeline(pipe)
    perturbed_lora(bb.network)
    return bb


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_samples_end_to_end(sd, sampler):
    tuned = ModelBranch(sd, "tuned", cfg_scale=1.0)
    kw = dict(tuned=tuned, schedule="power:2", sampler=sampler, scheduler="karras", num_steps=STEPS)
    res = sample(sd, PROMPTS, seeds=[3, 4], **kw)
    assert res.images.shape == (2, 3, 16, 16)
    assert torch.isfinite(res.images).all() and res.images.min() >= 0 and res.images.max() <= 1
    assert res.latents.shape == (2, 4, 8, 8)
    again = sample(sd, PROMPTS, seeds=[3, 4], **kw)
    assert torch.equal(res.latents, again.latents)  # same seed = same image
    other = sample(sd, PROMPTS, seeds=[5, 4], **kw)
    assert not torch.allclose(res.latents[0], other.latents[0])


@pytest.mark.parametrize("sampler", ["ddpm", "euler_ancestral", "dpmpp_2m_sde"])
def test_seed_is_independent_of_the_batch(sd, sampler):
    pair = sample(sd, PROMPTS, num_steps=STEPS, seeds=[11, 12], sampler=sampler, decode=False).latents
    alone = sample(sd, PROMPTS[1:], num_steps=STEPS, seeds=[12], sampler=sampler, decode=False).latents
    # equal up to float rounding of batch-size-dependent kernels (the noise itself is drawn per row)
    torch.testing.assert_close(pair[1:], alone, rtol=0, atol=2e-4)


@pytest.mark.parametrize("sdxl", [False, True])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_base_sampling_equals_the_diffusers_pipeline(tmp_path, sdxl, sampler):
    pipe = make_tiny_pipeline(tmp_path, sdxl=sdxl)
    bb = StableDiffusionBackbone.from_pipeline(pipe)
    noise, _ = initial_noise(bb.latent_shape(), [7, 8])
    sch, sigmas, to_vp = diffusers_scheduler(sampler, pipe.scheduler.config, STEPS)
    # diffusers starts from noise at the first timestep: noise * sqrt(1 + sigma0^2) in sigma space (max_denoise)
    ours = sample(bb, PROMPTS, sampler=sampler, sigmas=sigmas, latents=noise, max_denoise=True, decode=False).latents
    pipe.scheduler = sch
    ref = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=bb.default_cfg, latents=noise.clone(),
               output_type="latent").images
    other = sample(bb, PROMPTS, sampler=sampler, sigmas=sigmas, latents=noise, max_denoise=True, decode=False,
                   negative_prompt="x").latents
    assert (other - ours).abs().max() > 1e-3  # the comparison can fail
    # 1e-5 of the output's scale (random tiny UNets with CFG 7.5 give latents up to ~20): the sigma-space and
    # diffusers' variance-preserving arithmetic round differently in float32
    torch.testing.assert_close(ours * to_vp, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_per_model_cfg_and_switch_against_two_unets(tmp_path):
    """Full fine-tune case: a separate tuned UNet, base with CFG 7.5, tuned without CFG, switch at 4 of 6."""
    pipe = make_tiny_pipeline(tmp_path)
    base_bb = StableDiffusionBackbone.from_pipeline(pipe)
    tuned_pipe = copy.copy(pipe)
    tuned_unet = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        for p in tuned_unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tuned_pipe.register_modules(unet=tuned_unet)
    tuned_bb = StableDiffusionBackbone.from_pipeline(tuned_pipe)
    k = 4
    sch, sigmas, to_vp = diffusers_scheduler("ddim", pipe.scheduler.config, STEPS)
    ours = sample(ModelBranch(base_bb, cfg_scale=7.5), PROMPTS, tuned=ModelBranch(tuned_bb, cfg_scale=1.0),
                  schedule=f"switch:{k}", sigmas=sigmas, max_denoise=True, seeds=[1, 2], decode=False).latents

    # hand-written reference loop on diffusers' DDIM scheduler
    cond = pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]
    uncond = pipe.encode_prompt([""] * 2, "cpu", 1, False)[0]
    noise, _ = initial_noise((4, 8, 8), [1, 2])
    x = noise * sch.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(sch.timesteps):
            xin = sch.scale_model_input(x, t)
            if i < k:
                out = pipe.unet(torch.cat([xin, xin]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
                u, c = out.chunk(2)
                pred = u + 7.5 * (c - u)
            else:
                pred = tuned_unet(xin, t, encoder_hidden_states=cond).sample
            x = sch.step(pred, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours * to_vp, x, rtol=0, atol=1e-5 * float(x.abs().max()))


def test_single_copy_lora_equals_merged_copy(tmp_path):
    pipe = make_tiny_pipeline(tmp_path)
    base_unet = copy.deepcopy(pipe.unet)
    bb = StableDiffusionBackbone.from_pipeline(pipe)
    perturbed_lora(bb.network)
    merged = copy.deepcopy(bb.network)
    for layer in lora_layers(merged):
        layer.merge(adapter_names=["tuned"])
    plain = copy.deepcopy(base_unet)
    plain.load_state_dict({k.replace(".base_layer", ""): v for k, v in merged.state_dict().items() if "lora_" not in k})
    merged_pipe = copy.copy(pipe)
    merged_pipe.register_modules(unet=plain)
    base_pipe = copy.copy(pipe)
    base_pipe.register_modules(unet=base_unet)
    two_base, two_tuned = StableDiffusionBackbone.from_pipeline(base_pipe), StableDiffusionBackbone.from_pipeline(merged_pipe)
    base_only = sample(two_base, PROMPTS, num_steps=STEPS, decode=False).latents
    for schedule in ["linear", "switch@0.5"]:
        one = sample(bb, PROMPTS, tuned=ModelBranch(bb, "tuned"), schedule=schedule, num_steps=STEPS, decode=False).latents
        two = sample(two_base, PROMPTS, tuned=ModelBranch(two_tuned), schedule=schedule, num_steps=STEPS, decode=False).latents
        # merged weights round differently from base + up @ down in float32: the tolerance scales with the latents
        tol = 2e-6 * max(1.0, float(two.abs().max()))
        assert (two - base_only).abs().max() > 100 * tol  # the LoRA matters far beyond the tolerance
        torch.testing.assert_close(one, two, rtol=0, atol=tol)
    # and the batched joint pass equals two separate passes
    one_sep = sample(bb, PROMPTS, tuned=ModelBranch(bb, "tuned"), schedule="linear", num_steps=STEPS, decode=False,
                     batched=False).latents
    joint = sample(bb, PROMPTS, tuned=ModelBranch(bb, "tuned"), schedule="linear", num_steps=STEPS, decode=False).latents
    torch.testing.assert_close(joint, one_sep, rtol=0, atol=2e-6 * max(1.0, float(one_sep.abs().max())))


@pytest.mark.parametrize("sdxl", [False, True])
def test_loads_a_saved_diffusers_directory(tmp_path, sdxl):
    path = save_tiny_sd_pipeline(tmp_path / "model", sdxl=sdxl)
    bb = StableDiffusionBackbone.from_pretrained(path)
    assert bb.is_sdxl == sdxl
    assert bb.default_cfg == (5.0 if sdxl else 7.5)
    res = sample(bb, PROMPTS, num_steps=3)
    assert res.images.shape == (2, 3, 16, 16)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="could not load a diffusers model"):
        StableDiffusionBackbone.from_pretrained(tmp_path / "nothing-here", kind="sd15", local_files_only=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StableDiffusionBackbone.from_single_file(tmp_path / "missing.safetensors")
