"""Tiny Stable Diffusion (SD1.5- and SDXL-architecture) components for CPU tests.

Everything here is built from random weights and a tokenizer written to a local folder, so nothing is
downloaded. The models keep the real architectures' module names (``down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q`` ...) so key conversions tested on them hold for the full-size models,
but are small enough that a forward pass takes milliseconds.

Public helpers:

- :func:`make_tiny_sd_components` -> dict of pipeline components (``unet``, ``vae``, ``text_encoder``,
  ``tokenizer``, ``scheduler``; plus ``text_encoder_2`` / ``tokenizer_2`` for SDXL), ready for
  ``StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
  requires_safety_checker=False)`` or ``StableDiffusionXLPipeline(**components)``.
- :func:`make_tiny_unet` -> only the UNet (same weights as the one in the components for the same seed).
- :func:`save_tiny_sd_pipeline` -> writes a diffusers-format pipeline directory and returns its path.
- :func:`write_tiny_clip_tokenizer_files` -> writes ``vocab.json`` / ``merges.txt`` for a byte-level BPE
  CLIP tokenizer with a handful of merges.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

# Sizes shared by the components (change together).
TEXT_HIDDEN = 32  # CLIP text hidden size of each text encoder
TEXT_PROJ = 32  # CLIP projection dim (SDXL pooled embedding size)
VOCAB_SIZE = 1000  # >= the byte-level vocab written below (~520 tokens)
MAX_TOKENS = 77
SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim; SDXL passes 6 time ids


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode table (the standard construction)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def write_tiny_clip_tokenizer_files(directory: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of a tiny CLIP BPE tokenizer into ``directory``.

    The vocabulary holds every byte symbol with and without the ``</w>`` end-of-word marker, a few merged
    tokens and the two special tokens, so any text tokenizes (mostly into single characters).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = [("a", "t</w>"), ("c", "at</w>"), ("o", "g</w>"), ("d", "og</w>"), ("t", "h"), ("th", "e</w>")]
    vocab_list += ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    assert len(vocab) <= VOCAB_SIZE
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def _load_tokenizer(directory: Path):
    from transformers import CLIPTokenizer

    try:
        tok = CLIPTokenizer.from_pretrained(str(directory), model_max_length=MAX_TOKENS, local_files_only=True)
    except Exception:  # older transformers: explicit file arguments
        tok = CLIPTokenizer(
            vocab_file=str(directory / "vocab.json"), merges_file=str(directory / "merges.txt"),
            model_max_length=MAX_TOKENS,
        )
    return tok


def _unet_kwargs(sdxl: bool) -> dict[str, Any]:
    if not sdxl:
        # SD1.5 layout (cross-attention in the high-resolution blocks), scaled down.
        return dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_HIDDEN,
            attention_head_dim=8,
            norm_num_groups=32,
        )
    # SDXL layout: no attention in the first block, several transformer layers deeper down, linear
    # projections, "text_time" added conditioning (pooled text embedding + 6 time ids).
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + TEXT_PROJ,
        cross_attention_dim=2 * TEXT_HIDDEN,
        norm_num_groups=32,
    )


def make_tiny_unet(sdxl: bool = False, seed: int = 0):
    """A tiny randomly initialised ``UNet2DConditionModel`` (SD1.5 or SDXL layout), eval mode, float32.

    The same ``seed`` always gives the same weights; the global torch RNG is left untouched.
    """
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**_unet_kwargs(sdxl))
    return unet.eval()


def _make_text_encoder(with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        pad_token_id=1,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_PROJ,
        hidden_act="gelu",
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.eval()


def _make_vae(seed: int):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=16,
        )
    return vae.eval()


def _make_scheduler():
    from diffusers import DDIMScheduler

    # SD1.5 / SDXL noise schedule.
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def make_tiny_sd_components(tmpdir: str | Path | None = None, sdxl: bool = False, seed: int = 0) -> dict[str, Any]:
    """Tiny pipeline components with random weights (deterministic in ``seed``).

    Args:
        tmpdir: folder for the tokenizer files (a fresh temporary folder when None).
        sdxl: SDXL layout (two text encoders, "text_time" conditioning) instead of SD1.5.
        seed: weight seed; the UNet equals ``make_tiny_unet(sdxl, seed)``.

    Returns:
        dict with ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` and, for SDXL,
        ``text_encoder_2`` (with projection) and ``tokenizer_2``. Latents are 4 x 8 x 8 for 16 x 16 images.
    """
    base = Path(tmpdir) if tmpdir is not None else Path(tempfile.mkdtemp(prefix="rdt_tiny_sd_"))
    tok_dir = write_tiny_clip_tokenizer_files(base / "tiny_clip_tokenizer")
    components: dict[str, Any] = {
        "unet": make_tiny_unet(sdxl=sdxl, seed=seed),
        "vae": _make_vae(seed + 1),
        "text_encoder": _make_text_encoder(with_projection=False, seed=seed + 2),
        "tokenizer": _load_tokenizer(tok_dir),
        "scheduler": _make_scheduler(),
    }
    if sdxl:
        components["text_encoder_2"] = _make_text_encoder(with_projection=True, seed=seed + 3)
        components["tokenizer_2"] = _load_tokenizer(tok_dir)
    return components


def make_tiny_pipeline(tmpdir: str | Path | None = None, sdxl: bool = False, seed: int = 0):
    """A tiny ``StableDiffusionPipeline`` (or ``StableDiffusionXLPipeline``) on CPU, no safety checker."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    comps = make_tiny_sd_components(tmpdir, sdxl=sdxl, seed=seed)
    if sdxl:
        return StableDiffusionXLPipeline(**comps)
    return StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_tiny_sd_pipeline(directory: str | Path, sdxl: bool = False, seed: int = 0) -> Path:
    """Save a tiny pipeline in diffusers format (``model_index.json``, ``unet/``, ...) to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tok_tmp:
        pipe = make_tiny_pipeline(tok_tmp, sdxl=sdxl, seed=seed)
        pipe.save_pretrained(str(directory), safe_serialization=True)
    return directory


def unet_inputs(sdxl: bool = False, batch: int = 2, seed: int = 123) -> dict[str, Any]:
    """Fixed random inputs for a tiny UNet forward: ``unet(**unet_inputs(sdxl)).sample``."""
    g = torch.Generator().manual_seed(seed)
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch, 4, 8, 8, generator=g),
        "timestep": torch.tensor([999, 500][:batch] + [10] * max(0, batch - 2)),
        "encoder_hidden_states": torch.randn(batch, MAX_TOKENS, (2 if sdxl else 1) * TEXT_HIDDEN, generator=g),
    }
    if sdxl:
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, TEXT_PROJ, generator=g),
            "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * batch),
        }
    return inputs
