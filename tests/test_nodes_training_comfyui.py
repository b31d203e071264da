"""RDTTrainRewardLoRA in a real ComfyUI (``main.py --cpu``) on the tiny random-weight SD1.5 checkpoint.

One module-scoped training run (3 steps, DRaFT-1, a tiny aesthetic reward) serves most tests:

- the file it saves maps onto the UNet through LoraLoader with no key left unloaded, and changes the UNet's output;
- the node's output MODEL equals the base model plus that file (one KSampler run each, latents within 1e-3);
- the base MODEL (the very same cached CheckpointLoader output) samples the same latents after training as before;
- the same settings headless (``rdt_lib.train`` on the same checkpoint file, diffusers components) give the same LoRA.

Then an interrupt after step 1 leaves a valid file saying how many steps it holds, a rerun with the same name is
refused, and ``if_exists = resume`` continues from the checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

import comfy_train_fixtures as ctf
from comfyui_server import TINY_CHECKPOINT, ComfyNodeError, read_latent

pytestmark = pytest.mark.comfyui

LORA = "rdt_t3"
SETTINGS = dict(steps=3, learning_rate=5e-3, resolution=32, sampling_steps=3, checkpoint_every=1, seed=5)


def _latent(server, entry) -> torch.Tensor:
    files = [p for p in server.output_files(entry) if p.suffix == ".latent"]
    assert len(files) == 1, files
    return read_latent(files[0])


@pytest.fixture(scope="module")
def reward_weights(comfy_models) -> str:
    return ctf.write_tiny_reward(comfy_models, "aesthetic")


@pytest.fixture(scope="module")
def trained(comfy_server, comfy_models, reward_weights):
    """Base latents before training; then one prompt: train 3 steps, sample the tuned MODEL and (after training,
    through a link to the node's output) the base MODEL."""
    negative = f"{LORA}.safetensors"  # the node's lora_name output, typed here
    before = comfy_server.run({**ctf.checkpoint_node(TINY_CHECKPOINT),
                               **ctf.sampling_nodes(20, ["1", 0], negative, "base_before")})
    graph = ctf.train_graph(TINY_CHECKPOINT, reward_weights, lora_name=LORA, **SETTINGS)
    graph.update(ctf.sampling_nodes(30, ["3", 0], ["3", 1], "tuned_node"))
    graph.update(ctf.sampling_nodes(40, ["1", 0], ["3", 1], "base_after"))
    t0 = time.monotonic()
    entry = comfy_server.run(graph, timeout=3600)
    seconds = time.monotonic() - t0
    lora_file = comfy_models / "loras" / f"{LORA}.safetensors"
    return dict(before=_latent(comfy_server, before),
                tuned=_latent(comfy_server, {"outputs": {"34": entry["outputs"]["34"]}}),
                after=_latent(comfy_server, {"outputs": {"44": entry["outputs"]["44"]}}),
                entry=entry, lora_file=lora_file, seconds=seconds, negative=negative)


def test_saved_file_has_our_keys_and_metadata(trained):
    from rdt_lib.lora_io import load_lora_safetensors

    tensors, meta = load_lora_safetensors(trained["lora_file"])
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert meta["rdt_steps"] == "3" and meta["rdt_objective"] == "draft"
    assert json.loads(meta["rdt_rewards"])[0]["name"] == "aesthetic"
    assert meta["rdt_base_model"] == TINY_CHECKPOINT
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert max(float(v.abs().max()) for v in ups) > 1e-3  # trained: B moved away from its zero init


def test_lora_loader_maps_every_key_and_equals_the_node_output(comfy_server, trained):
    entry = comfy_server.run(ctf.lora_loader_graph(TINY_CHECKPOINT, trained["lora_file"].name, trained["negative"],
                                                   "lora_loader"))
    via_loader = _latent(comfy_server, entry)
    log = comfy_server.log_text()
    assert "lora key not loaded" not in log and "NOT LOADED" not in log
    base, tuned = trained["before"], trained["tuned"]
    assert (tuned - base).abs().max() > 0.05  # the LoRA changes the UNet's output far beyond the tolerance
    assert (via_loader - tuned).abs().max() < 1e-3


def test_base_model_is_unchanged_by_training(trained):
    torch.testing.assert_close(trained["after"], trained["before"], atol=1e-6, rtol=0)
    assert (trained["tuned"] - trained["before"]).abs().max() > 0.05


def test_headless_trainer_gives_the_same_lora(tmp_path, comfy_models, reward_weights, trained):
    """One training loop, two front doors: the node's LoRA against python -m rdt_lib.train's on the same file."""
    from comfy_rdt_nodes.nodes_training import RewardInput, node_config, parse_prompts
    from rdt_lib.lora_io import load_lora_safetensors
    from rdt_lib.train.run import train_from_config

    inputs = ctf.train_inputs(lora_name=LORA, **SETTINGS)
    config_dir = ctf.write_tiny_sd15_config_dir(tmp_path / "sd15", os.environ["COMFYUI_DIR"])
    rewards = [RewardInput(type("H", (), {"name": "aesthetic"})(), 1.0, "aesthetic")]
    keys = ("objective", "steps", "learning_rate", "lora_rank", "lora_alpha", "k", "sampling_steps", "batch_size",
            "grad_accumulation", "kl_coeff", "l2_init_coeff", "random_eta", "seed", "resolution", "cfg",
            "checkpoint_every", "gradient_checkpointing")
    config = node_config(prompts=parse_prompts(inputs["prompts"]), rewards=rewards, name=LORA,
                         output_dir=str(tmp_path / "run"), base_name=str(comfy_models / "checkpoints" /
                                                                        TINY_CHECKPOINT),
                         resume=False, family="sd15", **{k: inputs[k] for k in keys})
    config = config.model_copy(update={
        "model": config.model.model_copy(update={"single_file_config": str(config_dir)}),
        "rewards": [config.rewards[0].model_copy(update={"path": str(comfy_models / "rewards" /
                                                                     reward_weights.rstrip("/"))})]})
    result = train_from_config(config, log=lambda m: None)
    headless, _ = load_lora_safetensors(result.lora_path)
    node, _ = load_lora_safetensors(trained["lora_file"])
    assert set(headless) == set(node)
    diff = max(float((headless[k] - node[k]).abs().max()) for k in node)
    size = max(float(node[k].abs().max()) for k in node if k.endswith("lora_up.weight"))
    print(f"max |node - headless| = {diff:.3g}, largest |lora_up| = {size:.3g}")
    assert size > 100 * 1e-4
    assert diff < 1e-4


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.5)


