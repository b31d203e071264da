"""SD3 (flow matching) as a backbone: tiny random-weight SD3 pipelines on CPU, loaded through load_backbone.

References: diffusers' own StableDiffusion3Pipeline (same latents, output_type="latent") for single-model sampling
and decoding; hand-written Euler loops over the raw transformers (diffusers' FlowMatchEulerDiscreteScheduler steps)
for switching, the linear mix and per-model CFG; a merged copy of the transformer for the single-copy LoRA path.
"""

import copy

import pytest
import torch

from flow_fixtures import T5_DIM, T5_TOKENS, make_tiny_sd3_pipeline, save_pipeline
from rdt_lib.backbones.flow import FLOW_LORA_TARGETS
from rdt_lib.backbones.loading import MODEL_KINDS, detect_kind, load_backbone
from rdt_lib.backbones.sd3 import StableDiffusion3Backbone
from rdt_lib.denoisers import ModelBranch
from rdt_lib.lora import add_lora, lora_layers
from rdt_lib.model_sampling import FlowMatch
from rdt_lib.sampling import initial_noise, sample

PROMPTS = ["a cat", "the dog"]
SIZE = 32  # pixels; latents 16 x 16 (tiny VAE: 2x)
STEPS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_pipeline(make_tiny_sd3_pipeline(tmp_path_factory.mktemp("tok")), tmp_path_factory.mktemp("sd3") / "m")


def _load(model_dir, **kw):
    bb = load_backbone(model_dir, **kw)
    bb.max_sequence_length = T5_TOKENS
    return bb


@pytest.fixture(scope="module")
def bb(model_dir):
    return _load(model_dir)


def _reference_pipe(model_dir, **kw):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(str(model_dir), **kw)


def _noise(bb, seeds=(7, 8)):
    return initial_noise(bb.latent_shape(SIZE, SIZE), list(seeds))[0]


def _scheduler_sigmas(pipe, steps):
    sch = copy.deepcopy(pipe.scheduler)
    sch.set_timesteps(steps)
    return sch.sigmas.clone().float()


