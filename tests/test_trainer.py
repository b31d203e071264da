"""The trainer application on the tiny SD model: kohya output loads in diffusers, resume == uninterrupted,
Ctrl-C checkpoints, NaN handling, EMA, logging outputs."""

from __future__ import annotations

import json
import os
import signal
import warnings

import pytest
import torch

from rdt_lib.lora_io import load_lora_safetensors
from rdt_lib.objectives import Batch, DraftK
from rdt_lib.train.checkpoint import CheckpointManager
from rdt_lib.train.run import train_from_config
from rdt_lib.train.trainer import NonFiniteLossError, RewardTrainer, TrainerSettings
from train_fixtures import PROMPTS, tiny_backbone, tiny_config, tiny_sd_dir


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_kohya_file_loads_in_diffusers_and_matches_trained_model(tmp_path):
    from diffusers import StableDiffusionPipeline

    from rdt_lib.backbones.stable_diffusion import StableDiffusionBackbone
    from rdt_lib.lora import add_lora, use_adapters
    from sd_fixtures import unet_inputs

    config = tiny_config(tmp_path / "run", **{"run.max_steps": 2, "optim.lr": 5e-2, "logging.tensorboard": True,
                                              "validation.every": 2, "checkpoint.every": 0})
    result = _quiet(train_from_config, config)
    assert result.lora_path.is_file() and result.config_path.is_file()
    tensors, meta = load_lora_safetensors(result.lora_path)
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_up.weight") for k in tensors)
    assert any(k.endswith(".lora_down.weight") for k in tensors) and any(k.endswith(".alpha") for k in tensors)
    assert meta["rdt_objective"] == "draft" and meta["rdt_steps"] == "2" and meta["ss_network_dim"] == "2"
    assert json.loads(meta["rdt_rewards"])[0]["name"] == "aesthetic"
    assert meta["rdt_base_model"] == str(tiny_sd_dir())
    # the resolved config round-trips
    from rdt_lib.train.config import load_config

    assert load_config([result.config_path]) == config
    # logging outputs
    assert (tmp_path / "run" / "validation" / "step-000002.png").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "run" / "logs").iterdir())

    # the trained peft model, rebuilt from the final checkpoint
    state = CheckpointManager(tmp_path / "run").load()
    assert state["meta"]["step"] == 2
    bb = StableDiffusionBackbone.from_pretrained(tiny_sd_dir())
    with torch.random.fork_rng(devices=[]):
        add_lora(bb.network, "tuned", rank=2, alpha=2.0, init_lora_weights="gaussian")
    missing = bb.network.load_state_dict(state["lora"], strict=False)
    assert not [k for k in state["lora"] if k in missing.unexpected_keys]
    inputs = unet_inputs()
    with torch.no_grad(), use_adapters(bb.network, "tuned"):
        ours = bb.network(**inputs).sample
    with torch.no_grad(), use_adapters(bb.network, None):
        base = bb.network(**inputs).sample

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir()), safety_checker=None)
    pipe.load_lora_weights(str(result.lora_path), adapter_name="rdt")
    with torch.no_grad():
        theirs = pipe.unet(**inputs).sample
    diff = (ours - theirs).abs().max().item()
    print(f"kohya load max abs diff {diff:.3g} (LoRA effect {(ours - base).abs().max().item():.3g})")
    assert (ours - base).abs().max().item() > 1e-3  # the LoRA does something
    assert diff < 1e-4


def _final_lora(result):
    tensors, _ = load_lora_safetensors(result.lora_path)
    return tensors


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path):
    extra = {"run.max_steps": 4, "optim.lr": 2e-2, "checkpoint.every": 3, "optim.ema_decay": 0.9,
             "regularizers.kl_coeff": 0.5, "optim.warmup_steps": 2, "optim.lr_schedule": "cosine",
             "optim.batch_size": 2}
    full = _quiet(train_from_config, tiny_config(tmp_path / "full", **extra))

    def interrupt(step, metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: checkpoint after this step, then stop

    part = _quiet(train_from_config, tiny_config(tmp_path / "part", **extra), step_callback=interrupt)
    assert part.interrupted and part.steps == 2 and part.lora_path is None
    assert CheckpointManager(tmp_path / "part").latest().name == "checkpoint-2"
    resumed = _quiet(train_from_config, tiny_config(tmp_path / "part", **{**extra, "run.resume": "latest"}))
    assert resumed.steps == 4 and len(resumed.history) == 2
    a, b = _final_lora(full), _final_lora(resumed)
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"resume max abs diff {diff:.3g}")
    assert diff < 1e-6
    assert [h["loss"] for h in full.history[2:]] == pytest.approx([h["loss"] for h in resumed.history], rel=1e-6)


