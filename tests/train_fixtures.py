"""Shared pieces of the trainer tests: tiny SD pipeline directory, tiny rewards, a tiny config, helpers.

Everything is built from random weights on CPU (``tests/sd_fixtures.py``, ``tests/reward_fixtures.py``): 16 x 16
images, 4 x 8 x 8 latents, CLIP-style rewards at 224 px with 2 layers.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from reward_fixtures import make_tiny_reward
from sd_fixtures import save_tiny_sd_pipeline

PROMPTS = ["a cat", "a dog", "the cat"]


@functools.lru_cache(maxsize=None)
def tiny_sd_dir(sdxl: bool = False) -> Path:
    """A tiny diffusers pipeline directory (built once per test session)."""
    root = Path(tempfile.mkdtemp(prefix="rdt_train_sd_"))
    return save_tiny_sd_pipeline(root / ("sdxl" if sdxl else "sd15"), sdxl=sdxl)


@functools.lru_cache(maxsize=None)
def tiny_reward_dir(name: str) -> Path:
    """A tiny reward model directory for ``load_reward(name, path=...)`` (built once per test session)."""
    root = Path(tempfile.mkdtemp(prefix="rdt_train_reward_"))
    return make_tiny_reward(name, root)


def tiny_backbone(sdxl: bool = False, rank: int = 2, seed: int = 0, targets=("to_q", "to_k", "to_v", "to_out.0")):
    """A tiny SD backbone with a gaussian-initialised LoRA adapter ``tuned``."""
    from rdt_lib.backbones.stable_diffusion import StableDiffusionBackbone
    from rdt_lib.lora import add_lora

    bb = StableDiffusionBackbone.from_pretrained(tiny_sd_dir(sdxl))
    for name in ("vae", "text_encoder", "text_encoder_2"):
        module = getattr(bb.pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        add_lora(bb.network, "tuned", rank=rank, alpha=rank, init_lora_weights="gaussian", target_modules=targets)
    return bb


def tiny_reward(name: str = "aesthetic"):
    from rdt_lib.rewards import load_reward

    return load_reward(name, path=tiny_reward_dir(name), device="cpu", dtype=torch.float32)


def tiny_overrides(output_dir: Path, **extra) -> list[str]:
    """``--set`` overrides that make the ``tiny_cpu`` preset runnable here."""
    items = {
        "model.path": str(tiny_sd_dir()),
        "rewards.0.path": str(tiny_reward_dir("aesthetic")),
        "run.output_dir": str(output_dir),
    }
    items.update({k: v for k, v in extra.items()})
    out = []
    for k, v in items.items():
        if isinstance(v, str):
            v = '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        elif isinstance(v, bool):
            v = "true" if v else "false"
        out.append(f"{k}={v}")
    return out


def run_train_cli(output_dir: Path, capsys, *sets: str, **extra) -> str:
    """Run ``python -m rdt_lib.train`` in-process on the ``tiny_cpu`` preset with ``--set`` items ``sets`` (and
    ``extra`` as key=value overrides); assert it exits 0 and return its stderr."""
    import warnings

    from rdt_lib.train.cli import main

    argv = ["--config", "tiny_cpu"]
    for item in tiny_overrides(output_dir, **extra) + list(sets):
        argv += ["--set", item]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 0, err
    return err


def tiny_config(output_dir: Path, **extra):
    from rdt_lib.train.config import load_config

    return load_config(["tiny_cpu"], tiny_overrides(output_dir, **extra))


def write_image_folder(folder: Path, n: int = 3, size: int = 20) -> Path:
    """``n`` small PNG images with .txt captions."""
    from PIL import Image

    from reward_fixtures import natural_image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = (natural_image(size, size + 4, seed=i).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(img).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(PROMPTS[i % len(PROMPTS)] + "\n")
    return folder
