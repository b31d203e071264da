"""Key mappings: released checkpoints -> transformers modules, checked against forwards computed directly from the
released (open_clip / BLIP / aesthetic) tensors with plain torch ops (reward_fixtures reference functions)."""

from __future__ import annotations

import json

import pytest
import torch

import reward_fixtures as fx
from rdt_lib.rewards import RewardCheckpointError, load_reward
from rdt_lib.rewards.hps import VIT_H_14_HEADS, clip_config_from_open_clip, clip_model_from_open_clip
from rdt_lib.rewards.imagereward import IMAGEREWARD_MEAN, IMAGEREWARD_STD



@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewards-mapping")
    return {name: fx.make_tiny_reward(name, root) for name in ("hpsv2", "hpsv2.1", "imagereward", "aesthetic")}


@pytest.mark.parametrize("name", ["hpsv2", "hpsv2.1"])
def test_hps_mapping_matches_open_clip_formulas(tiny, name):
    path = tiny[name]
    sd = torch.load(path / fx.HPS_FILES[name], weights_only=True)["state_dict"]
    cfg = json.loads((path / "open_clip_config.json").read_text())["model_cfg"]
    reward = load_reward(name, path=path)
    pixels = torch.randn(3, 3, 224, 224)
    ours_img = reward.pixel_features(pixels)
    ref_img = fx.open_clip_reference_image(sd, cfg, pixels)
    assert _rel(ours_img, ref_img) < 1e-5

    prompts = ["a photo of a cat", "the red car", "x " * 100]  # the last one is truncated to 77 tokens
    ours_txt = reward.text_features(prompts)
    ref_txt = fx.open_clip_reference_text(sd, cfg, fx.open_clip_tokens(reward.tokenizer, prompts))
    assert _rel(ours_txt, ref_txt) < 1e-5

    cos = (torch.nn.functional.normalize(ref_img, dim=-1) * torch.nn.functional.normalize(ref_txt, dim=-1)).sum(-1)
    assert torch.allclose(reward.score_preprocessed(pixels, prompts), 100 * cos, rtol=1e-5, atol=1e-4)


def test_hps_mapping_against_open_clip_torch_when_installed(tiny):
    open_clip = pytest.importorskip("open_clip")  # optional reference; not a dependency
    path = tiny["hpsv2.1"]
    sd = torch.load(path / fx.HPS_FILES["hpsv2.1"], weights_only=True)["state_dict"]
    cfg = json.loads((path / "open_clip_config.json").read_text())["model_cfg"]
    model = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]).eval()
    model.load_state_dict(sd)
    pixels = torch.randn(2, 3, 224, 224)
    ours = load_reward("hpsv2.1", path=path).pixel_features(pixels)
    assert _rel(ours, model.encode_image(pixels)) < 1e-5


def test_hps_prefix_and_default_vit_h_head_counts():
    # DDP "module." prefixes are stripped; without an open_clip_config.json the ViT-H-14 head widths apply.
    cfg = dict(fx.TINY_OPEN_CLIP, v_width=160, t_width=32, t_heads=16)
    sd = fx.open_clip_state_dict(cfg, vocab_size=100)
    config = clip_config_from_open_clip(sd, None)
    assert config.vision_config.num_attention_heads == 160 // VIT_H_14_HEADS["vision_head_width"]
    assert config.text_config.num_attention_heads == VIT_H_14_HEADS["text_heads"]
    assert config.vision_config.hidden_act == "gelu"
    model = clip_model_from_open_clip({"module." + k: v for k, v in sd.items()}, None)
    assert torch.equal(model.text_model.final_layer_norm.bias, sd["ln_final.bias"])
    q, k, v = sd["visual.transformer.resblocks.1.attn.in_proj_weight"].chunk(3)
    layer = model.vision_model.encoder.layers[1].self_attn
    assert torch.equal(layer.q_proj.weight, q) and torch.equal(layer.k_proj.weight, k)
    assert torch.equal(layer.v_proj.weight, v)
    assert torch.equal(model.visual_projection.weight, sd["visual.proj"].t())


