"""Differentiability, determinism, batch-order independence, any image size, caching, dtypes, checkpointing and
CombinedReward."""

from __future__ import annotations

import pytest
import torch

import reward_fixtures as fx
from rdt_lib.rewards import (
    IMAGEREFL_NORMALIZATION,
    CombinedReward,
    Normalization,
    RewardModel,
    Standardize,
    clear_cache,
    load_reward,
)
from rdt_lib.rewards.preprocess import ImagePreprocess


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewards-behaviour")
    return {name: fx.make_tiny_reward(name, root) for name in fx.REWARD_NAMES}


@pytest.fixture(scope="module")
def images():
    return torch.cat([fx.natural_batch(2, 160, 240, seed=5), torch.rand(1, 3, 160, 240)])


@pytest.mark.parametrize("name", fx.REWARD_NAMES)
def test_gradients_reach_pixels_and_scores_are_deterministic(tiny, images, name):
    reward = load_reward(name, path=tiny[name])
    assert isinstance(reward, RewardModel)
    assert not any(p.requires_grad for p in reward.parameters())
    prompts = fx.PROMPTS[:3]
    x = images.clone().requires_grad_(True)
    scores = reward.score(x, prompts)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    scores.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad.abs().flatten(1).sum(1) > 0).all()  # every image receives gradient
    # A small step along the gradient increases the score: the gradient is the score's.
    with torch.no_grad():
        step = 1e-3 * x.grad / x.grad.abs().max()
        assert (reward.score((images + step).clamp(0, 1), prompts) >= scores.detach() - 1e-4).all()
        again = reward.score(images, prompts)
    assert torch.equal(again, scores.detach())


@pytest.mark.parametrize("name", fx.REWARD_NAMES)
@torch.no_grad()
def test_batch_order_does_not_change_per_image_scores(tiny, images, name):
    reward = load_reward(name, path=tiny[name])
    prompts = fx.PROMPTS[:3]
    scores = reward.score(images, prompts)
    perm = [2, 0, 1]
    permuted = reward.score(images[perm], [prompts[i] for i in perm])
    assert torch.allclose(permuted, scores[perm], rtol=1e-4, atol=1e-4)
    single = torch.stack([reward.score(images[i:i + 1], prompts[i:i + 1])[0] for i in range(3)])
    assert torch.allclose(single, scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["pickscore", "hpsv2.1", "imagereward"])
@torch.no_grad()
def test_any_image_size(tiny, name):
    reward = load_reward(name, path=tiny[name])
    for h, w in [(224, 224), (100, 333), (777, 64), (1, 5)]:
        out = reward.score(torch.rand(2, 3, h, w), ["a cat", "a dog"])
        assert out.shape == (2,) and torch.isfinite(out).all()


def test_preprocess_geometry():
    x = torch.rand(1, 3, 100, 300)
    crop = ImagePreprocess(size=50, mode="crop")(x)
    pad = ImagePreprocess(size=50, mode="pad")(x)
    assert crop.shape == pad.shape == (1, 3, 50, 50)
    # pad mode: longest side 300 -> 50, height 100 -> 17 rows of content, zero (black) rows around it
    black = (torch.zeros(3) - torch.tensor(fx.OPENAI_MEAN)) / torch.tensor(fx.OPENAI_STD)
    assert torch.allclose(pad[0, :, 0, 0], black) and torch.allclose(pad[0, :, -1, 0], black)
    assert not torch.allclose(pad[0, :, 25, 25], black)
    # identity when the image already has the target size (crop mode): only normalisation
    y = torch.rand(1, 3, 50, 50)
    mean, std = torch.tensor(fx.OPENAI_MEAN)[:, None, None], torch.tensor(fx.OPENAI_STD)[:, None, None]
    assert torch.allclose(ImagePreprocess(size=50)(y), (y - mean) / std, atol=1e-6)


def test_cache_returns_the_same_model(tiny):
    a = load_reward("hpsv2", path=tiny["hpsv2"], device="cpu")
    b = load_reward("HPSv2", path=str(tiny["hpsv2"]), device=torch.device("cpu"), dtype=torch.float32)
    assert a is b
    c = load_reward("hpsv2", path=tiny["hpsv2"], dtype=torch.bfloat16)
    assert c is not a and c.dtype == torch.bfloat16
    clear_cache()
    assert load_reward("hpsv2", path=tiny["hpsv2"]) is not a


