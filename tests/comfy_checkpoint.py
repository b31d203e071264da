"""A small random-weight SD1.5-family LDM checkpoint that ComfyUI's ``CheckpointLoaderSimple`` loads as SD1.5.

What ComfyUI needs (``comfy/model_detection.py``, ``comfy/sd.py``, ``comfy/supported_models.py``):

- UNet (``model.diffusion_model.``): SD15 is picked by ``model_channels`` 320, ``context_dim`` 768 and
  ``use_linear_in_transformer`` False; block count, ``channel_mult``, res-blocks and transformer depths are read
  from the keys, so a UNet with two blocks of 320 channels, one res-block each and attention in the first block only
  is built at that size (``channel_mult`` 1,1). This is the part that makes sampling cheap (8x8 latents for
  64x64 images).
- VAE (``first_stage_model.``): ComfyUI builds the SD VAE at its fixed size (``ch`` 128, ``ch_mult`` 1,2,4,4, two
  res-blocks) and loads the weights into it, so the VAE must have exactly that shape.
- Text encoder (``cond_stage_model.transformer.``): ComfyUI builds CLIP-L (768 wide, 12 layers, 49408 tokens) from
  its own config; missing weights would stay uninitialised, so all of it is written.

All weights are random (diffusers / transformers initialisation, seeded); normalisation scales are 1 (the
library defaults, checked here), never 0, so the UNet's output depends on its input and its weights. The UNet
is stored in float32, the VAE and the text encoder in float16 (about 0.5 GB in all).
"""

from __future__ import annotations

from pathlib import Path

import torch

import ldm_checkpoint as ldm

SD15_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 320),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,  # diffusers' SD1.5 naming: 8 heads
    norm_num_groups=32,
)
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _check_norms(name: str, module: torch.nn.Module) -> None:
    for mod_name, mod in module.named_modules():
        if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and mod.weight is not None:
            if not bool((mod.weight != 0).all()):
                raise AssertionError(f"{name}.{mod_name}: zero normalisation scale")


def tiny_sd15_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The LDM single-file state dict (UNet float32, VAE and CLIP float16)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = _seeded(seed, lambda: UNet2DConditionModel(**SD15_UNET).eval())
    vae = _seeded(seed + 1, lambda: AutoencoderKL(**SD_VAE).eval())
    text = _seeded(seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval())
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        _check_norms(name, module)
    sd: dict[str, torch.Tensor] = {}
    sd.update({ldm.UNET_PREFIX + k: v.float() for k, v in ldm.unet_to_ldm(unet.state_dict(), unet.config).items()})
    sd.update({ldm.VAE_PREFIX + k: v.half() for k, v in ldm.vae_to_ldm(vae.state_dict(), vae.config).items()})
    sd.update({k: v.half() for k, v in ldm.clip_to_ldm(text.state_dict(), ldm.SD15_CLIP_PREFIX).items()})
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def write_tiny_sd15_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write :func:`tiny_sd15_state_dict` to ``path`` (``.safetensors``), atomically; returns ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(tiny_sd15_state_dict(seed), str(tmp), metadata={"rdt": "random-weight test checkpoint"})
    tmp.replace(path)
    return path