def test_hps_key_mismatch_is_reported():
    sd = fx.open_clip_state_dict(vocab_size=100)
    bad = dict(sd)
    bad.pop("visual.ln_post.weight")
    bad["visual.extra.weight"] = torch.zeros(1)
    with pytest.raises(RewardCheckpointError, match="missing.*vision_model.post_layernorm.weight"):
        clip_model_from_open_clip(bad, fx.open_clip_config(vocab_size=100)["model_cfg"])
    bad = dict(sd)
    bad["visual.extra.weight"] = torch.zeros(1)
    with pytest.raises(RewardCheckpointError, match="unexpected.*visual.extra.weight"):
        clip_model_from_open_clip(bad, fx.open_clip_config(vocab_size=100)["model_cfg"])
    bad = dict(sd)
    bad["visual.ln_post.bias"] = torch.zeros(3)
    with pytest.raises(RewardCheckpointError, match="wrong shapes"):
        clip_model_from_open_clip(bad, fx.open_clip_config(vocab_size=100)["model_cfg"])


def test_imagereward_mapping_matches_blip_formulas(tiny):
    path = tiny["imagereward"]
    sd = torch.load(path / "ImageReward.pt", weights_only=True)
    med = json.loads((path / "med_config.json").read_text())
    reward = load_reward("imagereward", path=path)
    prompts = ["a photo of a cat", "an apple on a wooden table with a long description " * 3]
    pixels = torch.randn(2, 3, 224, 224)
    tokens = reward.text_tokens(prompts)
    assert tokens["input_ids"].shape == (2, 35)
    ref_score, ref_cls = fx.imagereward_reference_score(sd, med, pixels, tokens["input_ids"],
                                                        tokens["attention_mask"])
    assert _rel(reward.pixel_features(pixels, prompts), ref_cls) < 1e-5
    assert torch.allclose(reward.score_preprocessed(pixels, prompts), ref_score, rtol=1e-5, atol=1e-5)
    # The score is the normalised MLP output.
    raw = reward.mlp(ref_cls)
    assert torch.allclose(ref_score, (raw.squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD, atol=1e-5)


def test_imagereward_tokenizer_is_blips(tiny):
    tok = load_reward("imagereward", path=tiny["imagereward"]).tokenizer
    vocab_lines = (tiny["imagereward"] / "vocab.txt").read_text().split()
    assert tok.bos_token == "[DEC]"
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(vocab_lines), len(vocab_lines) + 1]
    assert tok("[ENC] cat")["input_ids"][1] == len(vocab_lines) + 1  # a special token, not split
    ids = tok(["a cat"])["input_ids"][0]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id  # [CLS] first, as ImageReward.score uses


def test_imagereward_key_mismatch_is_reported(tiny, tmp_path):
    sd = torch.load(tiny["imagereward"] / "ImageReward.pt", weights_only=True)
    sd.pop("blip.text_encoder.encoder.layer.0.crossattention.self.key.weight")
    sd["blip.visual_encoder.blocks.0.attn.unknown"] = torch.zeros(2)
    (tmp_path / "med_config.json").write_text((tiny["imagereward"] / "med_config.json").read_text())
    (tmp_path / "vocab.txt").write_text((tiny["imagereward"] / "vocab.txt").read_text())
    torch.save(sd, tmp_path / "ImageReward.pt")
    with pytest.raises(RewardCheckpointError, match=r"missing.*crossattention\.self\.key\.weight"):
        load_reward("imagereward", path=tmp_path)


def test_aesthetic_head_matches_formula(tiny):
    path = tiny["aesthetic"]
    head = torch.load(path / fx.AESTHETIC_FILE, weights_only=True)
    reward = load_reward("aesthetic", path=path)
    pixels = torch.randn(2, 3, 224, 224)
    emb = reward.pixel_features(pixels)
    assert torch.allclose(reward.score_preprocessed(pixels), fx.aesthetic_reference_head(head, emb), atol=1e-5)
