"""Objectives and regularisers on the tiny SD model: direction of the reward, and each piece against an
independent computation (diffusers' own scheduler step, hand-written loops)."""

from __future__ import annotations

import pytest
import torch

from rdt_lib.objectives import (
    Batch,
    DraftK,
    DraftLV,
    ImageReFL,
    ReFL,
    l2_to_init,
    noise_to_sigma,
    normalized_reward_gradients,
    random_eta,
)
from rdt_lib.train.data import ImageCaptionFolder
from rdt_lib.train.trainer import RewardTrainer, TrainerSettings
from train_fixtures import PROMPTS, tiny_backbone, tiny_reward, write_image_folder

CFG = 2.0


@pytest.fixture(scope="module")
def image_batch(tmp_path_factory) -> Batch:
    folder = ImageCaptionFolder(write_image_folder(tmp_path_factory.mktemp("imgs")), 16)
    captions, images = folder.get([0, 1])
    return Batch(captions, [11, 12], images=images, batch_seed=5)


def _lora_snapshot(bb):
    from rdt_lib.lora import lora_parameters

    return {k: p.detach().clone() for k, p in lora_parameters(bb.network, "tuned").items()}


CASES = {
    "draft-1": (lambda: DraftK(num_steps=4, k=1, cfg_scale=CFG), {}),
    "draft-all": (lambda: DraftK(num_steps=4, k=None, cfg_scale=CFG), {}),
    "draft-lv": (lambda: DraftLV(num_steps=4, n=2, cfg_scale=CFG), {}),
    # stop steps 1-2 of 4 (t = 501, 251): at step 3 (t = 1) the x0 estimate is the latent itself, nothing to learn
    "refl": (lambda: ReFL(num_steps=4, stop_range=(1, 2), cfg_scale=CFG, reward_loss="hinge", hinge_margin=3.0,
                          loss_scale=1e-3), {}),
    "imagerefl": (lambda: ImageReFL(num_steps=4, stop_range=(2, 3), start_step=1, cfg_scale=CFG), {}),
    "kl (draft+)": (lambda: DraftK(num_steps=4, k=2, cfg_scale=CFG, kl_coeff=1.0), {}),
    "random eta": (lambda: DraftK(num_steps=4, k=2, cfg_scale=CFG, eta_range=(0.0, 1.0)), {}),
    "l2 to init": (lambda: DraftK(num_steps=4, k=1, cfg_scale=CFG), {"l2_init_coeff": 1e-4}),
    "per-reward grad norm": (lambda: DraftK(num_steps=4, k=1, cfg_scale=CFG), {"per_reward_grad_norm": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_objective_moves_reward_up_on_training_batch(case, image_batch):
    make_obj, extra = CASES[case]
    objective = make_obj()
    bb = tiny_backbone()
    if case == "per-reward grad norm":
        from rdt_lib.rewards import CombinedReward, Normalization

        reward = CombinedReward({"imagereward": tiny_reward("imagereward"), "aesthetic": tiny_reward("aesthetic")},
                                {"imagereward": 1.0, "aesthetic": 0.5},
                                {"imagereward": Normalization(), "aesthetic": Normalization(offset=-5.0)})
    else:
        reward = tiny_reward("imagereward")
    settings = TrainerSettings(lr=3e-3, batch_size=2, seed=0, grad_clip=0, **extra)
    trainer = RewardTrainer(bb, objective, reward, PROMPTS, settings=settings)
    trainer.next_batches = lambda: [image_batch]  # train on one fixed batch: its reward must go up
    before = _lora_snapshot(bb)
    with torch.no_grad():
        r0 = objective(bb, reward, image_batch).rewards.mean().item()
    history = trainer.train(3)
    with torch.no_grad():
        out = objective(bb, reward, image_batch)
    r1 = out.rewards.mean().item()
    after = _lora_snapshot(bb)
    changed = max((after[k] - before[k]).abs().max().item() for k in before)
    assert changed > 1e-4, "the LoRA weights did not change"
    assert all(h["skipped"] == 0 for h in history)
    assert r1 > r0 + 1e-3, f"{case}: reward {r0:.5f} -> {r1:.5f}"
    if case == "kl (draft+)":
        assert out.metrics["kl"] > 0  # the LoRA now differs from the base model
    if case == "per-reward grad norm":
        assert {"grad_norm/imagereward", "grad_norm/aesthetic"} <= set(history[0])
        assert set(out.reward_losses) == {"imagereward", "aesthetic"}
    if case == "l2 to init":
        assert history[-1]["l2_init"] > 0


def test_l2_to_init_pulls_weights_toward_initial_ones(image_batch):
    distances = {}
    for coeff in (0.0, 10.0):
        bb = tiny_backbone()
        reward = tiny_reward("imagereward")
        trainer = RewardTrainer(bb, DraftK(num_steps=3, k=1, cfg_scale=CFG), reward, PROMPTS,
                                settings=TrainerSettings(lr=1e-2, batch_size=2, grad_clip=0, l2_init_coeff=coeff))
        trainer.next_batches = lambda: [image_batch]
        trainer.train(4)
        distances[coeff] = sum(float(((p.detach() - trainer.init_weights[k]) ** 2).sum()) for k, p in trainer.params.items())
    assert distances[10.0] < 0.5 * distances[0.0]


# ---- re-noising against diffusers ----------------------------------------------------------------------------------


def test_noise_to_sigma_matches_diffusers_add_noise_and_flow_scale_noise():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from rdt_lib.model_sampling import FlowMatch

    bb = tiny_backbone()
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ddim = DDIMScheduler.from_config(bb.scheduler_config)
    for t in (1, 400, 999):
        a = ddim.alphas_cumprod[t]
        sigma = float(((1 - a) / a) ** 0.5)
        ref = ddim.add_noise(x0, noise, torch.tensor([t]))  # variance-preserving: sqrt(a) x0 + sqrt(1-a) noise
        ours = noise_to_sigma(bb.model_sampling, x0, noise, sigma)  # sigma space: x0 + sigma * noise
        torch.testing.assert_close(ours * a.sqrt(), ref, rtol=0, atol=1e-5)
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow.set_timesteps(5)
    t = flow.timesteps[2:3]
    sigma = float(flow.sigmas[2])
    torch.testing.assert_close(noise_to_sigma(FlowMatch(shift=3.0), x0, noise, sigma),
                               flow.scale_noise(x0, t, noise), rtol=0, atol=1e-6)


# ---- DRaFT-K gradient and KL against hand-written loops -----------------------------------------------------------


def _reference_draft1(bb, reward, prompts, seeds, num_steps, kl_coeff):
    """DRaFT-1 + KL written directly on diffusers' DDIM scheduler and the UNet (no rdt sampling code).

    DDIM's own timesteps (``1 + k * 1000 // n``, ComfyUI's ``ddim_uniform``), ending at alpha 1 (sigma 0). The start
    follows ComfyUI's rule for a list that does not start at sigma_max: ``noise * sigma0`` in sigma space, i.e.
    ``noise * sigma0 / sqrt(1 + sigma0^2)`` in DDIM's variance-preserving frame.
    """
    from diffusers import DDIMScheduler

    unet = bb.network
    sch = DDIMScheduler.from_config({**bb.scheduler_config, "set_alpha_to_one": True, "timestep_spacing": "leading",
                                     "steps_offset": 1})
    sch.set_timesteps(num_steps)
    cond = bb.encode_prompts(prompts).tensors["encoder_hidden_states"]
    uncond = bb.encode_prompts([""] * len(prompts), negative=True).tensors["encoder_hidden_states"]
    a0 = sch.alphas_cumprod[sch.timesteps[0]]
    x = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds]) * (1 - a0).sqrt()

    def guided(xx, t, use_lora):
        from rdt_lib.lora import use_adapters

        with use_adapters(unet, "tuned" if use_lora else None):
            out = unet(torch.cat([xx, xx]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        u, c = out.chunk(2)
        return u + CFG * (c - u)

    with torch.no_grad():
        for t in sch.timesteps[:-1]:
            x = sch.step(guided(x, t, True), t, x, eta=0.0).prev_sample
    t = sch.timesteps[-1]
    eps = guided(x, t, True)
    with torch.no_grad():
        eps_base = guided(x, t, False)
    x = sch.step(eps, t, x, eta=0.0).prev_sample
    img = (bb.vae.decode(x / bb.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    kl = ((eps - eps_base) ** 2).mean()
    return -reward(img, prompts).mean() + kl_coeff * kl, kl


def test_draft1_with_kl_matches_reference_loop():
    bb = tiny_backbone()
    from rdt_lib.lora import lora_parameters

    params = lora_parameters(bb.network, "tuned")
    with torch.no_grad():  # make the LoRA non-zero so the KL term is non-trivial
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))

    def reward(images, prompts):
        return (images * torch.linspace(0, 1, images.shape[-1])).mean(dim=(1, 2, 3))

    prompts, seeds = ["a cat", "a dog"], [3, 4]
    out = DraftK(num_steps=3, k=1, cfg_scale=CFG, kl_coeff=0.7, scheduler="ddim")(bb, reward, Batch(prompts, seeds))
    grads = torch.autograd.grad(out.loss, list(params.values()))
    ref_loss, ref_kl = _reference_draft1(bb, reward, prompts, seeds, 3, 0.7)
    ref_grads = torch.autograd.grad(ref_loss, list(params.values()))
    assert out.metrics["kl"] == pytest.approx(float(ref_kl), rel=1e-4)
    assert ref_kl > 0
    assert float(out.loss) == pytest.approx(float(ref_loss), rel=1e-5, abs=1e-6)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-4)


def test_draft_k_gradient_only_through_last_k_steps():
    """K = 1: perturbing the LoRA only changes the gradient path of the last step -> equals K = 1 grads, and
    differs from K = all."""
    bb = tiny_backbone()
    from rdt_lib.lora import lora_parameters

    params = list(lora_parameters(bb.network, "tuned").values())

    def reward(images, prompts):
        return images.mean(dim=(1, 2, 3))

    batch = Batch(["a cat"], [7])
    g1 = torch.autograd.grad(DraftK(num_steps=3, k=1, cfg_scale=CFG)(bb, reward, batch).loss, params,
                             allow_unused=True)
    gall = torch.autograd.grad(DraftK(num_steps=3, k=None, cfg_scale=CFG)(bb, reward, batch).loss, params,
                               allow_unused=True)
    diff = sum(float((a - b).abs().sum()) for a, b in zip(g1, gall) if a is not None and b is not None)
    assert diff > 0


# ---- ReFL / ImageReFL specifics ----------------------------------------------------------------------------------


def test_refl_stop_step_drawn_in_range_and_per_batch_seed():
    bb = tiny_backbone()
    obj = ReFL(num_steps=6, stop_range=(2, 4), cfg_scale=1.0)
    reward = lambda images, prompts: images.mean(dim=(1, 2, 3))  # noqa: E731
    stops = set()
    for seed in range(12):
        with torch.no_grad():
            a = obj(bb, reward, Batch(["a cat"], [1], batch_seed=seed)).metrics["stop_step"]
            b = obj(bb, reward, Batch(["a dog"], [2], batch_seed=seed)).metrics["stop_step"]
        assert a == b  # depends on the batch seed only
        stops.add(int(a))
    assert stops <= {2, 3, 4} and len(stops) >= 2


def test_imagerefl_start_equals_stop_runs_no_denoising_step(image_batch):
    """The reference code's k = 0 bug: starting at the stop step must not run any sampler step."""
    bb = tiny_backbone()
    calls = []
    original = bb.predict

    def counting(x, t, cond):
        calls.append(int(t.flatten()[0]) if torch.is_tensor(t) else int(t))
        return original(x, t, cond)

    bb.predict = counting
    reward = lambda images, prompts: images.mean(dim=(1, 2, 3))  # noqa: E731
    ImageReFL(num_steps=4, stop_range=(1, 1), start_step=1, cfg_scale=CFG)(bb, reward, image_batch)
    assert len(calls) == 2  # the diffusion-loss prediction and the one gradient step, both at timestep[1]
    calls.clear()
    ImageReFL(num_steps=4, stop_range=(3, 3), start_step=1, cfg_scale=CFG)(bb, reward, image_batch)
    assert len(calls) == 4  # + two no-gradient steps (1 -> 2 -> 3)


def test_imagerefl_diffusion_loss_and_periodic_plain_refl(image_batch):
    bb = tiny_backbone()
    reward = lambda images, prompts: images.mean(dim=(1, 2, 3))  # noqa: E731
    obj = ImageReFL(num_steps=4, stop_range=(2, 3), start_step=1, cfg_scale=CFG, plain_refl_every=3,
                    diffusion_loss_weight=0.01, loss_scale=0.001)
    with torch.no_grad():
        out = obj(bb, reward, Batch(image_batch.prompts, image_batch.seeds, image_batch.images, 5, step=0))
        plain = obj(bb, reward, Batch(image_batch.prompts, image_batch.seeds, image_batch.images, 5, step=2))
    assert "diffusion_mse" in out.metrics and out.metrics["diffusion_mse"] > 0
    expected = 0.001 * (0.01 * out.metrics["diffusion_mse"] - out.metrics["reward"])
    assert float(out.loss) == pytest.approx(expected, rel=1e-4)
    assert plain.metrics.get("plain_refl") == 1.0 and "diffusion_mse" not in plain.metrics


# ---- regularisers against closed forms -----------------------------------------------------------------------------


def test_l2_to_init_value_and_gradient():
    p = torch.randn(3, 4, requires_grad=True)
    p0 = torch.randn(3, 4)
    val = l2_to_init({"w": p}, {"w": p0})
    (g,) = torch.autograd.grad(val, [p])
    assert float(val) == pytest.approx(float(((p - p0) ** 2).sum()), rel=1e-6)
    assert torch.allclose(g, 2 * (p - p0).detach())


def test_normalized_reward_gradients_is_sum_of_unit_gradients():
    w = torch.randn(5, requires_grad=True)
    a, b = torch.randn(5), torch.randn(5)
    losses = {"a": 3.0 * (w * a).sum(), "b": 0.01 * ((w - b) ** 2).sum()}
    grads, norms = normalized_reward_gradients(losses, [w], {"a": 1.0, "b": 2.0})
    ga, gb = 3.0 * a, 0.02 * (w.detach() - b)
    expected = ga / ga.norm() + 2.0 * gb / gb.norm()
    assert torch.allclose(grads[0], expected, atol=1e-6)
    assert norms["a"] == pytest.approx(float(ga.norm()), rel=1e-5)


def test_random_eta_range_and_determinism():
    eta = random_eta(0.2, 0.6, 50, torch.Generator().manual_seed(3))
    again = random_eta(0.2, 0.6, 50, torch.Generator().manual_seed(3))
    values = [eta(i) for i in range(50)]
    assert all(0.2 <= v <= 0.6 for v in values) and len(set(values)) > 40
    assert values == [again(i) for i in range(50)]
    with pytest.raises(ValueError):
        random_eta(0.5, 1.5, 3, torch.Generator())


def test_random_eta_changes_ddim_samples():
    bb = tiny_backbone()
    reward = lambda images, prompts: images.mean(dim=(1, 2, 3))  # noqa: E731
    with torch.no_grad():
        a = DraftK(num_steps=4, k=1, cfg_scale=CFG)(bb, reward, Batch(["a cat"], [1], batch_seed=1)).rewards
        b = DraftK(num_steps=4, k=1, cfg_scale=CFG, eta_range=(0.5, 1.0))(bb, reward,
                                                                            Batch(["a cat"], [1], batch_seed=1)).rewards
    assert not torch.allclose(a, b)


# ---- batch sharding -------------------------------------------------------------------------------------------------


def test_global_batch_is_split_across_processes_like_one_process():
    bb = tiny_backbone()
    reward = lambda images, prompts: images.mean(dim=(1, 2, 3))  # noqa: E731
    prompts = [f"prompt {i}" for i in range(50)]

    def rows(world, rank, batch_size, accum):
        tr = RewardTrainer(bb, DraftK(num_steps=2), reward, prompts,
                           settings=TrainerSettings(batch_size=batch_size, grad_accum=accum, seed=4))
        tr.world_size, tr.rank = world, rank
        out = []
        for _ in range(2):
            out.append([(b.batch_seed, p, s) for b in tr.next_batches() for p, s in zip(b.prompts, b.seeds)])
        return out

    single = rows(1, 0, 2, 2)
    r0, r1 = rows(2, 0, 1, 2), rows(2, 1, 1, 2)
    for step in range(2):
        assert sorted(r0[step] + r1[step]) == sorted(single[step])
