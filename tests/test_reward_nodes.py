"""The reward nodes called directly (no ComfyUI): ComfyUI IMAGE tensors [B, H, W, C] in, tiny random rewards from
reward_fixtures in a temporary models/rewards folder."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from torch import nn

import reward_fixtures as fx
from comfy_rdt_nodes import NODE_CLASS_MAPPINGS
from comfy_rdt_nodes.nodes_reward import (
    RDTRewardModelLoader,
    RDTRewardScorer,
    RDTSaveScoredImages,
    RewardHandle,
    clear_reward_cache,
    list_reward_weights,
)
from rdt_lib.rewards import (
    RewardCheckpointError,
    RewardInputError,
    RewardModel,
    RewardWeightsNotFoundError,
    UnknownRewardError,
    load_reward,
)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A models/rewards folder: each tiny reward in its own sub-folder, a loose HPS file, a hidden folder."""
    root = tmp_path_factory.mktemp("models") / "rewards"
    root.mkdir()
    for name in fx.REWARD_NAMES:
        fx.make_tiny_reward(name, root)
    for f in (fx.HPS_FILES["hpsv2"], "open_clip_config.json", "vocab.json", "merges.txt"):  # a loose HPS file
        shutil.copy(root / "tiny-hpsv2" / f, root / f)
    (root / ".cache").mkdir()
    torch.save({"x": torch.zeros(1)}, root / ".cache" / "junk.pt")
    (root / "notes.txt").write_text("not weights")
    yield root
    clear_reward_cache()


def load(folder, reward, weights, precision="auto"):
    return RDTRewardModelLoader().load(reward, weights, precision, folders=[folder])[0]


def comfy_images(n=4, h=64, w=48, seed=0):
    """A ComfyUI IMAGE: [B, H, W, C] float in [0, 1]."""
    return fx.natural_batch(n, h, w, seed=seed).permute(0, 2, 3, 1).contiguous()


def test_package_registers_the_reward_nodes():
    assert {"RDTRewardModelLoader", "RDTRewardScorer", "RDTSaveScoredImages"} <= set(NODE_CLASS_MAPPINGS)
    for cls in (RDTRewardModelLoader, RDTRewardScorer, RDTSaveScoredImages):
        assert cls.CATEGORY == "rdt/reward"
    assert RDTRewardScorer.RETURN_TYPES == ("FLOAT", "IMAGE", "IMAGE", "INT", "STRING")
    assert RDTRewardScorer.OUTPUT_IS_LIST == (True, False, False, True, False)


def test_weights_choices_list_files_and_folders(folder):
    names = list_reward_weights([folder])
    expected = ["default", "HPS_v2_compressed.pt"] + [f"tiny-{n}/" for n in fx.REWARD_NAMES] + [
        f"tiny-{n}/{fx.HPS_FILES[n]}" for n in ("hpsv2", "hpsv2.1")] + ["tiny-imagereward/ImageReward.pt"]
    # transformers folders (config.json) are offered whole, not their weight files; hidden folders and non-weights
    # files are not offered
    assert names[0] == "default"
    assert sorted(names[1:], key=str.lower) == names[1:]
    assert set(names) == set(expected)


@pytest.mark.parametrize("name", fx.REWARD_NAMES)
def test_scores_equal_reward_model_score(folder, name):
    images = comfy_images(4)
    prompts = fx.PROMPTS[:4]
    handle = load(folder, name, f"tiny-{name}/")
    out = RDTRewardScorer().score(images, "\n".join(prompts), handle, top_k=2)
    scores = torch.tensor(out["result"][0])
    reference = load_reward(name, path=folder / f"tiny-{name}", device="cpu", dtype=torch.float32)
    expected = reference.score(images.permute(0, 3, 1, 2), prompts if reference.needs_prompts else None)
    assert (expected.max() - expected.min()) > 1e-3  # the images get clearly different scores
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_loader_reuses_the_loaded_model(folder):
    a = load(folder, "hpsv2.1", "tiny-hpsv2.1/")
    b = load(folder, "hpsv2.1", "tiny-hpsv2.1/")
    c = load(folder, "hpsv2.1", "tiny-hpsv2.1/", precision="bf16")
    assert a is b and a.reward is b.reward
    assert c is not a and c.reward.dtype == torch.bfloat16 and a.reward.dtype == torch.float32
    file_choice = load(folder, "hpsv2", "HPS_v2_compressed.pt")
    assert file_choice.name == "hpsv2" and file_choice.patcher is None  # no ComfyUI: held directly


class BrightnessReward(RewardModel):
    """Test reward: the mean pixel value of each image (an image-only reward with hand-set scores)."""

    needs_prompts = False

    def __init__(self):
        super().__init__()
        self.name = "brightness"
        self.anchor = nn.Parameter(torch.zeros(1))
        self.preprocess = lambda images: images
        self._freeze()

    def score_preprocessed(self, pixels, prompts=None):
        return pixels.mean(dim=(1, 2, 3)) + self.anchor


