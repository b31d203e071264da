"""Bad input and bad weights: each a ValueError (or a dedicated error type) that says what is expected."""

from __future__ import annotations

import pickle

import pytest
import torch

import reward_fixtures as fx
from rdt_lib.rewards import (
    RewardCheckpointError,
    RewardInputError,
    RewardWeightsNotFoundError,
    UnknownRewardError,
    available,
    load_reward,
)


@pytest.fixture(scope="module")
def clip_reward(tmp_path_factory):
    return load_reward("clipscore", path=fx.make_tiny_reward("clipscore", tmp_path_factory.mktemp("inputs")))


@pytest.fixture(scope="module")
def aesthetic_reward(tmp_path_factory):
    return load_reward("aesthetic", path=fx.make_tiny_reward("aesthetic", tmp_path_factory.mktemp("inputs-aes")))


GOOD = torch.rand(2, 3, 64, 48)


@pytest.mark.parametrize(
    "images,match",
    [
        (GOOD * 255, r"\[0, 1\].*0\.\.255.*divide by 255"),
        (GOOD * 2 - 1, r"\[0, 1\].*\(images \+ 1\) / 2"),
        (GOOD + 0.5, r"must be in \[0, 1\]"),
        (GOOD[0], r"rank 4.*unsqueeze\(0\)"),
        (GOOD[None], r"rank 4"),
        (torch.rand(2, 4, 32, 32), r"3 \(RGB\) channels"),
        (torch.rand(2, 32, 32, 3), r"channels-last"),
        (torch.rand(0, 3, 32, 32), r"empty batch"),
        (torch.tensor([[[[float("nan")]]]]).expand(1, 3, 8, 8), r"NaN or inf"),
        (torch.full((1, 3, 8, 8), float("inf")), r"NaN or inf"),
        ((GOOD * 255).to(torch.uint8), r"floating-point.*float\(\) / 255"),
        ([[0.5]], r"torch.Tensor"),
    ],
)
def test_bad_images(clip_reward, images, match):
    with pytest.raises(RewardInputError, match=match):
        clip_reward.score(images, ["a cat"] * max(1, images.shape[0] if isinstance(images, torch.Tensor) else 1))


def test_errors_are_value_errors(clip_reward):
    with pytest.raises(ValueError):
        clip_reward.score(GOOD * 255, ["a", "b"])
    with pytest.raises(ValueError):
        load_reward("no-such-reward")


def test_small_rounding_overshoot_is_accepted(clip_reward):
    images = GOOD.clone()
    images[0, 0, 0, 0] = 1.0005
    images[0, 0, 0, 1] = -0.0005
    assert clip_reward.score(images, ["a", "b"]).shape == (2,)


@pytest.mark.parametrize(
    "prompts,match",
    [
        (["only one"], r"2 images but 1 prompts"),
        (["a", "b", "c"], r"2 images but 3 prompts"),
        ("a single string", r"single string.*\[prompt\] \* B"),
        (["a", 3], r"item 1 is int"),
        (None, r"needs one prompt per image"),
        (42, r"list of strings"),
    ],
)
def test_bad_prompts(clip_reward, prompts, match):
    with pytest.raises(RewardInputError, match=match):
        clip_reward.score(GOOD, prompts)


def test_image_only_reward_accepts_no_prompts(aesthetic_reward):
    assert aesthetic_reward.score(GOOD).shape == (2,)
    with pytest.raises(RewardInputError, match="2 images but 1 prompts"):
        aesthetic_reward.score(GOOD, ["x"])


def test_unknown_reward_name_lists_the_known_ones():
    with pytest.raises(UnknownRewardError, match="unknown reward 'hpsv3'.*pickscore.*hpsv2.1.*imagereward"):
        load_reward("hpsv3")
    assert set(available()) == {"pickscore", "hpsv2", "hpsv2.1", "imagereward", "aesthetic", "clipscore"}
    info = available()["hpsv2.1"]
    assert "xswu/HPSv2/HPS_v2.1_compressed.pt" in info.sources[0] and "100 * cosine" in info.units


def test_bad_dtype():
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        load_reward("clipscore", path=".", dtype=torch.int8)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_needing_code_is_refused(tmp_path, capsys):
    path = fx.make_tiny_reward("hpsv2", tmp_path)
    with open(path / fx.HPS_FILES["hpsv2"], "wb") as f:
        pickle.dump({"state_dict": {"x": _Evil()}}, f, protocol=2)
    with pytest.raises(RewardCheckpointError, match="needs code execution"):
        load_reward("hpsv2", path=path)
    assert "this must never run" not in capsys.readouterr().out


def test_checkpoint_with_wrong_keys(tmp_path):
    path = fx.make_tiny_reward("aesthetic", tmp_path)
    torch.save({"weight": torch.zeros(3)}, path / fx.AESTHETIC_FILE)
    with pytest.raises(RewardCheckpointError, match=r"not a LAION aesthetic head.*linear layers \{0,2,4,6,7\}"):
        load_reward("aesthetic", path=path)
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(8, 3, 4, 4)}}, tmp_path / "other.pt")
    with pytest.raises(RewardCheckpointError, match="not an open_clip ViT CLIP state dict"):
        load_reward("hpsv2", path=tmp_path / "other.pt")


def test_hf_directory_with_mismatched_weights(tmp_path):
    import json

    path = fx.make_tiny_reward("pickscore", tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["vision_config"]["hidden_size"] = 48
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RewardCheckpointError, match="pickscore"):
        load_reward("pickscore", path=path)


def test_missing_path_and_missing_files(tmp_path):
    with pytest.raises(RewardWeightsNotFoundError, match="does not exist"):
        load_reward("imagereward", path=tmp_path / "nowhere")
    with pytest.raises(RewardWeightsNotFoundError, match=r"should contain 'ImageReward\.pt'.*THUDM/ImageReward"):
        load_reward("imagereward", path=tmp_path)
    with pytest.raises(RewardCheckpointError, match="transformers CLIP directory"):
        load_reward("pickscore", path=tmp_path)


def test_missing_weights_without_hub_name_repo_file_and_local_path(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never wait for the network
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(RewardWeightsNotFoundError) as err:
        load_reward("hpsv2.1", device="cpu")
    msg = str(err.value)
    assert "xswu/HPSv2" in msg and "HPS_v2.1_compressed.pt" in msg and "path=" in msg
    # A local directory without tokenizer files falls back to the hub tokenizer and names that repo.
    path = fx.make_tiny_reward("hpsv2", tmp_path)
    (path / "vocab.json").unlink()
    (path / "merges.txt").unlink()
    with pytest.raises(RewardWeightsNotFoundError, match="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        load_reward("hpsv2", path=path)