def perturbed_lora(network, seed=0, std=0.3):
    add_lora(network, "tuned", rank=4, target_modules=FLOW_LORA_TARGETS, init_lora_weights=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(network):
            w = layer.lora_B["tuned"].weight
            w.copy_(torch.randn(w.shape, generator=g) * std)
    return network


def test_loads_as_a_flow_model_with_the_schedulers_shift(model_dir, bb):
    assert "sd3" in MODEL_KINDS and "flux" in MODEL_KINDS
    assert detect_kind(model_dir) == "sd3"
    assert isinstance(bb, StableDiffusion3Backbone)
    ms = bb.model_sampling
    assert isinstance(ms, FlowMatch) and ms.shift == 3.0
    assert float(ms.timestep(torch.tensor(0.25))) == 250.0  # the network's timestep is sigma * 1000
    assert bb.latent_shape(SIZE, SIZE) == (16, 16, 16)
    assert not any(p.requires_grad for p in bb.network.parameters())  # load_backbone freezes
    with pytest.raises(Exception, match="multiples of 4"):
        bb.latent_shape(30, 32)


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_base_sampling_equals_the_diffusers_pipeline(model_dir, bb, sampler):
    pipe = _reference_pipe(model_dir)
    noise = _noise(bb)
    ours = sample(ModelBranch(bb, cfg_scale=4.0), PROMPTS, sampler=sampler, scheduler="normal", num_steps=STEPS,
                  latents=noise, height=SIZE, width=SIZE, decode=False)
    # the `normal` sigma list on the model's FlowMatch is diffusers' default FlowMatchEulerDiscreteScheduler list
    torch.testing.assert_close(ours.sigmas, _scheduler_sigmas(pipe, STEPS), rtol=0, atol=1e-6)
    ref = pipe(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=4.0, latents=noise.clone(),
               output_type="latent", max_sequence_length=T5_TOKENS).images
    other_seed = sample(ModelBranch(bb, cfg_scale=4.0), PROMPTS, sampler=sampler, num_steps=STEPS, height=SIZE,
                        width=SIZE, latents=_noise(bb, (9, 8)), decode=False).latents
    other_prompt = sample(ModelBranch(bb, cfg_scale=4.0), ["a dog", "the dog"], sampler=sampler, num_steps=STEPS,
                          height=SIZE, width=SIZE, latents=noise, decode=False).latents
    assert (other_seed[0] - ours.latents[0]).abs().max() > 1e-2  # the comparison can fail
    assert (other_prompt[0] - ours.latents[0]).abs().max() > 1e-2
    torch.testing.assert_close(ours.latents, ref, rtol=0, atol=1e-5 * max(1.0, float(ref.abs().max())))


def test_decode_equals_the_pipelines_image(model_dir, bb):
    pipe = _reference_pipe(model_dir)
    noise = _noise(bb)
    latents = sample(bb, PROMPTS, sampler="euler", num_steps=2, latents=noise, height=SIZE, width=SIZE,
                     decode=False).latents
    images = bb.decode(latents)
    ref = pipe(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=bb.default_cfg,
               latents=noise.clone(), output_type="pt", max_sequence_length=T5_TOKENS).images
    assert images.shape == (2, 3, SIZE, SIZE)
    assert (images[0] - images[1]).abs().max() > 1e-2
    torch.testing.assert_close(images, ref, rtol=0, atol=1e-5)
    # encode_images inverts the shift and scale: decoding the posterior mean's latent gives a similar image
    z = bb.encode_images(images)
    assert z.shape == latents.shape


def test_t5_is_optional(model_dir):
    no_t5 = _load(model_dir, t5=False)
    assert no_t5.pipe.text_encoder_3 is None and not no_t5.has_t5
    cond = no_t5.encode_prompts(PROMPTS)
    emb = cond.tensors["encoder_hidden_states"]
    assert emb.shape == (2, 77 + T5_TOKENS, T5_DIM)
    assert torch.count_nonzero(emb[:, 77:]) == 0  # T5's tokens are zeros without T5, as diffusers does
    noise = _noise(no_t5)
    ours = sample(no_t5, PROMPTS, sampler="euler", num_steps=3, latents=noise, height=SIZE, width=SIZE,
                  decode=False).latents
    ref_pipe = _reference_pipe(model_dir, text_encoder_3=None, tokenizer_3=None)
    ref = ref_pipe(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=no_t5.default_cfg,
                   latents=noise.clone(), output_type="latent", max_sequence_length=T5_TOKENS).images
    with_t5 = _load(model_dir)
    full = sample(with_t5, PROMPTS, sampler="euler", num_steps=3, latents=noise, height=SIZE, width=SIZE,
                  decode=False).latents
    assert (full - ours).abs().max() > 1e-3
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * max(1.0, float(ref.abs().max())))
    with pytest.raises(ValueError, match="accepted for kind .sd3. only"):
        load_backbone(model_dir, kind="flux", t5=False)


def _euler_reference(pipe, transformers_and_cfg, weights, noise, steps):
    """diffusers' scheduler steps on a hand mix ``sum_m w_m(i) * v_m`` of the transformers' guided velocities."""
    sch = copy.deepcopy(pipe.scheduler)
    sch.set_timesteps(steps)
    cond, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                            max_sequence_length=T5_TOKENS)
    uncond, _, upooled, _ = pipe.encode_prompt([""] * 2, None, None, do_classifier_free_guidance=False,
                                               max_sequence_length=T5_TOKENS)
    x = noise.clone()
    with torch.no_grad():
        for i, t in enumerate(sch.timesteps):
            mix = 0
            for (net, cfg), w in zip(transformers_and_cfg, weights(i)):
                if w == 0:
                    continue
                if cfg == 1.0:
                    v = net(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=cond,
                            pooled_projections=pooled, return_dict=False)[0]
                else:
                    out = net(hidden_states=torch.cat([x, x]), timestep=t.expand(4),
                              encoder_hidden_states=torch.cat([uncond, cond]),
                              pooled_projections=torch.cat([upooled, pooled]), return_dict=False)[0]
                    u, c = out.chunk(2)
                    v = u + cfg * (c - u)
                mix = mix + w * v
            x = sch.step(mix, t, x, return_dict=False)[0]
    return x, sch.sigmas


