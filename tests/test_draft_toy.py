"""DRaFT-K on the toy backbone raises the mean reward of samples over the base model's."""

import pytest
import torch

from rdt_lib.backbones.toy2d import TOY_LORA_TARGETS, GaussianMixture2D, ToyBackbone, ToyDenoiser, train_toy_base
from rdt_lib.demo import ToyReward
from rdt_lib.denoisers import ModelBranch
from rdt_lib.lora import add_lora, lora_parameters
from rdt_lib.objectives.draft import DraftK
from rdt_lib.sampling import sample
from rdt_lib.train.trainer import RewardTrainer, TrainerSettings


@pytest.fixture(scope="module")
def trained_toy():
    torch.manual_seed(0)
    mixture = GaussianMixture2D()
    bb = ToyBackbone(ToyDenoiser(hidden=64))
    train_toy_base(bb, mixture, steps=600, batch_size=256, seed=0)
    return bb, mixture


@pytest.mark.parametrize("k", [1, 5, None])
def test_draft_k_raises_the_reward(trained_toy, k):
    import copy

    bb0, mixture = trained_toy
    bb = copy.deepcopy(bb0)
    reward = ToyReward(mixture)
    add_lora(bb.network, "tuned", rank=4, target_modules=TOY_LORA_TARGETS)
    before = {n: p.detach().clone() for n, p in lora_parameters(bb.network, "tuned").items()}
    trainer = RewardTrainer(bb, DraftK(num_steps=10, k=k, scheduler="simple"), reward, [""],
                            settings=TrainerSettings(lr=1e-3, batch_size=64, seed=1))
    trainer.train(25)
    after = lora_parameters(bb.network, "tuned")
    assert any(not torch.equal(before[n], after[n]) for n in before)
    # held-out seeds, not the training ones
    # "simple" (trailing) sigmas: the last step starts at t = 99, where one gradient step can move the samples
    base = sample(bb, [""] * 512, num_steps=10, seeds=10**6, scheduler="simple").images
    tuned = sample(bb, [""] * 512, tuned=ModelBranch(bb, "tuned"), num_steps=10, seeds=10**6, scheduler="simple").images
    r_base, r_tuned = reward(base, None).mean().item(), reward(tuned, None).mean().item()
    assert r_tuned > r_base + 0.05, (r_base, r_tuned)


def test_gradient_flows_only_through_the_last_k_steps(trained_toy):
    """With K=1 the loss's gradient equals that of a loss recomputed from a detached input to the last step."""
    import copy

    bb, mixture = copy.deepcopy(trained_toy[0]), trained_toy[1]
    add_lora(bb.network, "tuned", rank=2, target_modules=TOY_LORA_TARGETS, init_lora_weights=False)
    reward = ToyReward(mixture)
    params = list(lora_parameters(bb.network, "tuned").values())
    out = DraftK(num_steps=6, k=1, scheduler="normal")(bb, reward, [""] * 8, list(range(8)))
    g_draft = torch.autograd.grad(out.loss, params, allow_unused=True)

    # independent computation: 5 Euler (DDIM, eta 0) steps without grad on the "normal" sigma list, then one with
    # grad, each written out: x0 = x - sigma * eps(x / sqrt(1 + sigma^2), t) with t the nearest training timestep
    from diffusers import DDPMScheduler

    from rdt_lib.lora import use_adapters
    from rdt_lib.sigma_schedules import normal

    ac = DDPMScheduler.from_config(bb.scheduler_config).alphas_cumprod.double()
    log_table = ((1 - ac) / ac).sqrt().log()
    sigmas = normal(bb.model_sampling, 6).tolist()
    x = torch.stack([torch.randn(2, generator=torch.Generator().manual_seed(s)) for s in range(8)])
    x = x * (1 + sigmas[0] ** 2) ** 0.5  # the list starts at sigma_max: a full denoise

    def step(x, i):
        s, s_next = sigmas[i], sigmas[i + 1]
        t = (torch.tensor(s).double().log() - log_table).abs().argmin().float().expand(8)
        with use_adapters(bb.network, "tuned"):
            eps = bb.network(x / (s ** 2 + 1) ** 0.5, t)
        x0 = x - s * eps
        return x + (x - x0) / s * (s_next - s)

    with torch.no_grad():
        for i in range(5):
            x = step(x, i)
    x = step(x, 5)
    loss = -reward(bb.decode(x), None).mean()
    g_ref = torch.autograd.grad(loss, params, allow_unused=True)
    assert any(g is not None and g.abs().max() > 0 for g in g_ref)
    for a, b in zip(g_draft, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bad_k():
    with pytest.raises(ValueError, match="K must be in"):
        DraftK(num_steps=10, k=11)
    with pytest.raises(ValueError, match="K must be in"):
        DraftK(num_steps=10, k=0)
