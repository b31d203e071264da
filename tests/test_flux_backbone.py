"""FLUX.1 (flow matching, guidance-distilled, packed latents, size-dependent shift) as a backbone: a tiny random
FluxPipeline on CPU, saved and loaded through load_backbone; reference: diffusers' FluxPipeline."""

import copy

import pytest
import torch

from flow_fixtures import T5_TOKENS, make_tiny_flux_pipeline, save_pipeline
from rdt_lib.backbones.flow import FLOW_LORA_TARGETS
from rdt_lib.backbones.flux import FluxBackbone, pack_latents, unpack_latents
from rdt_lib.backbones.loading import detect_kind, load_backbone
from rdt_lib.denoisers import ModelBranch
from rdt_lib.lora import add_lora, lora_layers
from rdt_lib.model_sampling import FlowMatch, model_sampling_from_config
from rdt_lib.sampling import initial_noise, sample

PROMPTS = ["a cat", "the dog"]
SIZE = 32  # pixels: latents 16 x 16, 8 x 8 = 64 packed tokens
STEPS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_pipeline(make_tiny_flux_pipeline(tmp_path_factory.mktemp("tok")), tmp_path_factory.mktemp("flux") / "m")


def _load(model_dir):
    bb = load_backbone(model_dir)
    bb.max_sequence_length = T5_TOKENS
    return bb


@pytest.fixture(scope="module")
def bb(model_dir):
    return _load(model_dir)


@pytest.fixture(scope="module")
def pipe(model_dir):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(str(model_dir))


def _noise(bb, seeds=(7, 8)):
    return initial_noise(bb.latent_shape(SIZE, SIZE), list(seeds))[0]


def _pipeline_latents(pipe, noise, steps=STEPS, **kw):
    out = pipe(kw.pop("prompts", PROMPTS), height=SIZE, width=SIZE, num_inference_steps=steps,
               latents=pack_latents(noise), output_type="latent", max_sequence_length=T5_TOKENS, **kw).images
    return unpack_latents(out, *noise.shape[-2:])


def test_packing_round_trips_and_matches_diffusers():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 8, 12)
    assert torch.equal(pack_latents(x), FluxPipeline._pack_latents(x, 2, 16, 8, 12))
    assert torch.equal(unpack_latents(pack_latents(x), 8, 12), x)


def test_loads_with_a_size_dependent_shift(model_dir, bb):
    assert detect_kind(model_dir) == "flux" and isinstance(bb, FluxBackbone)
    assert bb.default_cfg == 1.0 and bb.guidance_distilled
    cfg = bb.scheduler_config
    # diffusers' calculate_shift: mu linear in the token count; shift = exp(mu)
    slope = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
    for h, w in [(SIZE, SIZE), (64, 32)]:
        tokens = (h // (2 * bb.vae_scale_factor)) * (w // (2 * bb.vae_scale_factor))  # 2x2-packed latents
        mu = cfg["base_shift"] + slope * (tokens - cfg["base_image_seq_len"])
        ms = bb.model_sampling_for(h, w)
        assert isinstance(ms, FlowMatch)
        assert ms.shift == pytest.approx(float(torch.tensor(mu, dtype=torch.float64).exp()), rel=1e-12)
    # no size: 1024 x 1024 (mu = max_shift, ComfyUI's Flux default)
    assert bb.model_sampling.shift == pytest.approx(float(torch.tensor(cfg["max_shift"]).double().exp()), rel=1e-6)
    assert model_sampling_from_config(cfg, image_seq_len=4096).shift == pytest.approx(bb.model_sampling.shift)
    with pytest.raises(Exception, match="multiples of 4"):
        bb.latent_shape(SIZE + 2, SIZE)


@pytest.mark.parametrize("steps", [4, 5])
def test_simple_scheduler_is_the_pipelines_sigma_list(bb, pipe, steps):
    noise = _noise(bb)
    ours = sample(bb, PROMPTS, sampler="euler", scheduler="simple", num_steps=steps, latents=noise, height=SIZE,
                  width=SIZE, decode=False)
    _pipeline_latents(pipe, noise, steps=steps)
    torch.testing.assert_close(ours.sigmas, pipe.scheduler.sigmas.float(), rtol=0, atol=1e-6)


def test_base_sampling_equals_the_flux_pipeline(bb, pipe):
    noise = _noise(bb)
    ref = _pipeline_latents(pipe, noise, guidance_scale=bb.guidance_scale)
    ours = sample(bb, PROMPTS, sampler="euler", scheduler="simple", num_steps=STEPS, latents=noise, height=SIZE,
                  width=SIZE, decode=False).latents
    other_guidance = _pipeline_latents(pipe, noise, guidance_scale=bb.guidance_scale + 4)
    other_prompt = _pipeline_latents(pipe, noise, guidance_scale=bb.guidance_scale, prompts=["a dog", "the dog"])
    assert (other_guidance - ref).abs().max() > 1e-3  # the guidance input reaches the network
    assert (other_prompt[0] - ref[0]).abs().max() > 1e-3
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * max(1.0, float(ref.abs().max())))
    images = bb.decode(ours)
    ref_images = pipe(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=pack_latents(noise),
                      output_type="pt", max_sequence_length=T5_TOKENS, guidance_scale=bb.guidance_scale).images
    torch.testing.assert_close(images, ref_images, rtol=0, atol=1e-5)