@pytest.fixture(scope="module")
def tuned_pair(model_dir):
    """A base backbone and a full fine-tune (a perturbed copy of the transformer) as a second backbone."""
    base = _load(model_dir)
    tuned = _load(model_dir)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in tuned.network.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return base, tuned


def test_switch_equals_base_then_tuned(model_dir, tuned_pair):
    base, tuned = tuned_pair
    k, steps = 2, STEPS
    noise = _noise(base)
    ours = sample(ModelBranch(base, cfg_scale=5.0), PROMPTS, tuned=ModelBranch(tuned, cfg_scale=1.0),
                  schedule=f"switch:{k}", sampler="euler", num_steps=steps, latents=noise, height=SIZE, width=SIZE,
                  decode=False)
    pipe = base.pipe
    ref, sigmas = _euler_reference(pipe, [(base.network, 5.0), (tuned.network, 1.0)],
                                   lambda i: (1.0, 0.0) if i < k else (0.0, 1.0), noise, steps)
    torch.testing.assert_close(ours.sigmas, sigmas, rtol=0, atol=1e-6)
    base_only, _ = _euler_reference(pipe, [(base.network, 5.0)], lambda i: (1.0,), noise, steps)
    assert (base_only - ref).abs().max() > 1e-2
    torch.testing.assert_close(ours.latents, ref, rtol=0, atol=1e-5 * max(1.0, float(ref.abs().max())))
    assert ours.evaluations["base"] == k and ours.evaluations["tuned"] == steps - k  # zero-weight models skipped


def test_linear_step_equals_the_hand_mix(tuned_pair):
    base, tuned = tuned_pair
    noise = _noise(base)
    ours = sample(ModelBranch(base, cfg_scale=3.0), PROMPTS, tuned=ModelBranch(tuned, cfg_scale=3.0),
                  schedule="linear", sampler="euler", num_steps=STEPS, latents=noise, height=SIZE, width=SIZE,
                  decode=False).latents
    ref, _ = _euler_reference(base.pipe, [(base.network, 3.0), (tuned.network, 3.0)],
                              lambda i: (1 - i / STEPS, i / STEPS), noise, STEPS)
    tuned_only, _ = _euler_reference(base.pipe, [(tuned.network, 3.0)], lambda i: (1.0,), noise, STEPS)
    assert (tuned_only - ref).abs().max() > 1e-2
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * max(1.0, float(ref.abs().max())))


