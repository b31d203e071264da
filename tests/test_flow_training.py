"""Reward training of a flow model (SD3 architecture, tiny random weights): the objectives through the flow sampler
against diffusers' own scheduler steps, rewards going up, R0's preset, R0+'s intermediate supervision, bit-exact
resume, and the saved LoRA in diffusers' ``StableDiffusion3Pipeline`` and in ComfyUI's SD3 key map."""

from __future__ import annotations

import copy
import os
import signal
import warnings

import pytest
import torch

from flow_fixtures import T5_TOKENS, make_tiny_sd3_pipeline, make_tiny_sd3_transformer, save_pipeline
from rdt_lib.backbones.flow import FLOW_LORA_TARGETS
from rdt_lib.backbones.loading import load_backbone
from rdt_lib.lora import add_lora, lora_layers, lora_parameters, use_adapters
from rdt_lib.lora_io import load_lora, load_lora_safetensors, transformer_lora_to_diffusers
from rdt_lib.objectives import Batch, DraftK, ImageReFL, ReFL
from rdt_lib.rng import rng_stream
from rdt_lib.train.data import ImageCaptionFolder
from rdt_lib.sampling import initial_noise
from rdt_lib.train.checkpoint import CheckpointManager
from rdt_lib.train.config import load_config
from rdt_lib.train.run import build_run, train_from_config, validation_grid
from rdt_lib.train.trainer import RewardTrainer, TrainerSettings
from train_fixtures import PROMPTS, tiny_reward, tiny_reward_dir, write_image_folder

SIZE = 32  # pixels: 16 x 16 latents (tiny VAE: 2x), 64 image tokens
CFG = 2.0


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return save_pipeline(make_tiny_sd3_pipeline(tmp_path_factory.mktemp("tok")), tmp_path_factory.mktemp("sd3") / "m")


def sd3_backbone(sd3_dir, rank: int = 2, alpha: float | None = None, seed: int = 0, lora: bool = True):
    bb = load_backbone(sd3_dir, kind="sd3")
    bb.max_sequence_length = T5_TOKENS
    if lora:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            add_lora(bb.network, "tuned", rank=rank, alpha=alpha if alpha is not None else rank,
                     init_lora_weights="gaussian", target_modules=FLOW_LORA_TARGETS)
    return bb


def _randomise_lora(network, seed: int = 3, std: float = 0.2) -> None:
    """Nonzero lora_B weights (a LoRA that changes the output), as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(network):
            w = layer.lora_B["tuned"].weight
            w.copy_(torch.randn(w.shape, generator=g) * std)


def _mean_image(images, prompts):
    return images.mean(dim=(1, 2, 3))


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ---- the flow trajectory against diffusers ---------------------------------------------------------------------------


def _diffusers_euler_loss(bb, prompts, seeds, steps, grad_from):
    """-mean(reward) of a DRaFT trajectory written with diffusers' pieces: the pipeline's ``encode_prompt``, the raw
    transformer with CFG, and ``FlowMatchEulerDiscreteScheduler.step`` on the pipeline's default sigmas."""
    pipe = bb.pipe
    sch = copy.deepcopy(pipe.scheduler)
    sch.set_timesteps(steps)
    cond, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                            max_sequence_length=T5_TOKENS)
    uncond, _, upooled, _ = pipe.encode_prompt([""] * len(prompts), None, None, do_classifier_free_guidance=False,
                                               max_sequence_length=T5_TOKENS)
    x = initial_noise(bb.latent_shape(SIZE, SIZE), seeds)[0]  # sigma 1: pure noise
    n = len(prompts)
    for i, t in enumerate(sch.timesteps):
        with torch.set_grad_enabled(i >= grad_from), use_adapters(bb.network, "tuned"):
            out = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=t.expand(2 * n),
                                   encoder_hidden_states=torch.cat([uncond, cond]),
                                   pooled_projections=torch.cat([upooled, pooled]), return_dict=False)[0]
            u, c = out.chunk(2)
            x = sch.step(u + CFG * (c - u), t, x, return_dict=False)[0]
    images = bb.decode(x)
    return -_mean_image(images, prompts).mean(), sch.sigmas


