"""Write a diffusers Stable Diffusion pipeline as an original-LDM ("single-file", ComfyUI ``models/checkpoints``)
``.safetensors`` checkpoint, for tests of single-file loading.

This is the inverse of diffusers' LDM -> diffusers conversion (``diffusers.loaders.single_file_utils``), written
from the layout of the original CompVis / Stability code and derived from the UNet / VAE configs, so it works
for any block count, ``layers_per_block`` and attention placement:

- UNet (``model.diffusion_model.``): ``input_blocks.0.0`` is ``conv_in``; then per down block
  ``layers_per_block`` entries ``input_blocks.n.{0: resnet, 1: transformer}`` and (all but the last block) one
  ``input_blocks.n.0.op`` downsampler; ``middle_block.{0: resnet, 1: transformer, 2: resnet}``; per up block
  ``layers_per_block + 1`` entries ``output_blocks.n.{0: resnet, 1: transformer}`` with the upsampler after them
  (``.1.conv`` without attention, ``.2.conv`` with it). Resnet parts are ``in_layers.{0,2}``, ``emb_layers.1``,
  ``out_layers.{0,3}``, ``skip_connection``; transformers keep diffusers' sub-keys.
- VAE (``first_stage_model.``): ``encoder.down.i.block.j``, ``encoder.down.i.downsample``, ``{en,de}coder.mid.
  block_{1,2}`` / ``mid.attn_1`` (1x1-conv ``q/k/v/proj_out``), ``decoder.up.<reversed i>.block.j`` /
  ``.upsample``, ``norm_out``, ``nin_shortcut``.
- SD1.x text encoder: HF CLIP keys under ``cond_stage_model.transformer.text_model.``.
- SDXL: CLIP-L as HF keys under ``conditioner.embedders.0.transformer.text_model.``, the second (OpenCLIP
  bigG-style) encoder in open_clip layout under ``conditioner.embedders.1.model.`` (``transformer.resblocks.N.
  {ln_1, attn.in_proj_weight, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``token_embedding``,
  ``positional_embedding``, ``ln_final``, ``text_projection`` stored as ``[hidden, proj]``).

Public helpers: :func:`unet_to_ldm`, :func:`vae_to_ldm`, :func:`clip_to_ldm`, :func:`clip_to_open_clip`,
:func:`pipeline_to_ldm_state_dict`, :func:`save_ldm_checkpoint`, :func:`make_tiny_sdxl_single_file_pipeline`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD15_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTN_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _cfg(config: Any) -> Mapping[str, Any]:
    return config if isinstance(config, Mapping) else dict(config)


def _rename(state_dict: Mapping[str, torch.Tensor], prefix_map: list[tuple[str, str, dict[str, str] | None]]):
    """Rename every key by its longest matching diffusers prefix; ``parts`` renames the first sub-key."""
    out: dict[str, torch.Tensor] = {}
    ordered = sorted(prefix_map, key=lambda item: -len(item[0]))
    for key, value in state_dict.items():
        for old, new, parts in ordered:
            if key.startswith(old + "."):
                rest = key[len(old) + 1:]
                if parts:
                    for p_old, p_new in sorted(parts.items(), key=lambda kv: -len(kv[0])):
                        if rest.startswith(p_old + "."):
                            rest = p_new + rest[len(p_old):]
                            break
                new_key = f"{new}.{rest}"
                if new_key in out:
                    raise AssertionError(f"two diffusers keys map to {new_key!r}")
                out[new_key] = value
                break
        else:
            raise KeyError(f"no LDM name for diffusers key {key!r}")
    return out


def unet_prefix_map(config: Any) -> list[tuple[str, str, dict[str, str] | None]]:
    """(diffusers module prefix, LDM module prefix, sub-key renames) for a ``UNet2DConditionModel`` config."""
    c = _cfg(config)
    lpb = c["layers_per_block"]
    if not isinstance(lpb, int):
        if len(set(lpb)) != 1:
            raise NotImplementedError("per-block layers_per_block has no LDM single-file layout")
        lpb = int(lpb[0])
    down_types, up_types = list(c["down_block_types"]), list(c["up_block_types"])
    mapping: list[tuple[str, str, dict[str, str] | None]] = [(k, v, None) for k, v in _UNET_TOP.items()]

    n = 1  # input_blocks.0 is conv_in
    for b, block_type in enumerate(down_types):
        for layer in range(lpb):
            mapping.append((f"down_blocks.{b}.resnets.{layer}", f"input_blocks.{n}.0", _UNET_RESNET_PARTS))
            if "CrossAttn" in block_type:
                mapping.append((f"down_blocks.{b}.attentions.{layer}", f"input_blocks.{n}.1", None))
            n += 1
        if b < len(down_types) - 1:
            mapping.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{n}.0.op", None))
            n += 1

    mid_type = c.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    mapping.append(("mid_block.resnets.0", "middle_block.0", _UNET_RESNET_PARTS))
    if "CrossAttn" in mid_type:
        mapping.append(("mid_block.attentions.0", "middle_block.1", None))
        mapping.append(("mid_block.resnets.1", "middle_block.2", _UNET_RESNET_PARTS))
    else:
        mapping.append(("mid_block.resnets.1", "middle_block.1", _UNET_RESNET_PARTS))

    n = 0
    for b, block_type in enumerate(up_types):
        has_attn = "CrossAttn" in block_type
        for layer in range(lpb + 1):
            mapping.append((f"up_blocks.{b}.resnets.{layer}", f"output_blocks.{n}.0", _UNET_RESNET_PARTS))
            if has_attn:
                mapping.append((f"up_blocks.{b}.attentions.{layer}", f"output_blocks.{n}.1", None))
            if layer == lpb and b < len(up_types) - 1:
                mapping.append((f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{n}.{2 if has_attn else 1}.conv",
                                None))
            n += 1
    return mapping


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """diffusers UNet state dict -> LDM keys (without the ``model.diffusion_model.`` prefix)."""
    return _rename(state_dict, unet_prefix_map(config))


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` state dict -> LDM keys (without ``first_stage_model.``)."""
    c = _cfg(config)
    n_down, n_up = len(c["down_block_types"]), len(c["up_block_types"])
    resnet = {"conv_shortcut": "nin_shortcut"}
    mapping: list[tuple[str, str, dict[str, str] | None]] = []
    for part in ("encoder", "decoder"):
        mapping += [(f"{part}.conv_in", f"{part}.conv_in", None), (f"{part}.conv_out", f"{part}.conv_out", None),
                    (f"{part}.conv_norm_out", f"{part}.norm_out", None),
                    (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTN_PARTS)]
        mapping += [(f"{part}.mid_block.resnets.{i}", f"{part}.mid.block_{i + 1}", resnet) for i in range(2)]
    mapping += [("quant_conv", "quant_conv", None), ("post_quant_conv", "post_quant_conv", None)]
    for i in range(n_down):
        mapping.append((f"encoder.down_blocks.{i}.resnets", f"encoder.down.{i}.block", None))
        mapping.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", None))
    for i in range(n_up):  # the LDM decoder numbers its up blocks from the lowest resolution upwards
        mapping.append((f"decoder.up_blocks.{i}.resnets", f"decoder.up.{n_up - 1 - i}.block", None))
        mapping.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{n_up - 1 - i}.upsample.conv", None))
    out = _rename(state_dict, mapping)
    fixed: dict[str, torch.Tensor] = {}
    for key, value in out.items():
        key = key.replace(".conv_shortcut.", ".nin_shortcut.")  # inside ...block.<j>.conv_shortcut
        if ".mid.attn_1." in key and value.ndim == 2:
            value = value[:, :, None, None]  # the original attention uses 1x1 convolutions
        fixed[key] = value
    return fixed


