"""Shared pieces of the evaluation sweep's tests: a tiny DINO-style ViT directory, a tiny LoRA of the tiny SD
pipeline, and ``--set`` overrides that make the ``tiny_cpu`` eval preset runnable on them (all random weights,
nothing downloaded)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from train_fixtures import tiny_reward_dir, tiny_sd_dir

SCHEDULES = ["base", "tuned", "linear", "lora:0.5"]


@functools.lru_cache(maxsize=None)
def tiny_vit_dir() -> Path:
    """A random-weight transformers ``ViTModel`` directory (32 px, patch 8, width 32), saved with
    ``save_pretrained`` so the sweep loads it through its real code path. LayerNorm scales are 1 (HF's init)."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ViTModel(config, add_pooling_layer=False)
    root = Path(tempfile.mkdtemp(prefix="rdt_eval_vit_")) / "vit"
    model.save_pretrained(str(root))
    return root


@functools.lru_cache(maxsize=None)
def tiny_lora_file(sdxl: bool = False, seed: int = 7) -> Path:
    """rdt's own (kohya) LoRA file of the tiny SD pipeline, with random up weights so it changes the images."""
    from rdt_lib.backbones.stable_diffusion import StableDiffusionBackbone
    from rdt_lib.lora import add_lora
    from rdt_lib.lora_io import save_lora

    bb = StableDiffusionBackbone.from_pretrained(tiny_sd_dir(sdxl))
    with torch.random.fork_rng(devices=[]):  # the same file whatever ran before
        torch.manual_seed(seed)
        add_lora(bb.network, "tuned", rank=2, alpha=2, init_lora_weights="gaussian",
                 target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in bb.network.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    path = Path(tempfile.mkdtemp(prefix="rdt_eval_lora_")) / "tuned.safetensors"
    return save_lora(bb.network, path, "tuned")


def _toml(value) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def eval_overrides(output_dir: Path, sdxl: bool = False, **extra) -> list[str]:
    """``--set`` items for ``--config tiny_cpu`` of ``python -m rdt_lib.eval`` (``extra``: key -> value)."""
    items = {
        "model.path": str(tiny_sd_dir(sdxl)),
        "model.kind": "sdxl" if sdxl else "sd15",
        "tuned.path": str(tiny_lora_file(sdxl)),
        "rewards.0.path": str(tiny_reward_dir("aesthetic")),
        "metrics.embedder": str(tiny_vit_dir()),
        "run.output_dir": str(output_dir),
        "schedules.names": SCHEDULES,
    }
    items.update(extra)
    return [f"{k}={_toml(v)}" for k, v in items.items()]


def eval_config(output_dir: Path, sdxl: bool = False, **extra):
    from rdt_lib.eval.config import load_config

    return load_config(["tiny_cpu"], eval_overrides(output_dir, sdxl, **extra))
