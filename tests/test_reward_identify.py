"""Reward loaders look at the given weights' keys first: another reward's weights fail at once, with no hub access,
naming what was found and what the reward expects (issue 13)."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import save_file

import reward_fixtures as fx
from rdt_lib.rewards import RewardCheckpointError, identify_reward_file, load_reward

ALL = set(fx.REWARD_NAMES)

# What the weights at each source suit, written out by hand (independent of the library's table).
SUITS = {
    "pickscore_dir": {"pickscore", "clipscore", "aesthetic"},
    "clipscore_dir": {"pickscore", "clipscore", "aesthetic"},
    "aesthetic_dir": {"aesthetic", "clipscore"},
    "hpsv2_dir": {"hpsv2"},
    "hpsv2.1_dir": {"hpsv2.1"},
    "imagereward_dir": {"imagereward"},
    "hpsv2_file": {"hpsv2"},
    "hpsv2.1_file": {"hpsv2.1"},
    "hps_renamed_file": {"hpsv2", "hpsv2.1"},  # the name does not tell the version: either is accepted
    "hps_v21_metadata_file": {"hpsv2.1"},  # safetensors metadata tells the version, the name does not
    "imagereward_file": {"imagereward"},
    "aesthetic_head_file": {"aesthetic"},
    "sd_checkpoint_file": set(),
    "lora_file": set(),
}
# Words of the error naming what was found.
FOUND_WORDS = {
    "pickscore_dir": "transformers CLIP folder", "clipscore_dir": "transformers CLIP folder",
    "aesthetic_dir": "LAION aesthetic folder", "hpsv2_dir": "HPS checkpoint", "hpsv2.1_dir": "HPS checkpoint",
    "imagereward_dir": "ImageReward checkpoint", "hpsv2_file": "HPS checkpoint", "hpsv2.1_file": "HPS checkpoint",
    "hps_renamed_file": "HPS checkpoint", "hps_v21_metadata_file": "HPS checkpoint",
    "imagereward_file": "ImageReward checkpoint", "aesthetic_head_file": "LAION aesthetic head",
    "sd_checkpoint_file": "Stable Diffusion checkpoint", "lora_file": "LoRA file",
}
# Words of the error naming what the requested reward expects.
EXPECT_WORDS = {
    "pickscore": "ViT-H/14", "clipscore": "ViT-L/14", "aesthetic": "sac+logos+ava1-l14-linearMSE.pth",
    "hpsv2": "HPS_v2_compressed.pt", "hpsv2.1": "HPS_v2.1_compressed.pt", "imagereward": "med_config.json",
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("identify")
    dirs = {name: fx.make_tiny_reward(name, root) for name in fx.REWARD_NAMES}
    out = {f"{name}_dir": d for name, d in dirs.items()}
    out["hpsv2_file"] = dirs["hpsv2"] / fx.HPS_FILES["hpsv2"]
    out["hpsv2.1_file"] = dirs["hpsv2.1"] / fx.HPS_FILES["hpsv2.1"]
    out["imagereward_file"] = dirs["imagereward"] / "ImageReward.pt"
    out["aesthetic_head_file"] = dirs["aesthetic"] / fx.AESTHETIC_FILE
    renamed = root / "renamed"
    shutil.copytree(dirs["hpsv2.1"], renamed)
    (renamed / fx.HPS_FILES["hpsv2.1"]).rename(renamed / "reward.pt")
    out["hps_renamed_file"] = renamed / "reward.pt"
    meta = root / "meta"
    shutil.copytree(dirs["hpsv2.1"], meta)
    sd = torch.load(meta / fx.HPS_FILES["hpsv2.1"], weights_only=True)["state_dict"]
    (meta / fx.HPS_FILES["hpsv2.1"]).unlink()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(meta / "hps.safetensors"),
              metadata={"hps_version": "v2.1"})
    out["hps_v21_metadata_file"] = meta / "hps.safetensors"
    other = root / "other"
    other.mkdir()
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(other / "sd15.safetensors"))
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)},
              str(other / "style.safetensors"))
    out["sd_checkpoint_file"] = other / "sd15.safetensors"
    out["lora_file"] = other / "style.safetensors"
    return out


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No hub: offline mode, and any call into the download functions fails the test."""
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_hub(*args, **kwargs):
        raise AssertionError(f"hub accessed: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)


WRONG = [(src, reward) for src, ok in SUITS.items() for reward in sorted(ALL - ok)]


def test_every_source_has_wrong_pairings_and_every_reward_is_refused_somewhere():
    assert {s for s, _ in WRONG} == set(SUITS)
    assert {r for _, r in WRONG} == ALL


@pytest.mark.parametrize("source,reward", WRONG)
def test_wrong_kind_fails_fast_naming_found_and_expected(sources, source, reward):
    start = time.perf_counter()
    with pytest.raises(RewardCheckpointError) as err:
        load_reward(reward, path=sources[source], device="cpu")
    elapsed = time.perf_counter() - start
    msg = str(err.value)
    assert elapsed < 1.0, f"{elapsed:.2f} s"
    assert FOUND_WORDS[source] in msg, msg
    assert EXPECT_WORDS[reward] in msg, msg
    assert str(sources[source].name) in msg, msg


def test_hps_versions_refuse_each_other_by_name_and_by_metadata(sources):
    with pytest.raises(RewardCheckpointError, match=r"version hpsv2\.1 \(told by file name\).*not hpsv2\b"):
        load_reward("hpsv2", path=sources["hpsv2.1_file"])
    with pytest.raises(RewardCheckpointError, match=r"version hpsv2 \(told by file name\).*not hpsv2\.1"):
        load_reward("hpsv2.1", path=sources["hpsv2_dir"])
    with pytest.raises(RewardCheckpointError, match=r"metadata hps_version='v2\.1'"):
        load_reward("hpsv2", path=sources["hps_v21_metadata_file"])


def test_the_issue_case_hps_given_to_imagereward(sources):
    with pytest.raises(RewardCheckpointError) as err:
        load_reward("imagereward", path=sources["hpsv2.1_file"])
    msg = str(err.value)
    assert "HPS checkpoint" in msg and "ImageReward.pt" in msg and "It suits reward 'hpsv2.1'" in msg


@pytest.mark.parametrize("source,reward", [("aesthetic_dir", "clipscore"), ("hps_renamed_file", "hpsv2"),
                                           ("hps_renamed_file", "hpsv2.1"), ("hps_v21_metadata_file", "hpsv2.1"),
                                           ("clipscore_dir", "pickscore")])
def test_suitable_sources_load(sources, source, reward):
    images = fx.natural_batch(2, 64, 64)
    scores = load_reward(reward, path=sources[source], device="cpu").score(images, fx.PROMPTS[:2])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_identify_kinds_and_details(sources):
    kind, d = identify_reward_file(sources["imagereward_dir"])
    assert kind == "imagereward" and d["med_config"].endswith("med_config.json")
    kind, d = identify_reward_file(sources["hpsv2.1_dir"])
    assert kind == "hps" and set(d["versions"]) == {"hpsv2.1"}
    kind, d = identify_reward_file(sources["aesthetic_dir"])
    assert kind == "aesthetic" and d["head"].endswith(fx.AESTHETIC_FILE)
    kind, d = identify_reward_file(sources["pickscore_dir"] / "model.safetensors")
    assert kind == "clip" and d["family"] is None  # tiny sizes: neither released family
    assert identify_reward_file(sources["aesthetic_head_file"])[0] == "aesthetic_head"
    assert identify_reward_file(sources["hps_renamed_file"])[1]["versions"] == {}


def _fake_clip_dir(path, vision_hidden, patch, proj):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "clip", "projection_dim": proj,
                                                  "vision_config": {"hidden_size": vision_hidden,
                                                                    "patch_size": patch}}))
    save_file({"logit_scale": torch.zeros(())}, str(path / "model.safetensors"))
    return path


def test_released_clip_sizes_tell_pickscore_from_clip_l(tmp_path):
    clip_l = _fake_clip_dir(tmp_path / "clip-l", 1024, 14, 768)
    clip_h = _fake_clip_dir(tmp_path / "clip-h", 1280, 14, 1024)
    with pytest.raises(RewardCheckpointError, match=r"its CLIP is ViT-L/14, pickscore uses CLIP ViT-H/14"):
        load_reward("pickscore", path=clip_l)
    with pytest.raises(RewardCheckpointError, match=r"its CLIP is ViT-H/14, clipscore uses CLIP ViT-L/14.*'pickscore'"):
        load_reward("clipscore", path=clip_h)
    assert identify_reward_file(clip_h)[1]["family"] == "ViT-H/14"
