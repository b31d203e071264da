"""Helpers for the training node's ComfyUI tests and benchmark: a diffusers config directory matching the tiny SD1.5
test checkpoint (so the headless trainer loads the same file offline), a tiny reward in ``models/rewards``, and
the API graphs the tests queue.

The config directory takes the component configs from ``comfy_checkpoint`` (the host's checkpoint writer) and the
CLIP tokenizer files from the ComfyUI tree under test (``comfy/sd1_tokenizer``, read at run time, not copied into
the repository), with ``model_max_length`` 77 as SD1.5's text encoder has.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def write_tiny_sd15_config_dir(directory: str | Path, comfyui_dir: str | Path) -> Path:
    """A diffusers SD1.5 pipeline directory (configs and tokenizer only) of the tiny test checkpoint."""
    import comfy_checkpoint as cc

    d = Path(directory)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
    }))
    (d / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel",
                                                        **_jsonable(cc.SD15_UNET)}))
    (d / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **_jsonable(cc.SD_VAE),
                                                       "scaling_factor": 0.18215}))
    (d / "text_encoder" / "config.json").write_text(json.dumps({"architectures": ["CLIPTextModel"],
                                                                "model_type": "clip_text_model",
                                                                **_jsonable(cc.CLIP_L)}))
    tok = Path(comfyui_dir) / "comfy" / "sd1_tokenizer"
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        shutil.copyfile(tok / name, d / "tokenizer" / name)
    (d / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "add_prefix_space": False, "errors": "replace"}))
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return d


def _jsonable(cfg: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def write_tiny_reward(models_dir: str | Path, name: str = "aesthetic") -> str:
    """A tiny random reward under ``models/rewards``; returns the loader's ``weights`` choice for it."""
    import reward_fixtures

    path = reward_fixtures.make_tiny_reward(name, Path(models_dir) / "rewards")
    return path.name + "/"


def train_inputs(**over: Any) -> dict[str, Any]:
    """The node's widget values for a quick CPU run on the tiny checkpoint (64 px, 4 DDIM steps, K 1)."""
    values = dict(reward_weight=1.0, prompts="a photo of a cat\na red house", objective="draft", steps=3,
                  learning_rate=1e-3, lora_rank=4, lora_alpha=4.0, k=1, sampling_steps=4, batch_size=1,
                  grad_accumulation=1, kl_coeff=0.0, l2_init_coeff=0.0, random_eta=False, seed=5, resolution=64,
                  lora_name="rdt_test_lora", if_exists="refuse", cfg=7.5, checkpoint_every=1,
                  gradient_checkpointing=False)
    values.update(over)
    return values


def train_graph(ckpt: str, reward_weights: str, *, reward: str = "aesthetic", **over: Any) -> dict[str, Any]:
    """API graph: checkpoint -> reward loader -> RDTTrainRewardLoRA (node "3")."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "RDTRewardModelLoader", "inputs": {"reward": reward, "weights": reward_weights,
                                                               "precision": "fp32"}},
        "3": {"class_type": "RDTTrainRewardLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                             "reward_model": ["2", 0], **train_inputs(**over)}},
    }


def sampling_nodes(first: int, model_link: list, negative: Any, prefix: str, seed: int = 11) -> dict[str, Any]:
    """KSampler (euler, 6 steps, cfg 7.5, 64x64) on ``model_link`` saved with SaveLatent ``prefix``; node ids from
    ``first``. ``negative`` is the negative prompt's text or a link to a STRING output (the same text through a
    link makes a sampler run after that node, with the same conditioning)."""
    a, b, c, d, e = (str(first + i) for i in range(5))
    return {
        a: {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        b: {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        c: {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        d: {"class_type": "KSampler", "inputs": {"model": model_link, "seed": seed, "steps": 6, "cfg": 7.5,
                                                 "sampler_name": "euler", "scheduler": "normal",
                                                 "positive": [a, 0], "negative": [b, 0], "latent_image": [c, 0],
                                                 "denoise": 1.0}},
        e: {"class_type": "SaveLatent", "inputs": {"samples": [d, 0], "filename_prefix": prefix}},
    }


def checkpoint_node(ckpt: str) -> dict[str, Any]:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}


def lora_loader_graph(ckpt: str, lora_file: str, negative: str, prefix: str) -> dict[str, Any]:
    return {**checkpoint_node(ckpt),
            "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora_file,
                                                         "strength_model": 1.0, "strength_clip": 1.0}},
            **sampling_nodes(20, ["2", 0], negative, prefix)}
