"""API-format graph pieces and test files for the sampling-node tests against a real ComfyUI.

A graph is ``{node_id: {"class_type": ..., "inputs": {...}}}``; links are ``[node_id, output_index]``.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch

TINY = "rdt_tiny_sd15.safetensors"
TINY_B = "rdt_tiny_sd15_seed1.safetensors"  # an independent checkpoint (a "full fine-tune" of the same type)
LORA = "rdt_tiny_lora.safetensors"
LORA_WRONG = "rdt_tiny_lora_wrong_shapes.safetensors"


class Graph:
    """Build an API-format graph: ``g.add(class_type, **inputs) -> node id``; ``g.out(id, i)`` a link."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1)

    def add(self, class_type: str, **inputs: Any) -> str:
        nid = str(next(self._ids))
        self.nodes[nid] = {"class_type": class_type, "inputs": inputs}
        return nid

    @staticmethod
    def out(nid: str, index: int = 0) -> list:
        return [nid, index]


def base_pipeline(g: Graph, ckpt: str = TINY, size: int = 64, batch: int = 1) -> dict[str, list]:
    """Checkpoint, prompts and an empty latent; returns links ``model, clip, vae, positive, negative, latent``."""
    ck = g.add("CheckpointLoaderSimple", ckpt_name=ckpt)
    pos = g.add("CLIPTextEncode", text="a photo of a red fox in the snow", clip=[ck, 1])
    neg = g.add("CLIPTextEncode", text="blurry", clip=[ck, 1])
    lat = g.add("EmptyLatentImage", width=size, height=size, batch_size=batch)
    return {"model": [ck, 0], "clip": [ck, 1], "vae": [ck, 2], "positive": [pos, 0], "negative": [neg, 0],
            "latent": [lat, 0]}


def lora_model(g: Graph, model: list, lora: str = LORA, strength: float = 1.0) -> list:
    return [g.add("LoraLoaderModelOnly", model=model, lora_name=lora, strength_model=strength), 0]


def ksampler(g: Graph, p: dict, model: list, *, seed: int, steps: int, cfg: float, sampler: str,
             scheduler: str = "normal", denoise: float = 1.0, latent: list | None = None) -> list:
    return [g.add("KSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler,
                  scheduler=scheduler, positive=p["positive"], negative=p["negative"],
                  latent_image=latent or p["latent"], denoise=denoise), 0]


def dual(g: Graph, p: dict, base: list, tuned: list | None, *, seed: int, steps: int, cfg_base: float,
         cfg_tuned: float, sampler: str, schedule: str, scheduler: str = "normal", denoise: float = 1.0,
         latent: list | None = None, schedule_input: list | None = None) -> list:
    inputs: dict[str, Any] = dict(base_model=base, positive=p["positive"], negative=p["negative"],
                                  latent_image=latent or p["latent"], seed=seed, steps=steps, cfg_base=cfg_base,
                                  cfg_tuned=cfg_tuned, sampler_name=sampler, scheduler=scheduler, denoise=denoise,
                                  schedule=schedule)
    if tuned is not None:
        inputs["tuned_model"] = tuned
    if schedule_input is not None:
        inputs["schedule_input"] = schedule_input
    return [g.add("RDTDualModelKSampler", **inputs), 0]


def save(g: Graph, samples: list, prefix: str) -> str:
    return g.add("SaveLatent", samples=samples, filename_prefix=prefix)


def latents(server, entry: dict, save_ids: dict[str, str]) -> dict[str, torch.Tensor]:
    """The saved latent of each named SaveLatent node of a finished run."""
    from comfyui_server import read_latent

    out = {}
    for name, nid in save_ids.items():
        files = server.output_files(entry, node_id=nid, kind="latents")
        assert len(files) == 1, (name, files)
        out[name] = read_latent(files[0])
    return out


# --- test files ------------------------------------------------------------------------------------------------

def tiny_unet_modules():
    """``(diffusers module path, module)`` of the tiny checkpoint's UNet layers a LoRA patches: attention and
    feed-forward linears, the 1x1 proj_in / proj_out convolutions and the resnets' 3x3 convolutions."""
    from comfy_checkpoint import SD15_UNET
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    picked = []
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and ".attentions." in f".{name}" and ("attn" in name or ".ff." in name):
            picked.append((name, m))
        elif isinstance(m, torch.nn.Conv2d) and (name.endswith("proj_in") or name.endswith("proj_out")
                                                 or (".resnets." in name and name.endswith("conv1"))):
            picked.append((name, m))
    return picked


def write_kohya_lora(path: Path, *, rank: int = 4, alpha: float = 2.0, seed: int = 0, up_std: float = 0.05,
                     wrong_shapes: bool = False) -> Path:
    """A kohya LoRA (``lora_unet_<diffusers path with _>``) for the tiny UNet with non-zero up weights; with
    ``wrong_shapes`` every down matrix has 7 input features too many (a LoRA of another architecture)."""
    from rdt_lib.lora_io import save_lora_safetensors

    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, m in tiny_unet_modules():
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(m, torch.nn.Linear):
            fan_in = m.in_features + (7 if wrong_shapes else 0)
            down = torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5
            up = torch.randn(m.out_features, rank, generator=g) * up_std
        else:
            kh, kw = m.kernel_size
            fan_in = m.in_channels + (7 if wrong_shapes else 0)
            down = torch.randn(rank, fan_in, kh, kw, generator=g) / (fan_in * kh * kw) ** 0.5
            up = torch.randn(m.out_channels, rank, 1, 1, generator=g) * up_std
        tensors[key + ".lora_down.weight"] = down.contiguous()
        tensors[key + ".lora_up.weight"] = up.contiguous()
        tensors[key + ".alpha"] = torch.tensor(float(alpha))
    save_lora_safetensors(path, tensors)
    return path