@pytest.mark.parametrize("k", [1, None])
def test_draft_k_on_a_flow_model_equals_diffusers_euler_steps(sd3_dir, k):
    bb = sd3_backbone(sd3_dir)
    _randomise_lora(bb.network)
    params = list(lora_parameters(bb.network, "tuned").values())
    batch = Batch(["a cat", "the dog"], [7, 8])
    objective = DraftK(num_steps=3, k=k, cfg_scale=CFG, height=SIZE, width=SIZE)
    run = objective.start(bb, batch)
    assert run.sampler == "euler"  # scheduler "auto" on a flow model: Euler on the pipeline's sigma list
    out = objective(bb, _mean_image, batch)
    ref, sigmas = _diffusers_euler_loss(bb, batch.prompts, batch.seeds, 3, grad_from=0 if k is None else 2)
    torch.testing.assert_close(run.sigmas, sigmas.float(), rtol=0, atol=1e-6)
    ours_g = torch.autograd.grad(out.loss, params, allow_unused=True)
    ref_g = torch.autograd.grad(ref, params, allow_unused=True)
    assert float(out.loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-6)
    scale = max(float(g.abs().max()) for g in ref_g if g is not None)
    assert scale > 1e-9  # the reward reaches the LoRA (the tolerance below is relative to it)
    for a, b in zip(ours_g, ref_g):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_flow_eta_uses_the_rectified_flow_ancestral_step(sd3_dir):
    bb = sd3_backbone(sd3_dir)
    batch = Batch(["a cat"], [3], batch_seed=1)
    deterministic = DraftK(num_steps=3, cfg_scale=CFG, height=SIZE, width=SIZE)
    noisy = DraftK(num_steps=3, cfg_scale=CFG, height=SIZE, width=SIZE, eta_range=(0.5, 1.0))
    assert noisy.start(bb, batch).sampler == "euler_ancestral"
    with torch.no_grad():
        a = deterministic(bb, _mean_image, batch).rewards
        b = noisy(bb, _mean_image, batch).rewards
        c = noisy(bb, _mean_image, batch).rewards
        zero = DraftK(num_steps=3, cfg_scale=CFG, height=SIZE, width=SIZE, eta_range=(0.0, 0.0))(bb, _mean_image,
                                                                                                 batch).rewards
    assert not torch.allclose(a, b)  # fresh noise changes the sample
    assert torch.equal(b, c)  # ... reproducibly (per-batch eta, per-row noise streams)
    torch.testing.assert_close(zero, a, rtol=0, atol=1e-6)  # eta 0: the ancestral step is the Euler step


# ---- training raises the reward ----------------------------------------------------------------------------------


