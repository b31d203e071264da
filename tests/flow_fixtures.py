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

from sd_fixtures import MAX_TOKENS, VOCAB_SIZE, _load_tokenizer, _make_text_encoder, write_tiny_clip_tokenizer_files

LATENT_CHANNELS = 16
CLIP_L, CLIP_G = 32, 48  # text widths (= projection sizes) of the two CLIPs; they differ as 768 / 1280 do, which is
# how diffusers' single-file loader tells text_encoders.clip_l from clip_g
T5_DIM = 96  # >= CLIP_L + CLIP_G: SD3 zero-pads the side-by-side CLIP states to T5's width
T5_TOKENS = 16  # max_sequence_length used by the tests
POOLED = CLIP_L + CLIP_G  # both CLIPs' pooled projections side by side


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


def make_clip_with_projection(hidden: int, seed: int):
    """A tiny ``CLIPTextModelWithProjection`` of width ``hidden`` (projection ``hidden`` too, as SD3's CLIPs)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=hidden, intermediate_size=37,
                            layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, pad_token_id=1,
                            vocab_size=VOCAB_SIZE, max_position_embeddings=MAX_TOKENS, projection_dim=hidden,
                            hidden_act="gelu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModelWithProjection(config)
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
    clip_l = make_clip_with_projection(CLIP_L, seed + 2)
    with torch.no_grad():  # SD3's CLIP-L projection is the identity (diffusers' single-file loader assumes so)
        clip_l.text_projection.weight.copy_(torch.eye(CLIP_L))
    return {
        "transformer": make_tiny_sd3_transformer(seed),
        "vae": make_flow_vae(seed + 1),
        "text_encoder": clip_l,
        "tokenizer": _load_tokenizer(tok_dir),
        "text_encoder_2": make_clip_with_projection(CLIP_G, seed + 3),
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


# ---- SD3 single-file checkpoints (ComfyUI / Stability layout) --------------------------------------------------
# The inverse of diffusers' convert_sd3_transformer_checkpoint_to_diffusers, written from the MMDiT layout of
# Stability's reference code: joint_blocks.i.{x_block, context_block}.{attn.qkv, attn.proj, adaLN_modulation.1,
# mlp.fc1, mlp.fc2}; the last block's context stream is "pre-only" (no attn.proj / mlp, a 2-way modulation stored
# as (shift, scale) where diffusers stores (scale, shift), as in final_layer.adaLN_modulation).

def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def sd3_transformer_to_original(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """diffusers ``SD3Transformer2DModel`` keys -> the original MMDiT keys (without ``model.diffusion_model.``)."""
    sd = dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    simple = {
        "pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
        "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
    }
    for src, dst in simple.items():
        for key in [k for k in sd if k == src or k.startswith(src + ".")]:
            out[dst + key[len(src):]] = sd.pop(key)
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(sd.pop(f"norm_out.linear.{kind}"))
    for i in range(num_layers):
        d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == num_layers - 1
        for kind in ("weight", "bias"):
            out[f"{o}x_block.attn.qkv.{kind}"] = torch.cat([sd.pop(f"{d}attn.to_{p}.{kind}") for p in "qkv"])
            out[f"{o}context_block.attn.qkv.{kind}"] = torch.cat([sd.pop(f"{d}attn.add_{p}_proj.{kind}") for p in "qkv"])
            out[f"{o}x_block.attn.proj.{kind}"] = sd.pop(f"{d}attn.to_out.0.{kind}")
            out[f"{o}x_block.adaLN_modulation.1.{kind}"] = sd.pop(f"{d}norm1.linear.{kind}")
            context_mod = sd.pop(f"{d}norm1_context.linear.{kind}")
            out[f"{o}context_block.adaLN_modulation.1.{kind}"] = _swap_halves(context_mod) if last else context_mod
            out[f"{o}x_block.mlp.fc1.{kind}"] = sd.pop(f"{d}ff.net.0.proj.{kind}")
            out[f"{o}x_block.mlp.fc2.{kind}"] = sd.pop(f"{d}ff.net.2.{kind}")
            if not last:
                out[f"{o}context_block.attn.proj.{kind}"] = sd.pop(f"{d}attn.to_add_out.{kind}")
                out[f"{o}context_block.mlp.fc1.{kind}"] = sd.pop(f"{d}ff_context.net.0.proj.{kind}")
                out[f"{o}context_block.mlp.fc2.{kind}"] = sd.pop(f"{d}ff_context.net.2.{kind}")
    if sd:
        raise KeyError(f"no original SD3 name for {sorted(sd)}")
    return out


def save_sd3_single_file(pipe: Any, path: str | Path) -> Path:
    """Write ``pipe`` (a ``StableDiffusion3Pipeline``) as one ``.safetensors`` in the layout of Stability's SD3
    files (``model.diffusion_model.*``, ``first_stage_model.*``, ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*``;
    no T5 keys when the pipeline has none)."""
    from safetensors.torch import save_file

    from ldm_checkpoint import VAE_PREFIX, _text_model_keys, vae_to_ldm

    net = pipe.transformer
    sd = {"model.diffusion_model." + k: v for k, v in
          sd3_transformer_to_original(net.state_dict(), net.config.num_layers).items()}
    sd.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()})
    for name, encoder in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2)):
        sd.update({f"text_encoders.{name}.transformer.{k}": v
                   for k, v in _text_model_keys(encoder.state_dict()).items() if "position_ids" not in k})
    if pipe.text_encoder_3 is not None:
        sd.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in pipe.text_encoder_3.state_dict().items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(path))
    return path
