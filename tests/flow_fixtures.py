"""Tiny SD3- and Flux-architecture pipelines with random weights for CPU tests (nothing is downloaded).

- :func:`make_tiny_sd3_components` / :func:`make_tiny_sd3_pipeline`: ``SD3Transformer2DModel`` (2x2 patches, 16
  latent channels), two CLIP text encoders with projection, a tiny T5 encoder with a T5 tokenizer built offline
  (a unigram vocabulary through transformers' tokenizers-backed ``T5Tokenizer``), a 16-channel ``AutoencoderKL``
  with SD3's ``shift_factor`` / ``scaling_factor``, and ``FlowMatchEulerDiscreteScheduler(shift=3)``.
- :func:`make_tiny_flux_pipeline`: ``FluxTransformer2DModel`` (guidance-distilled), CLIP + T5, the same VAE and the
  dynamic-shift scheduler of FLUX.1-dev.
- :func:`save_pipeline`: diffusers-format directory.

The VAE halves the size once (``vae_scale_factor`` 2): 32 px images have 16 x 16 latents. Normalisation scales are
1 (the library defaults), so outputs depend on the inputs (tests assert that before comparing).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from sd_fixtures import _load_tokenizer, _make_text_encoder, write_tiny_clip_tokenizer_files

LATENT_CHANNELS = 16
T5_DIM = 64  # = 2 x CLIP hidden (32): SD3 pads the CLIP states to T5's width
T5_TOKENS = 16  # max_sequence_length used by the tests
POOLED = 64  # two CLIP projections of 32


def make_t5_tokenizer():
    """A T5 tokenizer (unigram; lower-case letters with and without the word marker) built without files."""
    from transformers import T5TokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in letters]
    vocab += [("\u2581" + c, -1.5) for c in letters] + [("\u2581", -2.0)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def make_t5_encoder(seed: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=64, d_model=T5_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    return model.eval()


def make_flow_vae(seed: int):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            block_out_channels=(32, 32), in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=LATENT_CHANNELS, layers_per_block=1, norm_num_groups=32, sample_size=32,
            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
        )
    return vae.eval()


def make_tiny_sd3_transformer(seed: int = 0, **overrides: Any):
    from diffusers import SD3Transformer2DModel

    kwargs = dict(sample_size=16, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                  num_layers=2, attention_head_dim=8, num_attention_heads=4, joint_attention_dim=T5_DIM,
                  caption_projection_dim=32, pooled_projection_dim=POOLED, pos_embed_max_size=32)
    kwargs.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(**kwargs)
    return model.eval()


def make_tiny_sd3_components(tmpdir: str | Path | None = None, seed: int = 0, t5: bool = True) -> dict[str, Any]:
    """Components for ``StableDiffusion3Pipeline(**components)`` (``t5=False``: ``text_encoder_3=None``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    base = Path(tmpdir) if tmpdir is not None else Path(tempfile.mkdtemp(prefix="rdt_tiny_sd3_"))
    tok_dir = write_tiny_clip_tokenizer_files(base / "tiny_clip_tokenizer")
    return {
        "transformer": make_tiny_sd3_transformer(seed),
        "vae": make_flow_vae(seed + 1),
        "text_encoder": _make_text_encoder(with_projection=True, seed=seed + 2),
        "tokenizer": _load_tokenizer(tok_dir),
        "text_encoder_2": _make_text_encoder(with_projection=True, seed=seed + 3),
        "tokenizer_2": _load_tokenizer(tok_dir),
        "text_encoder_3": make_t5_encoder(seed + 4) if t5 else None,
        "tokenizer_3": make_t5_tokenizer() if t5 else None,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


def make_tiny_sd3_pipeline(tmpdir: str | Path | None = None, seed: int = 0, t5: bool = True):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(**make_tiny_sd3_components(tmpdir, seed, t5))


def make_tiny_flux_pipeline(tmpdir: str | Path | None = None, seed: int = 0):
    """A tiny ``FluxPipeline``: guidance-distilled transformer, CLIP (pooled) + T5, dynamic-shift scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    base = Path(tmpdir) if tmpdir is not None else Path(tempfile.mkdtemp(prefix="rdt_tiny_flux_"))
    tok_dir = write_tiny_clip_tokenizer_files(base / "tiny_clip_tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * LATENT_CHANNELS, out_channels=None, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=32,
            guidance_embeds=True, axes_dims_rope=(4, 6, 6),
        ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=make_flow_vae(seed + 1),
        text_encoder=_make_text_encoder(with_projection=False, seed=seed + 2), tokenizer=_load_tokenizer(tok_dir),
        text_encoder_2=make_t5_encoder(seed + 4), tokenizer_2=make_t5_tokenizer(),
    )


def save_pipeline(pipe: Any, directory: str | Path) -> Path:
    """Save ``pipe`` in diffusers format (``model_index.json``, component folders) to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return directory