def test_cfg_above_one_is_the_pipelines_true_cfg(bb, pipe):
    noise = _noise(bb)
    ours = sample(ModelBranch(bb, cfg_scale=2.5), PROMPTS, negative_prompt="blurry", sampler="euler",
                  scheduler="simple", num_steps=STEPS, latents=noise, height=SIZE, width=SIZE, decode=False).latents
    ref = _pipeline_latents(pipe, noise, guidance_scale=bb.guidance_scale, true_cfg_scale=2.5,
                            negative_prompt=["blurry"] * 2)
    plain = _pipeline_latents(pipe, noise, guidance_scale=bb.guidance_scale)
    assert (plain - ref).abs().max() > 1e-3
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * max(1.0, float(ref.abs().max())))


def test_single_copy_lora_equals_a_merged_copy(model_dir):
    bb = _load(model_dir)
    add_lora(bb.network, "tuned", rank=4, target_modules=FLOW_LORA_TARGETS, init_lora_weights=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(bb.network):
            layer.lora_B["tuned"].weight.copy_(torch.randn(layer.lora_B["tuned"].weight.shape, generator=g) * 0.3)
    wrapped = [name for name, m in bb.network.named_modules() if hasattr(m, "lora_A")]
    assert any(n.startswith("single_transformer_blocks") for n in wrapped)
    assert any(n.startswith("transformer_blocks") and n.endswith("add_q_proj") for n in wrapped)
    merged = copy.deepcopy(bb.network)
    for layer in lora_layers(merged):
        layer.merge(adapter_names=["tuned"])
    two_tuned, two_base = _load(model_dir), _load(model_dir)
    two_tuned.network.load_state_dict({k.replace(".base_layer", ""): v for k, v in merged.state_dict().items()
                                       if "lora_" not in k})
    kw = dict(sampler="euler", scheduler="simple", num_steps=STEPS, latents=_noise(bb), height=SIZE, width=SIZE,
              decode=False)
    plain = sample(two_base, PROMPTS, **kw).latents
    one = sample(bb, PROMPTS, tuned=ModelBranch(bb, "tuned"), schedule="linear", **kw)
    two = sample(two_base, PROMPTS, tuned=ModelBranch(two_tuned), schedule="linear", **kw).latents
    assert one.evaluations["joint"] > 0 and (one.latents - plain).abs().max() > 1e-2
    torch.testing.assert_close(one.latents, two, rtol=0, atol=1e-5 * max(1.0, float(two.abs().max())))


def test_flow_scheduler_configs():
    base = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}
    assert model_sampling_from_config({**base, "shift": 3.0}).shift == 3.0
    dynamic = {**base, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
               "base_image_seq_len": 256, "max_image_seq_len": 4096}
    assert model_sampling_from_config(dynamic, image_seq_len=256).shift == pytest.approx(float(torch.tensor(0.5).exp()))
    # time_shift_type "linear": diffusers' mu / (mu + (1/t - 1)), the same curve with shift = mu
    assert model_sampling_from_config({**dynamic, "time_shift_type": "linear"}, image_seq_len=256).shift == 0.5
    with pytest.raises(ValueError, match="shift_terminal"):
        model_sampling_from_config({**base, "shift_terminal": 0.02})