def _text_model_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP keys with the ``text_model.`` level (transformers >= 5.6 flattens ``CLIPTextModel``)."""
    return {(k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}"): v
            for k, v in state_dict.items()}


def clip_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str = SD15_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` state dict as stored in LDM files (HF keys under ``prefix``)."""
    return {prefix + k: v for k, v in _text_model_keys(state_dict).items() if "position_ids" not in k}


def clip_to_open_clip(state_dict: Mapping[str, torch.Tensor], prefix: str = SDXL_OPEN_CLIP_PREFIX
                      ) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModelWithProjection`` state dict in open_clip layout under ``prefix``."""
    sd = _text_model_keys(state_dict)
    out = {
        "token_embedding.weight": sd.pop("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight": sd.pop("text_model.final_layer_norm.weight"),
        "ln_final.bias": sd.pop("text_model.final_layer_norm.bias"),
        "text_projection": sd.pop("text_projection.weight").T.contiguous(),  # open_clip: x @ proj
    }
    sd.pop("text_model.embeddings.position_ids", None)
    layer_parts = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
    layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):  # fused q/k/v input projection
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")], dim=0)
            for p_old, p_new in layer_parts.items():
                out[f"{dst}{p_new}.{kind}"] = sd.pop(f"{src}{p_old}.{kind}")
    if sd:
        raise KeyError(f"no open_clip name for {sorted(sd)}")
    return {prefix + k: v for k, v in out.items()}


def pipeline_to_ldm_state_dict(pipe: Any, *, schedule_buffers: bool = True) -> dict[str, torch.Tensor]:
    """The full LDM single-file state dict of a ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``.

    ``schedule_buffers`` adds ``betas`` / ``alphas_cumprod`` as real LDM checkpoints carry them (diffusers
    ignores them).
    """
    sd: dict[str, torch.Tensor] = {}
    sd.update({UNET_PREFIX + k: v for k, v in unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()})
    sd.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()})
    if getattr(pipe, "text_encoder_2", None) is not None:
        sd.update(clip_to_ldm(pipe.text_encoder.state_dict(), SDXL_CLIP_L_PREFIX))
        sd.update(clip_to_open_clip(pipe.text_encoder_2.state_dict(), SDXL_OPEN_CLIP_PREFIX))
    else:
        sd.update(clip_to_ldm(pipe.text_encoder.state_dict(), SD15_CLIP_PREFIX))
    if schedule_buffers and hasattr(pipe.scheduler, "betas"):
        betas = pipe.scheduler.betas.float()
        sd["betas"] = betas
        sd["alphas_cumprod"] = torch.cumprod(1.0 - betas, dim=0)
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def save_ldm_checkpoint(pipe: Any, path: str | Path, **kwargs: Any) -> Path:
    """Write :func:`pipeline_to_ldm_state_dict` of ``pipe`` to ``path`` (.safetensors)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(pipeline_to_ldm_state_dict(pipe, **kwargs), str(path))
    return path