def brightness_handle():
    return RewardHandle(name="brightness", reward=BrightnessReward(), weights="test", dtype=torch.float32,
                        load_device=torch.device("cpu"))


def test_sorting_and_top_k_against_hand_made_scores():
    levels = [0.2, 0.9, 0.5, 0.9, 0.1]  # image 1 and 3 tie: batch order decides
    images = torch.stack([torch.full((8, 6, 3), v) for v in levels])
    scores, sorted_images, top, top_indices, table = RDTRewardScorer().score(
        images, "", brightness_handle(), top_k=3)["result"]
    assert scores == pytest.approx(levels, abs=1e-6)
    order = [1, 3, 2, 0, 4]
    assert top_indices == [1, 3, 2]
    assert torch.equal(sorted_images, images[order])
    assert torch.equal(top, images[[1, 3, 2]])
    rows = table.splitlines()[1:6]
    assert [int(r.split()[1]) for r in rows] == order
    assert [r.split()[0] for r in rows] == ["1*", "2*", "3*", "4", "5"]


def test_weighted_combination_and_normalisations_against_the_formula(folder):
    images = comfy_images(4, seed=3)
    prompt = "a photo of a cat"
    hps = load(folder, "hpsv2.1", "tiny-hpsv2.1/")
    ir = load(folder, "imagereward", "tiny-imagereward/")
    pick = load(folder, "pickscore", "tiny-pickscore/")
    bchw = images.permute(0, 3, 1, 2)
    h = hps.reward.score(bchw, [prompt] * 4)
    r = ir.reward.score(bchw, [prompt] * 4)
    p = pick.reward.score(bchw, [prompt] * 4)
    node = RDTRewardScorer()

    def run(norm):
        out = node.score(images, prompt, hps, 0.7, 2, norm, ir, -0.3, pick, 2.0)["result"]
        return torch.tensor(out[0]), out[4]

    got, table = run("none")
    torch.testing.assert_close(got, 0.7 * h - 0.3 * r + 2.0 * p, rtol=1e-5, atol=1e-5)
    # ImageReFL: (r + offset) * scale with HPS 0.01 (x100 units), ImageReward offset -0.167 scale 1.0333,
    # PickScore offset -20 scale 0.1
    got, _ = run("imagerefl")
    expected = 0.7 * (h * 0.01) - 0.3 * ((r - 0.167) * 1.0333) + 2.0 * ((p - 20.0) * 0.1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    got, _ = run("standardize")
    z = lambda x: (x - x.mean()) / torch.sqrt(((x - x.mean()) ** 2).mean() + 1e-6)  # noqa: E731
    torch.testing.assert_close(got, 0.7 * z(h) - 0.3 * z(r) + 2.0 * z(p), rtol=1e-4, atol=1e-4)
    # the table lists each reward's raw score per image and the combined score
    head = table.splitlines()[0].split()
    assert head == ["rank", "image", "hpsv2.1", "imagereward", "pickscore", "combined"]
    for line in table.splitlines()[1:5]:
        cells = line.split()
        i = int(cells[1])
        assert float(cells[2]) == pytest.approx(float(h[i]), abs=1e-3)
        assert float(cells[3]) == pytest.approx(float(r[i]), abs=1e-3)


def test_same_reward_twice_gets_two_labels(folder):
    hps = load(folder, "hpsv2.1", "tiny-hpsv2.1/")
    out = RDTRewardScorer().score(comfy_images(2), "a cat", hps, 1.0, 1, "none", hps, 1.0)
    assert out["result"][4].splitlines()[0].split()[2:4] == ["hpsv2.1", "hpsv2.1#2"]


def test_ui_output_carries_the_table(folder):
    out = RDTRewardScorer().score(comfy_images(3), "a red car", load(folder, "clipscore", "tiny-clipscore/"),
                                  top_k=1)
    assert set(out) == {"ui", "result"}
    assert out["ui"]["text"] == (out["result"][4],)
    assert len(out["result"]) == 5


def test_alpha_channel_is_ignored_for_scoring_and_kept_in_outputs(folder):
    handle = load(folder, "pickscore", "tiny-pickscore/")
    rgb = comfy_images(3)
    rgba = torch.cat([rgb, torch.rand(3, rgb.shape[1], rgb.shape[2], 1)], dim=-1)
    a = RDTRewardScorer().score(rgb, "a cat", handle, top_k=3)["result"]
    b = RDTRewardScorer().score(rgba, "a cat", handle, top_k=3)["result"]
    assert a[0] == pytest.approx(b[0], abs=1e-6)
    assert b[1].shape[-1] == 4 and "alpha channel ignored" in b[4]


@pytest.mark.parametrize("images,prompt,top_k,match", [
    (comfy_images(3), "one\ntwo", 1, r"prompt has 2 lines but the batch has 3 images"),
    (comfy_images(2), "a\nb\nc", 1, r"prompt has 3 lines but the batch has 2 images"),
    (comfy_images(2), "a cat", 3, r"top_k = 3 is larger than the batch \(2 images\)"),
    (comfy_images(2), "a cat", 0, r"top_k must be an integer >= 1"),
    (torch.zeros(0, 32, 32, 3), "a cat", 1, r"empty batch"),
    (comfy_images(2) * 255, "a cat", 1, r"must be in \[0, 1\].*refused rather than clamped.*divide by 255"),
    (comfy_images(2) * 2 - 1, "a cat", 1, r"must be in \[0, 1\]"),
    (torch.rand(2, 32, 32, 2), "a cat", 1, r"3 \(RGB\) or 4 \(RGBA\) channels"),
    (torch.rand(32, 32, 3), "a cat", 1, r"rank 4"),
    (comfy_images(2), "", 1, r"prompt is empty"),
    (comfy_images(2), "a\n\n", 1, None),  # trailing empty lines are fine: one prompt for all
])
def test_bad_scorer_input(folder, images, prompt, top_k, match):
    handle = load(folder, "clipscore", "tiny-clipscore/")
    if match is None:
        assert len(RDTRewardScorer().score(images, prompt, handle, top_k=top_k)["result"][0]) == images.shape[0]
        return
    with pytest.raises(RewardInputError, match=match):
        RDTRewardScorer().score(images, prompt, handle, top_k=top_k)


def test_imagerefl_normalisation_undefined_for_aesthetic(folder):
    handle = load(folder, "aesthetic", "tiny-aesthetic/")
    with pytest.raises(RewardInputError, match=r"no ImageReFL normalisation for reward 'aesthetic'.*'standardize'"):
        RDTRewardScorer().score(comfy_images(2), "", handle, 1.0, 1, "imagerefl")
    # image-only reward: no prompt needed
    assert len(RDTRewardScorer().score(comfy_images(2), "", handle)["result"][0]) == 2


def test_unknown_reward_name(folder):
    with pytest.raises(UnknownRewardError, match=r"unknown reward 'hpsv3'.*pickscore, hpsv2, hpsv2\.1"):
        load(folder, "hpsv3", "default")


def test_missing_weights_name_folder_files_and_hub_id(folder):
    with pytest.raises(RewardWeightsNotFoundError) as err:
        load(folder, "imagereward", "ImageReward/")
    msg = str(err.value)
    assert str(folder) in msg and "models/rewards" in msg
    assert "ImageReward.pt" in msg and "med_config.json" in msg and "THUDM/ImageReward" in msg


def test_default_weights_offline_name_folder_files_and_hub_id(folder, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(RewardWeightsNotFoundError) as err:
        load(folder, "hpsv2.1", "default")
    msg = str(err.value)
    assert "xswu/HPSv2" in msg and "HPS_v2.1_compressed.pt" in msg and "models/rewards" in msg
    assert "choose it in 'weights'" in msg


def test_weights_of_the_wrong_reward(folder):
    with pytest.raises(RewardCheckpointError, match=r"HPS checkpoint.*It suits reward 'hpsv2'.*ImageReward\.pt"):
        load(folder, "imagereward", "HPS_v2_compressed.pt")
    with pytest.raises(RewardCheckpointError, match=r"version hpsv2 .*not hpsv2\.1"):
        load(folder, "hpsv2.1", "tiny-hpsv2/")


def test_save_node_names_files_by_rank_and_score_with_metadata(folder, tmp_path):
    from PIL import Image

    handle = load(folder, "hpsv2.1", "tiny-hpsv2.1/")
    images = comfy_images(4, seed=7)
    scores, _, top, indices, table = RDTRewardScorer().score(images, "a cat", handle, top_k=2)["result"]
    saver = RDTSaveScoredImages()
    out = saver.save([top], scores, indices, ["best/run"], table=[table], output_dir=str(tmp_path))
    files = [r["filename"] for r in out["ui"]["images"]]
    assert len(files) == 2
    for rank, (name, index) in enumerate(zip(files, indices), 1):
        assert name.startswith(f"run_{rank:05}_rank{rank:02}_img{index}_score{scores[index]:.4f}")
        with Image.open(tmp_path / "best" / name) as im:
            meta = json.loads(im.text["rdt_score"])
            assert meta == {"score": pytest.approx(scores[index], abs=1e-9), "rank": rank, "batch_index": index}
            assert im.text["rdt_scores_table"] == table
            pixels = torch.from_numpy(__import__("numpy").array(im)).float() / 255
        assert (pixels - top[rank - 1]).abs().max() <= 1 / 255 + 1e-6
    again = saver.save([top], scores, indices, ["best/run"], output_dir=str(tmp_path))["ui"]["images"]
    assert again[0]["filename"].startswith("run_00003_")
    with pytest.raises(RewardInputError, match="2 images but 3 indices"):
        saver.save([top], scores, indices + [0], ["x"], output_dir=str(tmp_path))
    assert math.isfinite(scores[0])
