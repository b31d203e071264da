"""Parity of the tensor path (kornia/torch preprocessing + our modules) with the reference path (PIL preprocessing
as each released implementation does it + an independently loaded model or a formula forward from the released
tensors + the score formula), on natural-looking 512x512, 768x512 and 512x768 images. Tolerance: 1% relative."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from transformers import BertTokenizer, CLIPModel, CLIPTokenizer

import reward_fixtures as fx
from rdt_lib.rewards import load_reward

SIZES = [(512, 512), (512, 768), (768, 512)]  # (height, width)
TOLERANCE = 0.01


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewards-parity")
    return {name: fx.make_tiny_reward(name, root) for name in fx.REWARD_NAMES}


@functools.lru_cache(maxsize=None)
def natural_images(height: int, width: int) -> torch.Tensor:
    # Quantised to uint8 levels: the PIL path sees exactly the same pixels.
    return fx.quantize(fx.natural_batch(3, height, width, seed=height + 3 * width))


@functools.lru_cache(maxsize=None)
def pil_pixels(kind: str, height: int, width: int) -> torch.Tensor:
    images = natural_images(height, width)
    return fx.pil_hps_pixels(images) if kind == "pad" else fx.pil_clip_pixels(images)


def _image_features(model, pixels):
    out = model.get_image_features(pixel_values=pixels)
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4.x returns the tensor


def reference(name: str, path, size: tuple[int, int], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, image-side feature) computed without rdt_lib from the PIL-preprocessed images of ``size``."""
    if name in ("pickscore", "clipscore", "aesthetic"):
        model = CLIPModel.from_pretrained(str(path)).eval()
        pixels = pil_pixels("crop", *size)
        if name == "aesthetic":
            emb = _image_features(model, pixels)
            head = torch.load(path / fx.AESTHETIC_FILE, weights_only=True)
            return fx.aesthetic_reference_head(head, emb), emb
        tokens = CLIPTokenizer.from_pretrained(str(path))(prompts, padding=True, truncation=True, max_length=77,
                                                          return_tensors="pt")
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
        if name == "pickscore":  # logit_scale.exp() * cos, the diagonal of CLIP's logits
            return out.logits_per_image.diag(), out.image_embeds
        return (100 * (out.image_embeds * out.text_embeds).sum(-1)).clamp_min(0), out.image_embeds
    if name in fx.HPS_FILES:
        sd = torch.load(path / fx.HPS_FILES[name], weights_only=True)["state_dict"]
        cfg = json.loads((path / "open_clip_config.json").read_text())["model_cfg"]
        img = fx.open_clip_reference_image(sd, cfg, pil_pixels("pad", *size))
        txt = fx.open_clip_reference_text(sd, cfg, fx.open_clip_tokens(CLIPTokenizer.from_pretrained(str(path)),
                                                                        prompts))
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        return 100 * cos, img
    assert name == "imagereward"
    sd = torch.load(path / "ImageReward.pt", weights_only=True)
    med = json.loads((path / "med_config.json").read_text())
    tok = BertTokenizer.from_pretrained(str(path))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    t = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    return fx.imagereward_reference_score(sd, med, pil_pixels("crop", *size), t["input_ids"], t["attention_mask"])


def ours(reward, images, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    if reward.name == "imagereward":
        return reward.score(images, prompts), reward.features(images, prompts)
    return reward.score(images, prompts), reward.image_features(images)


def _direction_drift(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative distance of L2-normalised features (what the cosine scores see)."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return float((a - b).norm(dim=-1).max())


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("name", fx.REWARD_NAMES)
@torch.no_grad()
def test_tensor_path_matches_pil_reference(tiny, name, height, width):
    images = natural_images(height, width)
    prompts = fx.PROMPTS[: images.shape[0]]
    reward = load_reward(name, path=tiny[name])
    ref_score, ref_feat = reference(name, tiny[name], (height, width), prompts)
    our_score, our_feat = ours(reward, images, prompts)
    drift = float(((our_score - ref_score).abs() / ref_score.abs()).max())
    feat_drift = _direction_drift(our_feat, ref_feat)
    print(f"parity {name} {width}x{height}: score drift {100 * drift:.3f}%  feature drift {100 * feat_drift:.3f}%")
    assert drift < TOLERANCE, (our_score, ref_score)
    assert feat_drift < TOLERANCE
    # Not trivially equal: the images give different scores.
    assert float(ref_score.max() - ref_score.min()) > 10 * float((our_score - ref_score).abs().max())