CASES = {
    "draft-1": (lambda: DraftK(num_steps=3, k=1, cfg_scale=CFG, height=SIZE, width=SIZE), {}),
    "draft+ (kl on velocity)": (lambda: DraftK(num_steps=3, k=1, cfg_scale=CFG, kl_coeff=1.0, height=SIZE,
                                               width=SIZE), {}),
    "refl": (lambda: ReFL(num_steps=4, stop_range=(1, 2), cfg_scale=CFG, height=SIZE, width=SIZE), {}),
    "imagerefl (flow noising, velocity target)": (
        lambda: ImageReFL(num_steps=4, stop_range=(2, 3), start_step=1, cfg_scale=CFG, loss_scale=1.0), {}),
    "r0+ (all steps, random eta, l2, intermediate)": (
        lambda: DraftK(num_steps=3, k=None, cfg_scale=CFG, eta_range=(0.0, 1.0), intermediate_weight=1.0,
                       height=SIZE, width=SIZE), {"l2_init_coeff": 1e-4}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_flow_training_raises_the_reward(sd3_dir, case, tmp_path):
    make_obj, extra = CASES[case]
    objective = make_obj()
    bb = sd3_backbone(sd3_dir)
    reward = tiny_reward("imagereward")
    images = None
    if "imagerefl" in case:
        images = ImageCaptionFolder(write_image_folder(tmp_path / "imgs"), SIZE).get([0, 1])[1]
    batch = Batch(PROMPTS[:2], [11, 12], batch_seed=5, images=images)
    trainer = RewardTrainer(bb, objective, reward, PROMPTS,
                            settings=TrainerSettings(lr=3e-2, batch_size=2, grad_clip=0, **extra))
    trainer.next_batches = lambda: [batch]  # one fixed batch: its reward must go up
    with torch.no_grad():
        r0 = objective(bb, reward, batch).rewards.mean().item()
    history = _quiet(trainer.train, 3)
    with torch.no_grad():
        out = objective(bb, reward, batch)
    r1 = out.rewards.mean().item()
    assert all(h["skipped"] == 0 for h in history)
    assert r1 > r0 + 1e-3, f"{case}: reward {r0:.5f} -> {r1:.5f}"
    if "kl" in case:
        assert out.metrics["kl"] > 0
    if "intermediate" in case:
        assert "intermediate_step" in history[0] and history[-1]["l2_init"] > 0
    if "imagerefl" in case:  # the diffusion loss: velocity target noise - x0 on (1 - sigma) x0 + sigma noise
        run = objective.start(bb, batch)
        sigma = run.sigma(objective.start_step)
        with torch.no_grad():
            z0 = torch.cat([bb.encode_images(images[i:i + 1], generator=rng_stream(seed, "vae_posterior"))
                            for i, seed in enumerate(batch.seeds)]).float()
            noise = initial_noise(tuple(z0.shape[1:]), batch.seeds)[0]
            with use_adapters(bb.network, "tuned"):
                v = bb.predict((1 - sigma) * z0 + sigma * noise, sigma * 1000, run.guided.cond)
        assert out.metrics["diffusion_mse"] == pytest.approx(float(((v - (noise - z0)) ** 2).mean()), rel=1e-4)


# ---- R0+: the intermediate step gets the gradient, the steps before it do not -----------------------------------


def test_intermediate_supervision_gradient_reaches_only_the_chosen_step(sd3_dir):
    bb = sd3_backbone(sd3_dir)
    _randomise_lora(bb.network)
    params = list(lora_parameters(bb.network, "tuned").values())
    steps = 4
    objective = DraftK(num_steps=steps, k=1, cfg_scale=1.0, intermediate_weight=1.0, height=SIZE, width=SIZE)
    batch = Batch(["a cat"], [5], batch_seed=9)
    j = objective.intermediate_step(batch)
    assert 0 <= j <= steps - 2
    assert {objective.intermediate_step(Batch(["x"], [0], batch_seed=s)) for s in range(20)} == set(range(steps - 1))

    calls = []  # (sigma, autograd on, input carries a gradient) for every transformer call
    hook = bb.network.register_forward_pre_hook(
        lambda mod, args, kw: calls.append((float(kw["timestep"][0]) / 1000, torch.is_grad_enabled(),
                                            kw["hidden_states"].requires_grad)), with_kwargs=True)
    seen = []

    def reward(images, prompts):  # the final image's reward counts 0, the intermediate prediction's 1
        seen.append(images.detach().clone())
        return _mean_image(images, prompts) * (0.0 if len(seen) == 1 else 1.0)

    try:
        out = objective(bb, reward, batch)
    finally:
        hook.remove()
    sigmas = [float(s) for s in objective.start(bb, batch).sigmas]
    assert out.metrics["intermediate_step"] == j
    with_grad = [(s, x_grad) for s, grad_on, x_grad in calls if grad_on]
    # K = 1: the last step, then the one extra evaluation at step j, on a latent that carries no gradient
    assert [x_grad for _, x_grad in with_grad] == [False, False]
    assert [s for s, _ in with_grad] == pytest.approx([sigmas[steps - 1], sigmas[j]], abs=1e-6)
    assert len(calls) == steps + 1

    # the rewarded prediction is the tuned model's x0 at step j of the same (no-gradient) trajectory
    run = objective.start(bb, batch)
    noise, gens = run.noise()
    at_j = {}
    with torch.no_grad():
        final = run.denoise(run.start_latent(noise), gens, callback=lambda info: at_j.setdefault(info["i"], info))
        expected = bb.decode(at_j[j]["denoised"])
    assert (at_j[j]["denoised"] - final).abs().max() > 1e-3  # the intermediate prediction is not the final sample
    assert (seen[1] - seen[0]).abs().max() > 100 * 1e-5  # ... nor its image, by far more than the tolerance
    torch.testing.assert_close(seen[1], expected, rtol=0, atol=1e-5)

    # its gradient is that of one step from the detached latent: by construction nothing flows further back
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    x_j = at_j[j]["x"].detach()
    ref = -_mean_image(bb.decode(run.denoiser(x_j, torch.full((1,), run.sigma(j)))), batch.prompts).mean()
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    scale = max(float(g.abs().max()) for g in ref_grads if g is not None)
    assert scale > 1e-6
    for a, b in zip(grads, ref_grads):
        if b is None:
            assert a is None or float(a.abs().max()) == 0.0
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


# ---- the R0 preset -----------------------------------------------------------------------------------------------

R0_TINY = {
    "model.resolution": SIZE, "objective.num_steps": 3, "lora.rank": 2, "lora.alpha": 4.0, "optim.lr": 3e-2,
    "optim.grad_accum": 1, "optim.batch_size": 1, "optim.mixed_precision": "no",
    "optim.gradient_checkpointing": False, "validation.every": 0, "logging.tensorboard": False,
    "logging.progress_bar": False, "sampling.cfg_scale": CFG,
}


def _r0_overrides(sd3_dir, output_dir, **extra) -> list[str]:
    items = {"model.path": str(sd3_dir), "run.output_dir": str(output_dir), "data.prompts": PROMPTS,
             **{f"rewards.{i}.path": str(tiny_reward_dir(n)) for i, n in enumerate(["hpsv2.1", "imagereward",
                                                                                      "clipscore"])},
             **R0_TINY, **extra}
    out = []
    for key, value in items.items():
        if isinstance(value, str):
            value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        elif isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, list):
            value = "[" + ", ".join(f'"{v}"' for v in value) + "]"
        out.append(f"{key}={value}")
    return out


def test_r0_preset_raises_its_rewards_with_its_regularisers(sd3_dir, tmp_path):
    config = load_config(["r0_sd3_multireward"], _r0_overrides(sd3_dir, tmp_path / "r0"))
    assert config.model.kind == "sd3" and config.objective.k == "all" and config.objective.num_steps == 3
    assert config.regularizers.per_reward_grad_norm and config.regularizers.l2_init_coeff > 0
    assert config.regularizers.random_eta_range == [0.0, 1.0]
    bb = sd3_backbone(sd3_dir, lora=False)
    run = build_run(config, backbone=bb, log=lambda msg: None)
    wrapped = {name.rsplit(".", 1)[-1] if not name.endswith("to_out.0") else "to_out.0"
               for name, m in bb.network.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(FLOW_LORA_TARGETS)  # lora.target_modules = [] -> both streams' attention projections
    trainer = run.trainer
    batch = Batch(PROMPTS[:1], [21], batch_seed=4)
    trainer.next_batches = lambda: [batch]
    with torch.no_grad():
        r0 = trainer.objective(bb, trainer.reward_fn, batch).rewards.mean().item()
    history = _quiet(trainer.train, 3)
    with torch.no_grad():
        r1 = trainer.objective(bb, trainer.reward_fn, batch).rewards.mean().item()
    assert {"grad_norm/hpsv2.1", "grad_norm/imagereward", "grad_norm/clipscore"} <= set(history[0])
    assert history[-1]["l2_init"] > 0
    assert r1 > r0 + 1e-3, f"reward {r0:.5f} -> {r1:.5f}"
    grid = validation_grid(bb, config, PROMPTS[:2])  # the trainer's validation images: the flow family's sampler
    assert grid.shape == (3, 2 * SIZE, len(config.validation.seeds) * SIZE) and 0 <= float(grid.min())


# ---- resume and the saved LoRA -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_runs(sd3_dir, tmp_path_factory):
    """The R0 preset on the tiny SD3 from its directory (the command line's run): 4 steps uninterrupted, and 4 steps
    interrupted by Ctrl-C after step 2 and resumed."""
    root = tmp_path_factory.mktemp("runs")
    extra = {"run.max_steps": 4, "checkpoint.every": 3, "optim.ema_decay": 0.9, "objective.intermediate_weight": 0.5,
             "optim.warmup_steps": 1, "optim.lr_schedule": "cosine"}
    full = _quiet(train_from_config, load_config(["r0_sd3_multireward"], _r0_overrides(sd3_dir, root / "full",
                                                                                        **extra)), log=lambda m: None)

    def interrupt(step, metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: checkpoint after this step, then stop

    part = _quiet(train_from_config, load_config(["r0_sd3_multireward"], _r0_overrides(sd3_dir, root / "part",
                                                                                        **extra)),
                  step_callback=interrupt, log=lambda m: None)
    resumed = _quiet(train_from_config, load_config(["r0_sd3_multireward"], _r0_overrides(
        sd3_dir, root / "part", **{**extra, "run.resume": "latest"})), log=lambda m: None)
    return full, part, resumed, root


def test_resume_after_interrupt_is_bit_exact(trained_runs):
    full, part, resumed, root = trained_runs
    assert part.interrupted and part.steps == 2 and part.lora_path is None
    assert (root / "part" / "checkpoint-2" / "meta.json").is_file()  # written on Ctrl-C, resumed from
    assert resumed.steps == 4 and len(resumed.history) == 2
    a, _ = load_lora_safetensors(full.lora_path)
    b, _ = load_lora_safetensors(resumed.lora_path)
    init = CheckpointManager(root / "full").load()["lora_init"]
    assert a.keys() == b.keys()
    assert max(float(t.abs().max()) for k, t in a.items() if k.endswith("lora_B.weight")) > 1e-3  # trained
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [h["loss"] for h in full.history[2:]] == [h["loss"] for h in resumed.history]
    assert len(init) == len(a)  # one lora_A / lora_B parameter per file tensor


def _trained_backbone(sd3_dir, root):
    """A fresh backbone with the final LoRA state of the uninterrupted run (EMA weights, as exported)."""
    state = CheckpointManager(root / "full").load()
    bb = sd3_backbone(sd3_dir, rank=2, alpha=4.0)
    missing = bb.network.load_state_dict(state["ema"], strict=False)
    assert not [k for k in state["ema"] if k in missing.unexpected_keys]
    return bb


def _transformer_inputs(bb, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (2, *bb.latent_shape(SIZE, SIZE))
    cond = bb.encode_prompts(["a cat", "the dog"])
    return dict(hidden_states=torch.randn(shape, generator=g), timestep=torch.tensor([700.0, 250.0]),
                encoder_hidden_states=cond.tensors["encoder_hidden_states"],
                pooled_projections=cond.tensors["pooled_projections"], return_dict=False)


def test_saved_lora_loads_in_diffusers_and_gives_the_trained_outputs(sd3_dir, trained_runs):
    from diffusers import StableDiffusion3Pipeline

    full, _, _, root = trained_runs
    tensors, meta = load_lora_safetensors(full.lora_path)
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert meta["ss_base_model_version"] == "sd3" and meta["rdt_lora_alpha"] == "4.0"
    bb = _trained_backbone(sd3_dir, root)
    inputs = _transformer_inputs(bb)
    with torch.no_grad(), use_adapters(bb.network, "tuned"):
        ours = bb.network(**inputs)[0]
    with torch.no_grad(), use_adapters(bb.network, None):
        base = bb.network(**inputs)[0]
    effect = float((ours - base).abs().max())

    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir))
    pipe.load_lora_weights(str(full.lora_path), adapter_name="rdt")
    with torch.no_grad():
        theirs = pipe.transformer(**inputs)[0]
    diff = float((ours - theirs).abs().max())
    print(f"diffusers load: max abs diff {diff:.3g}, LoRA effect {effect:.3g}")
    assert effect > 100 * 1e-5  # the LoRA moves the output far more than the tolerance
    assert diff < 1e-5

    # our reader (diffusers underneath) on a fresh backbone, and the same file in kohya form (OneTrainer's keys)
    fresh = sd3_backbone(sd3_dir, lora=False)
    loaded = load_lora(fresh, full.lora_path, "rdt", text_encoders=False)
    assert loaded.file_format == "peft" and loaded.modules["transformer"] == len(tensors) // 2
    with torch.no_grad(), use_adapters(fresh.network, "rdt"):
        torch.testing.assert_close(fresh.network(**inputs)[0], ours, rtol=0, atol=1e-5)
    kohya = {}
    for key, value in tensors.items():
        module = key[len("transformer."):].rsplit(".lora_", 1)[0]
        name = "lora_transformer_" + module.replace(".", "_")
        if key.endswith("lora_A.weight"):
            kohya[name + ".lora_down.weight"] = value
            kohya[name + ".alpha"] = torch.tensor(2.0 * value.shape[0])  # scale 2, undone on lora_up
        else:
            kohya[name + ".lora_up.weight"] = value / 2.0
    other = sd3_backbone(sd3_dir, lora=False)
    assert load_lora(other, kohya, "k").file_format == "kohya"
    with torch.no_grad(), use_adapters(other.network, "k"):
        torch.testing.assert_close(other.network(**inputs)[0], ours, rtol=0, atol=1e-5)


# ---- the file's keys against ComfyUI's SD3 key map ---------------------------------------------------------------


def comfyui_sd3_lora_key_map(num_blocks: int) -> dict[str, str]:
    """The LoRA key -> model weight map ComfyUI's LoraLoader builds for an SD3 model, derived by hand from its source
    (Comfy-Org/ComfyUI, ``comfy/lora.py`` ``model_lora_keys_unet`` and ``comfy/utils.py`` ``mmdit_to_diffusers``):

    - ``model_lora_keys_unet``, branch ``if isinstance(model, comfy.model_base.SD3)``: for every ``k`` of
      ``mmdit_to_diffusers(unet_config, output_prefix="diffusion_model.")`` ending in ``.weight``, the keys
      ``"transformer.{k[:-len('.weight')]}"`` (regular diffusers SD3 LoRA), ``"base_model.model.{...}"``,
      ``"lora_transformer_{... with '.' -> '_'}"`` (OneTrainer) and ``"lycoris_{...}"`` map to it.
    - ``mmdit_to_diffusers``: per block ``i`` in ``range(depth)``, ``transformer_blocks.{i}.attn.to_q/to_k/to_v``
      and ``.attn.add_q_proj/add_k_proj/add_v_proj`` (slices of ``joint_blocks.{i}.x_block.attn.qkv`` /
      ``context_block.attn.qkv``), ``.attn2.to_q/to_k/to_v`` (``x_block.attn2.qkv``), and ``MMDIT_MAP_BLOCK``, whose
      attention entries are ``attn.to_out.0`` -> ``x_block.attn.proj``, ``attn.to_add_out`` ->
      ``context_block.attn.proj``, ``attn2.to_out.0`` -> ``x_block.attn2.proj`` (plus norms, MLPs, modulation).
    - ``comfy/weight_adapter/lora.py`` ``LoRAAdapter.load``: a mapped name ``x`` is read from ``x.lora_B.weight`` (up)
      and ``x.lora_A.weight`` (down), scale ``alpha / rank`` from ``x.alpha`` when present, else 1.
    Only the attention projections are listed here (the LoRA targets); the values name ComfyUI's weights.
    """
    keys: dict[str, str] = {}
    for i in range(num_blocks):
        src, dst = f"transformer_blocks.{i}", f"diffusion_model.joint_blocks.{i}"
        pairs = {f"{src}.attn.{p}": f"{dst}.x_block.attn.qkv.weight" for p in ("to_q", "to_k", "to_v")}
        pairs.update({f"{src}.attn.{p}": f"{dst}.context_block.attn.qkv.weight"
                      for p in ("add_q_proj", "add_k_proj", "add_v_proj")})
        pairs.update({f"{src}.attn2.{p}": f"{dst}.x_block.attn2.qkv.weight" for p in ("to_q", "to_k", "to_v")})
        pairs.update({f"{src}.attn.to_out.0": f"{dst}.x_block.attn.proj.weight",
                      f"{src}.attn.to_add_out": f"{dst}.context_block.attn.proj.weight",
                      f"{src}.attn2.to_out.0": f"{dst}.x_block.attn2.proj.weight"})
        for module, weight in pairs.items():
            keys[f"transformer.{module}"] = weight
            keys[f"base_model.model.{module}"] = weight
            keys["lora_transformer_" + module.replace(".", "_")] = weight
    return keys


def test_saved_keys_are_all_in_comfyuis_sd3_key_map_and_diffusers_accepts_them():
    # an SD3.5-Medium-like block layout: a second attention (attn2) in block 0, qk norms; the last block context-only
    network = make_tiny_sd3_transformer(seed=1, num_layers=3, dual_attention_layers=(0,), qk_norm="rms_norm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        add_lora(network, "tuned", rank=2, alpha=6.0, target_modules=FLOW_LORA_TARGETS, init_lora_weights=False)
    tensors = transformer_lora_to_diffusers(network, "tuned")
    comfy = comfyui_sd3_lora_key_map(num_blocks=3)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    lora_modules = sorted("transformer." + name for name, m in network.named_modules() if hasattr(m, "lora_A"))
    assert modules == lora_modules and any(".attn2." in m for m in modules) and any("to_add_out" in m for m in modules)
    for module in modules:
        assert module in comfy, module  # ComfyUI maps the module ...
        assert {f"{module}.lora_A.weight", f"{module}.lora_B.weight"} <= set(tensors)  # ... in a form it reads
    assert len(tensors) == 2 * len(modules)  # nothing else: no .alpha keys (diffusers' SD3 loader refuses them)
    assert all("lora" in key for key in tensors)  # diffusers' load_lora_weights check
    # ComfyUI applies up @ down with scale 1 (no alpha key): the file's product is the adapter's update
    layers = dict(network.named_modules())
    for module in modules:
        layer = layers[module[len("transformer."):]]
        update = layer.scaling["tuned"] * layer.lora_B["tuned"].weight @ layer.lora_A["tuned"].weight
        product = tensors[f"{module}.lora_B.weight"] @ tensors[f"{module}.lora_A.weight"]
        assert layer.scaling["tuned"] == 3.0
        torch.testing.assert_close(product, update, rtol=1e-6, atol=1e-7)


_COMFY_SD3_SCRIPT = r'''
import json, logging, sys
comfy_dir, work = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_dir)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
from safetensors.torch import load_file, save_file
import comfy.lora, comfy.model_base, comfy.utils

not_loaded = []
class Catch(logging.Handler):
    def emit(self, record):
        if "lora key not loaded" in record.getMessage():
            not_loaded.append(record.getMessage())
logging.getLogger().addHandler(Catch())

diffusers_sd = load_file(work + "/transformer.safetensors")
lora = load_file(work + "/lora.safetensors")
unet_config = json.load(open(work + "/unet_config.json"))
# ComfyUI's MMDiT weights of the attention projections, fused as ComfyUI stores them (its own diffusers map)
parts = {}
for dkey, target in comfy.utils.mmdit_to_diffusers(unet_config, output_prefix="diffusion_model.").items():
    if dkey not in diffusers_sd or ".attn" not in dkey or not dkey.endswith(".weight"):
        continue
    if isinstance(target, str):
        parts.setdefault(target, []).append((0, diffusers_sd[dkey]))
    elif target[1] is not None:
        parts.setdefault(target[0], []).append((target[1][1], diffusers_sd[dkey]))
base = {k: torch.cat([t for _, t in sorted(v, key=lambda p: p[0])]) for k, v in parts.items()}

class ModelConfig:
    pass

class Model(comfy.model_base.SD3):  # what model_lora_keys_unet reads: the class, state_dict(), unet_config
    def __init__(self):
        pass
    def state_dict(self):
        return base
Model.model_config = ModelConfig()
Model.model_config.unet_config = unet_config

key_map = comfy.lora.model_lora_keys_unet(Model(), {})
patches = comfy.lora.load_lora(lora, key_map)
grouped = {}
for k, p in patches.items():
    key, offset = (k, None) if isinstance(k, str) else (k[0], k[1])
    grouped.setdefault(key, []).append((1.0, p, 1.0, offset, None))
patched = {k: comfy.lora.calculate_weight(v, base[k].clone().float(), k) for k, v in grouped.items()}
save_file(patched, work + "/patched.safetensors")
save_file({k: v.contiguous() for k, v in base.items()}, work + "/base.safetensors")
json.dump({"not_loaded": not_loaded, "patched_keys": len(patches)}, open(work + "/result.json", "w"))
'''


@pytest.mark.comfyui
def test_real_comfyui_maps_and_applies_every_saved_key(tmp_path):
    """ComfyUI's own code (``model_lora_keys_unet`` for an SD3 model, ``load_lora``, ``calculate_weight``) on the
    written file, in ComfyUI's Python: every key is loaded and each fused weight moves by the adapter's update."""
    import json
    import subprocess

    from safetensors.torch import load_file, save_file

    comfy_dir, comfy_python = os.environ.get("COMFYUI_DIR"), os.environ.get("COMFYUI_PYTHON")
    if not comfy_dir or not comfy_python:
        pytest.skip("needs a ComfyUI tree: eval \"$(bash scripts/comfyui_host.sh)\" (COMFYUI_DIR, COMFYUI_PYTHON)")
    depth = 2  # ComfyUI's SD3 layout: hidden size = 64 * depth (heads of 64), qkv fused
    network = make_tiny_sd3_transformer(seed=2, num_layers=depth, attention_head_dim=64, num_attention_heads=depth,
                                        caption_projection_dim=64 * depth, dual_attention_layers=(0,))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        add_lora(network, "tuned", rank=2, alpha=6.0, target_modules=FLOW_LORA_TARGETS, init_lora_weights=False)
    save_file(transformer_lora_to_diffusers(network, "tuned"), str(tmp_path / "lora.safetensors"))
    plain = {k.replace(".base_layer", ""): v.detach().contiguous() for k, v in network.state_dict().items()
             if "lora_" not in k}
    save_file(plain, str(tmp_path / "transformer.safetensors"))
    (tmp_path / "unet_config.json").write_text(json.dumps({"depth": depth}))
    (tmp_path / "check.py").write_text(_COMFY_SD3_SCRIPT)
    run = subprocess.run([comfy_python, str(tmp_path / "check.py"), comfy_dir, str(tmp_path)], cwd=comfy_dir,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["not_loaded"] == []
    layers = {name: m for name, m in network.named_modules() if hasattr(m, "lora_A")}
    assert result["patched_keys"] == len(layers)  # every LoRA'd module became one ComfyUI patch

    def delta(name):
        return layers[name].get_delta_weight("tuned").detach()

    expected = {}
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}", f"diffusion_model.joint_blocks.{i}"
        expected[f"{dst}.x_block.attn.qkv.weight"] = torch.cat([delta(f"{src}.attn.to_{p}") for p in "qkv"])
        expected[f"{dst}.x_block.attn.proj.weight"] = delta(f"{src}.attn.to_out.0")
        expected[f"{dst}.context_block.attn.qkv.weight"] = torch.cat([delta(f"{src}.attn.add_{p}_proj") for p in "qkv"])
        if f"{src}.attn.to_add_out" in layers:  # the last block is context-only
            expected[f"{dst}.context_block.attn.proj.weight"] = delta(f"{src}.attn.to_add_out")
        if f"{src}.attn2.to_q" in layers:
            expected[f"{dst}.x_block.attn2.qkv.weight"] = torch.cat([delta(f"{src}.attn2.to_{p}") for p in "qkv"])
            expected[f"{dst}.x_block.attn2.proj.weight"] = delta(f"{src}.attn2.to_out.0")
    patched, base = load_file(str(tmp_path / "patched.safetensors")), load_file(str(tmp_path / "base.safetensors"))
    assert set(patched) == set(expected)
    for key, update in expected.items():
        assert float(update.abs().max()) > 1e-3
        torch.testing.assert_close(patched[key] - base[key], update, atol=1e-5, rtol=0, msg=key)


# ---- Flux (guidance-distilled; the same code) ------------------------------------------------------------------


def test_flux_trains_on_fluxpipelines_sigmas_and_its_lora_loads_in_diffusers(tmp_path):
    import numpy as np
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from flow_fixtures import make_tiny_flux_pipeline
    from rdt_lib.backbones.flux import FluxBackbone

    def flux_backbone():
        bb = FluxBackbone.from_pipeline(make_tiny_flux_pipeline(tmp_path / "tok"))
        bb.max_sequence_length = T5_TOKENS
        return bb

    bb = flux_backbone()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        add_lora(bb.network, "tuned", rank=2, alpha=4.0, init_lora_weights="gaussian", target_modules=FLOW_LORA_TARGETS)
    objective = DraftK(num_steps=4, k=1, cfg_scale=1.0, height=SIZE, width=SIZE)  # "simple" = FluxPipeline's
    batch = Batch(PROMPTS[:2], [11, 12], batch_seed=5)                              # when N divides 1000
    run = objective.start(bb, batch)
    sch = copy.deepcopy(bb.pipe.scheduler)  # FluxPipeline's sigmas: linspace(1, 1/N, N), shifted for the image size
    c = sch.config
    tokens = (SIZE // bb.vae_scale_factor // 2) ** 2
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=calculate_shift(
        tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift))
    assert run.sampler == "euler"
    torch.testing.assert_close(run.sigmas, sch.sigmas.float(), rtol=0, atol=1e-6)

    reward = tiny_reward("imagereward")
    trainer = RewardTrainer(bb, objective, reward, PROMPTS, settings=TrainerSettings(lr=3e-2, batch_size=2,
                                                                                     grad_clip=0))
    trainer.next_batches = lambda: [batch]
    with torch.no_grad():
        r0 = objective(bb, reward, batch).rewards.mean().item()
    _quiet(trainer.train, 3)
    with torch.no_grad():
        r1 = objective(bb, reward, batch).rewards.mean().item()
    assert r1 > r0 + 1e-3, f"reward {r0:.5f} -> {r1:.5f}"

    path = tmp_path / "flux_lora.safetensors"
    from rdt_lib.lora_io import save_lora

    save_lora(bb.network, path, "tuned")
    other = flux_backbone()
    pipe = other.pipe
    assert isinstance(pipe, FluxPipeline)
    pipe.load_lora_weights(str(path), adapter_name="rdt")
    cond = bb.encode_prompts(["a cat", "the dog"])
    x = torch.randn((2, *bb.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700.0, 250.0])
    with torch.no_grad(), use_adapters(bb.network, "tuned"):
        ours = bb.forward_network(x, t, cond)
    with torch.no_grad(), use_adapters(bb.network, None):
        base = bb.forward_network(x, t, cond)
    with torch.no_grad():
        theirs = other.forward_network(x, t, cond)
    assert float((ours - base).abs().max()) > 100 * 1e-5
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
