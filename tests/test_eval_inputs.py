"""Bad input to ``python -m rdt_lib.eval`` gets one clear ``error:`` line and exit status 2 before any image is
sampled; the config follows the trainer's conventions; prompt sets load from every accepted source; DINO's
preprocessing matches PIL's."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from eval_fixtures import eval_overrides, tiny_lora_file
from rdt_lib.eval.cli import main
from rdt_lib.eval.config import SCHEMA, load_config
from rdt_lib.eval.prompts import DEFAULT_PROMPTS, load_prompts
from rdt_lib.errors import InputError, MissingFileError
from rdt_lib.settings import ConfigError


def _never_sample(*args, **kwargs):
    raise AssertionError("the sweep sampled although its input is bad")


def _error(monkeypatch, capsys, tmp_path, *sets: str, **extra) -> str:
    """Run the CLI on the tiny preset with ``extra`` overrides; assert exit 2 with one error line; return it."""
    monkeypatch.setattr("rdt_lib.eval.sweep.sample", _never_sample)
    argv = ["--config", "tiny_cpu"]
    for item in eval_overrides(tmp_path / "run", **extra) + list(sets):
        argv += ["--set", item]
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    assert not (tmp_path / "run" / "cache").exists()
    return lines[0]


def test_unknown_schedule_names_the_accepted_forms(monkeypatch, capsys, tmp_path):
    line = _error(monkeypatch, capsys, tmp_path, **{"schedules.names": ["base", "tuned", "swich@0.5"]})
    assert "schedules.names.2" in line and "unknown schedule 'swich'" in line
    assert "switch@F" in line and "power:P" in line and "lora:S" in line
    line = _error(monkeypatch, capsys, tmp_path, **{"schedules.names": ["base", "lora:half"]})
    assert "lora:S needs a number" in line


def test_unknown_reward_lists_the_rewards(monkeypatch, capsys, tmp_path):
    line = _error(monkeypatch, capsys, tmp_path, **{"rewards.0.name": "aestetic"})
    assert "unknown reward 'aestetic'" in line and "pickscore" in line and "did you mean 'aesthetic'" in line


def test_empty_and_unreadable_prompt_files(monkeypatch, capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n   \n")
    line = _error(monkeypatch, capsys, tmp_path, **{"prompts.source": str(empty), "prompts.text": []})
    assert "has no prompts" in line and "empty.txt" in line
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00a cat\x80\x81")
    line = _error(monkeypatch, capsys, tmp_path, **{"prompts.source": str(binary), "prompts.text": []})
    assert "is not UTF-8 text" in line and "binary.txt" in line
    line = _error(monkeypatch, capsys, tmp_path, **{"prompts.source": str(tmp_path / "nope.txt"), "prompts.text": []})
    assert "does not exist" in line


def test_fewer_than_two_images_per_prompt(monkeypatch, capsys, tmp_path):
    line = _error(monkeypatch, capsys, tmp_path, **{"prompts.images_per_prompt": 1})
    assert "prompts.images_per_prompt = 1: diversity compares the images of one prompt" in line
    assert "at least 2" in line
    line = _error(monkeypatch, capsys, tmp_path, **{"prompts.seeds": [3, 4, 5]})
    assert "prompts.seeds has 3 seeds but prompts.images_per_prompt = 2" in line


def test_lora_of_another_architecture_names_the_mismatched_key_and_shapes(monkeypatch, capsys, tmp_path):
    line = _error(monkeypatch, capsys, tmp_path, **{"tuned.path": str(tiny_lora_file(sdxl=True))})
    assert "does not fit this sd15 model" in line and "size mismatch for" in line
    assert line.count("torch.Size(") == 2 and "lora_" in line


def test_lora_scaling_without_a_lora_and_spectral_without_base(monkeypatch, capsys, tmp_path):
    line = _error(monkeypatch, capsys, tmp_path, **{"tuned.type": "model"})
    assert "need a LoRA" in line
    line = _error(monkeypatch, capsys, tmp_path, **{"schedules.names": ["tuned", "linear"]})
    assert "add 'base' to schedules.names" in line


def test_dataset_prompt_sets_say_how_to_install_datasets(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    line = _error(monkeypatch, capsys, tmp_path, **{"prompts.source": "hpdv2", "prompts.text": []})
    assert "zhwang/HPDv2" in line and "pip install datasets" in line
    with pytest.raises(InputError, match="nateraw/parti-prompts.*pip install datasets"):
        load_prompts("parti")
    with pytest.raises(InputError, match="'someone/prompts'.*pip install datasets"):
        load_prompts("hf:someone/prompts")


def test_unknown_keys_suggest_and_help_lists_every_key(capsys):
    with pytest.raises(ConfigError, match=r"unknown key 'sampling.stepz'; did you mean 'sampling.steps'\?"):
        load_config(["tiny_cpu"], ["sampling.stepz=3"], check_inputs=False)
    with pytest.raises(ConfigError, match=r"did you mean 'sampling.steps'\?"):
        load_config([], ["num_inference_steps=3"], check_inputs=False)
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for key in SCHEMA.all_keys():
        assert key in text, key
    assert "Presets (use as a config file name): sd15_lora, tiny_cpu" in text
    for name in SCHEMA.list_presets():
        assert load_config([name], check_inputs=False).schedules.names


def test_print_config_round_trips(tmp_path, capsys):
    assert main(["--config", "tiny_cpu", "--set", "model.path=x/y", "--set", "tuned.path=a/b", "--print-config"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "c.toml").write_text(text)
    assert load_config([tmp_path / "c.toml"], check_inputs=False) == load_config(
        ["tiny_cpu"], ["model.path=x/y", "tuned.path=a/b"], check_inputs=False)


# --------------------------------------------------------------------------------------------------------------
# prompt sets


def test_prompt_sources(tmp_path):
    assert load_prompts("default") == list(DEFAULT_PROMPTS) and len(set(DEFAULT_PROMPTS)) >= 16
    (tmp_path / "p.txt").write_text("# heading\na cat\n\n  a dog  \n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    (tmp_path / "p.json").write_text(json.dumps(["x", {"prompt": "y"}]))
    assert load_prompts(str(tmp_path / "p.json")) == ["x", "y"]
    (tmp_path / "p.csv").write_text('id,Prompt,Category\n1,"a red car, at night",cars\n2,a tree,plants\n')
    assert load_prompts(str(tmp_path / "p.csv")) == ["a red car, at night", "a tree"]
    assert load_prompts(str(tmp_path / "p.csv"), column="Category", limit=1) == ["cars"]
    with pytest.raises(InputError, match="no column 'text'; its columns: id, Prompt, Category"):
        load_prompts(str(tmp_path / "p.csv"), column="text")
    assert load_prompts("ignored", inline=["u", "v"]) == ["u", "v"]
    with pytest.raises(MissingFileError):
        load_prompts(str(tmp_path / "missing.csv"))
    with pytest.raises(InputError, match="neither a prompt file"):
        load_prompts("hpdv3")


# --------------------------------------------------------------------------------------------------------------
# DINO preprocessing


def test_dino_preprocessing_matches_the_image_processor_imagerefl_uses():
    """ImageReFL feeds DINO through ``AutoImageProcessor.from_pretrained("facebook/dino-vits16")``: a
    ``ViTImageProcessor`` resizing to 224 x 224 with PIL's bilinear filter and ImageNet normalisation (its
    preprocessor_config.json); the PIL version of that processor, so configured, is the reference."""
    import numpy as np
    from transformers import ViTImageProcessorPil

    from reward_fixtures import natural_image
    from rdt_lib.eval.embedding import IMAGENET_MEAN, IMAGENET_STD, dino_preprocess

    image = natural_image(300, 400, seed=1)  # [3, 300, 400] in [0, 1], not square: no crop, the whole image
    ours = dino_preprocess(image[None])[0]
    processor = ViTImageProcessorPil(size={"height": 224, "width": 224}, resample=2, image_mean=list(IMAGENET_MEAN),
                                     image_std=list(IMAGENET_STD))
    pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    ref = torch.as_tensor(np.asarray(processor(images=[pixels], return_tensors="np")["pixel_values"][0]))
    assert ours.shape == ref.shape == (3, 224, 224)
    assert (ref - ref.mean()).abs().mean() > 0.3  # the image is not flat
    assert (ours - ref).abs().mean() < 0.02  # PIL's 8-bit resampling vs torch's antialiased bilinear


def test_with_several_processes_a_failure_before_sampling_stops_every_process(monkeypatch):
    from rdt_lib.eval import sweep

    class TwoProcesses:
        num_processes = 2

    sent = []

    def gather_object(items):  # what accelerate's gather gives: every process's list, concatenated
        sent.extend(items)
        return items + ["prompt file 'p.txt' has no prompts"]

    monkeypatch.setattr("accelerate.utils.gather_object", gather_object)
    with pytest.raises(InputError, match="another process stopped before sampling: prompt file 'p.txt' has no"):
        sweep._agree(TwoProcesses(), None)
    assert sent == [""]
    with pytest.raises(MissingFileError, match="no weights"):
        sweep._agree(TwoProcesses(), MissingFileError("no weights"))
    assert sent == ["", "no weights"]