def test_interrupt_saves_a_valid_file_then_refuse_and_resume(comfy_server, comfy_models, reward_weights):
    from rdt_lib.lora_io import load_lora_safetensors

    name = "rdt_interrupted"
    lora_file = comfy_models / "loras" / f"{name}.safetensors"
    settings = {**SETTINGS, "steps": 40}
    prompt_id = comfy_server.queue(ctf.train_graph(TINY_CHECKPOINT, reward_weights, lora_name=name, **settings))
    _wait_for(lora_file, 1800)  # written after step 1 (checkpoint_every 1)
    status, _ = comfy_server._post("/interrupt", {})
    assert status == 200
    entry = comfy_server.wait(prompt_id, timeout=1800)
    events = [event for event, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in events, entry["status"]
    tensors, meta = load_lora_safetensors(lora_file)
    steps = int(meta["rdt_steps"])
    assert 1 <= steps < 40
    assert len(tensors) % 3 == 0 and all(k.startswith("lora_unet_") for k in tensors)

    with pytest.raises(ComfyNodeError, match="exists already"):
        comfy_server.run(ctf.train_graph(TINY_CHECKPOINT, reward_weights, lora_name=name, **settings))
    comfy_server.run(ctf.train_graph(TINY_CHECKPOINT, reward_weights, lora_name=name, if_exists="resume",
                                     **{**settings, "steps": steps + 1}), timeout=1800)
    resumed, meta2 = load_lora_safetensors(lora_file)
    assert meta2["rdt_steps"] == str(steps + 1)
    assert any(not torch.equal(resumed[k], tensors[k]) for k in tensors)


def test_bad_inputs_are_reported_by_the_server(comfy_server, reward_weights):
    cases = [({"prompts": "  "}, "no prompts"), ({"resolution": 36}, "multiple of 8"),
             ({"k": 5, "sampling_steps": 4}, "larger than sampling_steps")]
    for over, match in cases:
        with pytest.raises(ComfyNodeError, match=match):
            comfy_server.run(ctf.train_graph(TINY_CHECKPOINT, reward_weights, lora_name="never", **over))