# ---- a tiny SDXL pipeline whose two text encoders differ in width ---------------------------------------

SDXL_TEXT2_HIDDEN = 48  # the second encoder's width; must differ from sd_fixtures.TEXT_HIDDEN (see below)


def make_tiny_sdxl_single_file_pipeline(tmpdir: str | Path, seed: int = 0):
    """A tiny SDXL pipeline like ``sd_fixtures.make_tiny_pipeline(sdxl=True)`` but with a wider second encoder.

    diffusers' single-file loader tells SDXL's two text encoders apart by the width of their position
    embeddings (768 vs 1280 in the real model). ``sd_fixtures`` gives both the same width, so a single file
    of that pipeline would load CLIP-L's weights into ``text_encoder_2``; here the second one is
    ``SDXL_TEXT2_HIDDEN`` wide and the UNet's cross-attention takes the concatenation.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    import sd_fixtures as f

    comps = f.make_tiny_sd_components(tmpdir, sdxl=False, seed=seed)
    kwargs = f._unet_kwargs(True)
    kwargs["cross_attention_dim"] = f.TEXT_HIDDEN + SDXL_TEXT2_HIDDEN
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        comps["unet"] = UNet2DConditionModel(**kwargs).eval()
        torch.manual_seed(seed + 3)
        comps["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(
            bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=SDXL_TEXT2_HIDDEN, intermediate_size=37,
            layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=f.VOCAB_SIZE,
            max_position_embeddings=f.MAX_TOKENS, projection_dim=f.TEXT_PROJ, hidden_act="gelu",
        )).eval()
    comps["tokenizer_2"] = comps["tokenizer"]
    return StableDiffusionXLPipeline(**comps)