def test_single_copy_lora_equals_a_merged_copy(model_dir):
    bb = _load(model_dir)
    perturbed_lora(bb.network)
    wrapped = [name for name, m in bb.network.named_modules() if hasattr(m, "lora_A")]
    for target in FLOW_LORA_TARGETS:  # both streams' attention projections carry the adapter
        assert any(name.endswith("attn." + target) for name in wrapped), target
    merged = copy.deepcopy(bb.network)
    for layer in lora_layers(merged):
        layer.merge(adapter_names=["tuned"])
    two_tuned = _load(model_dir)
    two_tuned.network.load_state_dict({k.replace(".base_layer", ""): v for k, v in merged.state_dict().items()
                                       if "lora_" not in k})
    two_base = _load(model_dir)
    noise = _noise(bb)
    kw = dict(sampler="euler", num_steps=STEPS, latents=noise, height=SIZE, width=SIZE, decode=False)
    plain = sample(two_base, PROMPTS, **kw).latents
    for schedule in ["linear", "switch:2"]:
        one = sample(bb, PROMPTS, tuned=ModelBranch(bb, "tuned"), schedule=schedule, **kw).latents
        two = sample(two_base, PROMPTS, tuned=ModelBranch(two_tuned), schedule=schedule, **kw).latents
        assert (one - plain).abs().max() > 1e-2  # the LoRA changes the samples
        torch.testing.assert_close(one, two, rtol=0, atol=1e-5 * max(1.0, float(two.abs().max())))
    separate = sample(bb, PROMPTS, tuned=ModelBranch(bb, "tuned"), schedule="power:2", batched=False, **kw).latents
    joint = sample(bb, PROMPTS, tuned=ModelBranch(bb, "tuned"), schedule="power:2", **kw)
    assert joint.evaluations["joint"] > 0
    torch.testing.assert_close(joint.latents, separate, rtol=0, atol=1e-5 * max(1.0, float(separate.abs().max())))


def test_bad_inputs_are_clear_errors(tmp_path, model_dir):
    from rdt_lib.errors import InputError, MissingFileError, ModelLoadError

    with pytest.raises(ModelLoadError, match="could not load a diffusers sd3 model"):
        StableDiffusion3Backbone.from_pretrained(tmp_path / "nothing-here", local_files_only=True)
    with pytest.raises(MissingFileError, match="does not exist"):
        StableDiffusion3Backbone.from_single_file(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(InputError, match="not an SD3 / Flux checkpoint"):
        StableDiffusion3Backbone.from_single_file(tmp_path / "lora.safetensors", config=model_dir)


@pytest.mark.parametrize("t5", [True, False])
def test_single_file_checkpoint_loads_offline_with_a_local_config(tmp_path, model_dir, t5):
    from flow_fixtures import save_sd3_single_file

    pipe = _reference_pipe(model_dir, **({} if t5 else {"text_encoder_3": None, "tokenizer_3": None}))
    path = save_sd3_single_file(pipe, tmp_path / "sd3_tiny.safetensors")
    assert detect_kind(path) == "sd3"
    bb = load_backbone(path, single_file_config=model_dir, t5=t5)
    assert isinstance(bb, StableDiffusion3Backbone) and bb.has_t5 == t5
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2") + (("text_encoder_3",) if t5 else ()):
        ours, ref = getattr(bb.pipe, name).state_dict(), getattr(pipe, name).state_dict()
        assert ours.keys() == ref.keys(), name
        assert all(torch.equal(ours[k], ref[k]) for k in ref), name
    bb.max_sequence_length = T5_TOKENS
    from_dir = _load(model_dir, t5=t5)
    kw = dict(sampler="euler", num_steps=2, latents=_noise(bb), height=SIZE, width=SIZE, decode=False)
    torch.testing.assert_close(sample(bb, PROMPTS, **kw).latents, sample(from_dir, PROMPTS, **kw).latents,
                               rtol=0, atol=0)


def test_single_file_without_t5_weights_needs_t5_false(tmp_path, model_dir):
    from flow_fixtures import save_sd3_single_file
    from rdt_lib.errors import InputError

    pipe = _reference_pipe(model_dir, text_encoder_3=None, tokenizer_3=None)
    path = save_sd3_single_file(pipe, tmp_path / "sd3_no_t5.safetensors")
    with pytest.raises(InputError, match="no T5 text encoder weights.*t5=False"):
        load_backbone(path, single_file_config=model_dir)


def test_importing_the_library_does_not_import_diffusers():
    import subprocess
    import sys

    code = ("import sys, rdt_lib.backbones as b, rdt_lib.sampling; loaded = 'diffusers' in sys.modules; "
            "print(loaded, b.StableDiffusion3Backbone.__name__, b.FluxBackbone.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "StableDiffusion3Backbone", "FluxBackbone"]
