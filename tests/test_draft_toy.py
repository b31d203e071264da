"""DRaFT-K on the toy backbone raises the mean reward of samples over the base model's."""

import pytest
import torch

from rdt_lib.backbones.toy2d import TOY_LORA_TARGETS, GaussianMixture2D, ToyBackbone, ToyDenoiser, train_toy_base
from rdt_lib.demo import toy_reward
from rdt_lib.dual import ModelBranch
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
    reward = toy_reward(mixture)
    add_lora(bb.network, "tuned", rank=4, target_modules=TOY_LORA_TARGETS)
    before = {n: p.detach().clone() for n, p in lora_parameters(bb.network, "tuned").items()}
    trainer = RewardTrainer(bb, DraftK(num_steps=10, k=k), reward, [""],
                            settings=TrainerSettings(lr=1e-3, batch_size=64, seed=1))
    trainer.train(25)
    after = lora_parameters(bb.network, "tuned")
    assert any(not torch.equal(before[n], after[n]) for n in before)
    # held-out seeds, not the training ones
    base = sample(bb, [""] * 512, num_steps=10, seeds=10**6).images
    tuned = sample(bb, [""] * 512, tuned=ModelBranch(bb, "tuned"), num_steps=10, seeds=10**6).images
    r_base, r_tuned = reward(base, None).mean().item(), reward(tuned, None).mean().item()
    assert r_tuned > r_base + 0.05, (r_base, r_tuned)


def test_gradient_flows_only_through_the_last_k_steps(trained_toy):
    """With K=1 the loss's gradient equals that of a loss recomputed from a detached input to the last step."""
    import copy

    bb, mixture = copy.deepcopy(trained_toy[0]), trained_toy[1]
    add_lora(bb.network, "tuned", rank=2, target_modules=TOY_LORA_TARGETS, init_lora_weights=False)
    reward = toy_reward(mixture)
    params = list(lora_parameters(bb.network, "tuned").values())
    out = DraftK(num_steps=6, k=1)(bb, reward, [""] * 8, list(range(8)))
    g_draft = torch.autograd.grad(out.loss, params, allow_unused=True)

    # independent computation: run 5 steps without grad, then one step with grad by hand
    from rdt_lib.sampling import initial_noise, make_scheduler

    sch = make_scheduler("ddim", bb.scheduler_config)
    sch.set_timesteps(6)
    x, _ = initial_noise((2,), list(range(8)))
    x = x * sch.init_noise_sigma
    with torch.no_grad():
        for t in sch.timesteps[:5]:
            x = sch.step(bb.predict(x, t, bb.encode_prompts([""] * 8), "tuned"), t, x, eta=0.0).prev_sample
    t = sch.timesteps[5]
    x = sch.step(bb.predict(x, t, bb.encode_prompts([""] * 8), "tuned"), t, x, eta=0.0).prev_sample
    loss = -reward(bb.decode(x), None).mean()
    g_ref = torch.autograd.grad(loss, params, allow_unused=True)
    for a, b in zip(g_draft, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bad_k():
    with pytest.raises(ValueError, match="K must be in"):
        DraftK(num_steps=10, k=11)
    with pytest.raises(ValueError, match="K must be in"):
        DraftK(num_steps=10, k=0)
