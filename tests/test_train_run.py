"""The training loop's second front door: a run built with an injected backbone and rewards, a progress callback
and a stop flag, equal to the command line's run on the same settings; one set of defaults; SDXL's own CFG."""

from __future__ import annotations

import warnings

import pytest
import torch

from rdt_lib.lora_io import load_lora_safetensors
from rdt_lib.objectives import Batch
from rdt_lib.train.checkpoint import CheckpointManager
from rdt_lib.train.config import TrainConfig, load_config
from rdt_lib.train.run import build_objective, build_run, run_training
from rdt_lib.train.trainer import TrainerSettings
from train_fixtures import run_train_cli, tiny_backbone, tiny_config, tiny_reward

SETTINGS = {"optim.lr": 2e-2, "regularizers.kl_coeff": 0.5, "optim.batch_size": 2}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_injected_backbone_run_stops_on_flag_and_equals_the_cli_run(tmp_path, capsys):
    config = tiny_config(tmp_path / "injected", **{**SETTINGS, "run.max_steps": 4})
    run = build_run(config, backbone=tiny_backbone(), rewards={"aesthetic": tiny_reward()}, log=lambda msg: None)
    steps: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_training(run, progress=lambda step, metrics: steps.append(step),
                              should_stop=lambda: len(steps) >= 2)
    assert result.interrupted and result.steps == 2 and steps == [1, 2] and len(result.history) == 2
    assert result.lora_path is None and result.checkpoint is None
    assert not (tmp_path / "injected").exists() or not list((tmp_path / "injected").glob("checkpoint-*"))
    at_stop = run.trainer.lora_state()

    # the command line on the same settings: checkpoint-2 holds the LoRA after 2 steps, the file the one after 4
    run_train_cli(tmp_path / "cli", capsys, **{**SETTINGS, "run.max_steps": 4, "checkpoint.every": 2})
    cli_state = CheckpointManager(tmp_path / "cli").load(tmp_path / "cli" / "checkpoint-2")
    moved = _max_diff(cli_state["lora"], cli_state["lora_init"])
    assert moved > 1e-3  # training changed the LoRA by far more than the tolerance below
    assert _max_diff(at_stop, cli_state["lora"]) < 1e-6

    # the stopped run continues where it stopped and writes the same LoRA file as the uninterrupted CLI run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rest = run_training(run, progress=lambda step, metrics: steps.append(step))
    assert not rest.interrupted and rest.steps == 4 and steps == [1, 2, 3, 4]
    ours, _ = load_lora_safetensors(rest.lora_path)
    theirs, _ = load_lora_safetensors(tmp_path / "cli" / "lora.safetensors")
    assert _max_diff(ours, theirs) < 1e-6
    assert load_config([rest.config_path]) == config


def test_trainer_settings_defaults_are_the_declared_ones():
    declared = TrainConfig()
    assert TrainerSettings() == TrainerSettings.from_config(declared)
    s = TrainerSettings()
    assert (s.lr, s.batch_size, s.weight_decay) == (declared.optim.lr, declared.optim.batch_size,
                                                    declared.optim.weight_decay) == (2.5e-4, 1, 0.005)


def test_unset_cfg_is_the_backbones_own_default():
    """With sampling.cfg_scale unset, SDXL trains at its default CFG 5 (not 7.5): the objective's loss equals the
    one with cfg_scale = 5 and differs from the one with 7.5."""
    backbone = tiny_backbone(sdxl=True)
    assert backbone.default_cfg == 5.0
    reward = lambda images, prompts: images.mean(dim=(1, 2, 3))  # noqa: E731
    batch = Batch(["a cat", "a dog"], [3, 4], batch_seed=1)
    losses = {}
    for cfg in (None, 5.0, 7.5):
        sets = ["objective.num_steps=2"] + ([f"sampling.cfg_scale={cfg}"] if cfg is not None else [])
        objective = build_objective(load_config([], sets, check_inputs=False))
        with torch.no_grad():
            losses[cfg] = float(objective(backbone, reward, batch).loss)
    assert load_config([], check_inputs=False).sampling.cfg_scale is None
    assert abs(losses[5.0] - losses[7.5]) > 1e-4
    assert losses[None] == pytest.approx(losses[5.0], abs=1e-7)