def test_nonfinite_loss_skips_steps_and_stops_after_limit():
    bb = tiny_backbone()
    calls = {"n": 0}

    def reward(images, prompts):
        calls["n"] += 1
        r = images.mean(dim=(1, 2, 3))
        return r * float("nan") if calls["n"] in (2, 4, 5, 6) else r

    trainer = RewardTrainer(bb, DraftK(num_steps=2, cfg_scale=1.0), reward, PROMPTS,
                            settings=TrainerSettings(lr=1e-2, batch_size=1, max_nonfinite_steps=3))
    trainer.step()
    before = {k: p.detach().clone() for k, p in trainer.params.items()}
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        m = trainer.step()
    assert m["skipped"] == 1.0 and trainer.step_count == 1
    assert all(torch.equal(before[k], p) for k, p in trainer.params.items())  # nothing applied
    trainer.step()  # a good step resets the counter
    assert trainer.nonfinite_in_row == 0 and trainer.step_count == 2
    with pytest.warns(RuntimeWarning):
        trainer.step()
        trainer.step()
    with pytest.raises(NonFiniteLossError, match="3 consecutive"):
        trainer.step()


def test_ema_follows_weights_with_warmup():
    bb = tiny_backbone()
    reward = lambda images, prompts: images.mean(dim=(1, 2, 3))  # noqa: E731
    trainer = RewardTrainer(bb, DraftK(num_steps=2, cfg_scale=1.0), reward, PROMPTS,
                            settings=TrainerSettings(lr=1e-2, batch_size=1, ema_decay=0.99))
    ema = {k: v.clone() for k, v in trainer.ema.items()}
    for n in (1, 2):
        trainer.step()
        decay = min(0.99, (1 + n) / (10 + n))
        for k, p in trainer.params.items():
            ema[k] = decay * ema[k] + (1 - decay) * p.detach()
    for k in ema:
        assert torch.allclose(trainer.ema[k], ema[k], atol=1e-7)
    with trainer.ema_weights():
        assert all(torch.equal(p, trainer.ema[k]) for k, p in trainer.params.items())
    assert not all(torch.equal(p, trainer.ema[k]) for k, p in trainer.params.items())


def test_grad_accumulation_equals_one_big_batch():
    """2 micro-batches of 1 give the same update as 1 micro-batch of 2 with the same rows."""
    reward = lambda images, prompts: images.mean(dim=(1, 2, 3))  # noqa: E731
    rows = Batch(["a cat", "a dog"], [5, 6], batch_seed=3)
    results = []
    for batches in ([rows], [Batch(rows.prompts[:1], rows.seeds[:1], batch_seed=3),
                             Batch(rows.prompts[1:], rows.seeds[1:], batch_seed=3)]):
        bb = tiny_backbone()
        tr = RewardTrainer(bb, DraftK(num_steps=2, cfg_scale=1.0), reward, PROMPTS,
                           settings=TrainerSettings(lr=1e-2, grad_accum=len(batches), grad_clip=0))
        tr.next_batches = lambda b=batches: b
        tr.step()
        results.append({k: p.detach().clone() for k, p in tr.params.items()})
    # 1e-5 (lr 1e-2): a few LoRA weights get gradients of ~1e-9, Adam's eps scale, where batch-size-dependent
    # float rounding moves their first update by ~5e-6; a wrong 1/accum scaling would move them by ~lr / 2
    assert max((results[0][k] - results[1][k]).abs().max().item() for k in results[0]) < 1e-5