@pytest.mark.parametrize("name", ["pickscore", "imagereward", "aesthetic"])
@torch.no_grad()
def test_bfloat16_backbone_close_to_float32(tiny, images, name):
    ref = load_reward(name, path=tiny[name]).score(images, fx.PROMPTS[:3])
    low = load_reward(name, path=tiny[name], dtype="bf16")
    out = low.score(images, fx.PROMPTS[:3])
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, rtol=0.05, atol=0.05)
    for module in low._float32_modules():
        assert all(p.dtype == torch.float32 for p in module.parameters())


@pytest.mark.parametrize("name", ["hpsv2.1", "imagereward"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny, images, name):
    reward = load_reward(name, path=tiny[name])
    prompts = fx.PROMPTS[:3]
    grads, saved = [], []
    for enabled in (False, True, False):
        reward.enable_gradient_checkpointing(enabled)
        assert reward.gradient_checkpointing is enabled
        x = images.clone().requires_grad_(True)
        count = [0]

        def pack(t, count=count):
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            scores = reward.score(x, prompts)
        scores.sum().backward()
        grads.append(x.grad)
        saved.append(count[0])
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert torch.equal(grads[0], grads[2])
    assert saved[1] < saved[0] / 2 and saved[2] == saved[0]  # activations inside the layers are not kept


def test_train_mode_is_ignored(tiny, images):
    reward = load_reward("imagereward", path=tiny["imagereward"])
    with torch.no_grad():
        before = reward.score(images, fx.PROMPTS[:3])
        reward.train()
        assert not reward.training and not reward.mlp.training
        assert torch.equal(reward.score(images, fx.PROMPTS[:3]), before)


def test_combined_reward(tiny, images):
    rewards = {name: load_reward(name, path=tiny[name]) for name in ("hpsv2.1", "pickscore", "imagereward",
                                                                      "aesthetic")}
    combined = CombinedReward(
        rewards,
        weights={"hpsv2.1": 2.0, "pickscore": 0.5, "aesthetic": 0.1},
        normalization={"hpsv2.1": "imagerefl", "pickscore": "imagerefl", "imagereward": "imagerefl",
                       "aesthetic": Normalization(offset=-5.0, scale=2.0)},
    )
    x = images.clone().requires_grad_(True)
    out = combined.score(x, fx.PROMPTS[:3])
    with torch.no_grad():
        raw = {k: r.score(images, fx.PROMPTS[:3]) for k, r in rewards.items()}
    for k in rewards:
        assert torch.allclose(out.parts[k], raw[k], atol=1e-5)
    assert torch.allclose(out.normalized["pickscore"], (raw["pickscore"] - 20.0) * 0.1, atol=1e-5)
    assert torch.allclose(out.normalized["hpsv2.1"], raw["hpsv2.1"] * 0.01, atol=1e-5)
    assert torch.allclose(out.normalized["imagereward"], (raw["imagereward"] - 0.167) * 1.0333, atol=1e-5)
    expected = (2.0 * raw["hpsv2.1"] * 0.01 + 0.5 * (raw["pickscore"] - 20) * 0.1
                + 1.0 * (raw["imagereward"] - 0.167) * 1.0333 + 0.1 * (raw["aesthetic"] - 5.0) * 2.0)
    assert torch.allclose(out.total, expected, atol=1e-4)
    out.total.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert IMAGEREFL_NORMALIZATION["pickscore"] == Normalization(offset=-20.0, scale=0.1)


def test_combined_standardize_and_errors(tiny, images):
    reward = load_reward("aesthetic", path=tiny["aesthetic"])
    fixed = CombinedReward({"a": reward}, normalization=Standardize(mean=5.0, std=0.5))
    with torch.no_grad():
        raw = reward.score(images)
        assert torch.allclose(fixed.score(images).total, (raw - 5.0) / 0.5, atol=1e-4)
        running = CombinedReward({"a": reward}, normalization="standardize")
        z = running.score(images).total  # first batch sets the statistics
        assert abs(float(z.mean())) < 1e-4 and abs(float(z.std(unbiased=False)) - 1) < 1e-2
    with pytest.raises(ValueError, match="no ImageReFL normalisation for reward 'aesthetic'"):
        CombinedReward({"a": reward}, normalization="imagerefl")
    with pytest.raises(ValueError, match="unknown rewards"):
        CombinedReward({"a": reward}, weights={"b": 1.0})
    with pytest.raises(ValueError, match="must be a Normalization"):
        CombinedReward({"a": reward}, normalization={"a": 3})
