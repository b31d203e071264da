"""Stable Diffusion backbones (SD1.x/2.x-style and SDXL-style) on diffusers components.

Prompt encoding goes through the diffusers pipeline's own ``encode_prompt`` so prompts are encoded
exactly as diffusers samples them; the denoising call is ``unet(x, t, encoder_hidden_states, ...)``.
Load from a diffusers directory or hub id (:meth:`StableDiffusionBackbone.from_pretrained`), a single
``.safetensors`` checkpoint such as ComfyUI's ``models/checkpoints`` files
(:meth:`StableDiffusionBackbone.from_single_file`), or an existing pipeline (:meth:`from_pipeline`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..errors import InputError, MissingFileError, as_user_error, one_line
from .base import Backbone, Conditioning
from .pipelines import checkpoint_keys, dtype_kwarg, pipeline_from_pretrained
from .vae import decode_latents, encode_images

__all__ = ["StableDiffusionBackbone", "detect_sd_kind"]


class StableDiffusionBackbone(Backbone):
    """A diffusers Stable Diffusion model as a backbone.

    Args:
        pipe: a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (its UNet is the ``network``).
            The backbone keeps the pipeline for prompt encoding; the scheduler config is copied.
    """

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.network = pipe.unet
        self.vae = pipe.vae
        self.is_sdxl = detect_sd_kind(pipe) == "sdxl"
        self.scheduler_config = dict(pipe.scheduler.config)
        self.default_cfg = 5.0 if self.is_sdxl else 7.5
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        # diffusers' SDXL default: an empty negative prompt is encoded as zeros
        self.zero_empty_negative = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe: Any) -> "StableDiffusionBackbone":
        """Wrap an already loaded diffusers pipeline."""
        return cls(pipe)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        *,
        kind: str = "auto",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ) -> "StableDiffusionBackbone":
        """Load a diffusers-format model: a local directory with ``model_index.json`` or a hub id.

        ``kind``: ``"sd15"`` (SD1.x/2.x pipeline), ``"sdxl"``, or ``"auto"`` (from ``model_index.json``).
        """
        from diffusers import StableDiffusionPipeline

        pipe_cls = _pipeline_class(kind, path_or_id)
        extra = {"safety_checker": None} if pipe_cls is StableDiffusionPipeline else {}
        pipe = pipeline_from_pretrained(pipe_cls, path_or_id, what="model", dtype=dtype, **extra, **kwargs,
                                        layout="unet/, vae/, text_encoder/, tokenizer/, scheduler/")
        if device is not None:
            pipe.to(device)
        return cls(pipe)

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        *,
        kind: str = "sd15",
        config: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ) -> "StableDiffusionBackbone":
        """Load a single-file checkpoint (``.safetensors`` / ``.ckpt`` as in ComfyUI's ``models/checkpoints``).

        The file holds UNet, VAE and text encoder(s) in the original LDM layout (``model.diffusion_model.*``,
        ``first_stage_model.*``, ``cond_stage_model.*`` or, for SDXL, ``conditioner.embedders.{0,1}.*``).

        ``config``: a local diffusers directory of the same architecture (model_index.json, component
        configs and tokenizers; its weights are not needed and not used) to take the configs from; without it
        diffusers fetches them from the hub, which fails on an offline machine. With a local ``config``
        nothing is downloaded (``local_files_only=True``). ``kwargs`` go to diffusers' ``from_single_file``.
        """
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if kind not in ("sd15", "sdxl"):
            raise InputError(f"kind must be 'sd15' or 'sdxl' for a single-file checkpoint, got {kind!r}")
        p = Path(path).expanduser()
        if not p.is_file():
            raise MissingFileError(f"checkpoint file {str(p)!r} does not exist")
        if p.suffix.lower() == ".safetensors":
            with as_user_error():
                _check_single_file_keys(p, kind)
        pipe_cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
        extra: dict[str, Any] = {"safety_checker": None} if kind == "sd15" else {}
        if config is not None:
            config_dir = Path(config).expanduser()
            if config_dir.is_dir():
                with as_user_error():
                    _check_single_file_config(config_dir, kind)
                extra["config"] = str(config_dir)
                extra["local_files_only"] = True
            elif Path(config).is_absolute() or str(config).startswith((".", "~")) or str(config).count("/") > 1:
                raise MissingFileError(
                    f"single-file config directory {str(config)!r} does not exist (give a local diffusers directory "
                    f"of the {kind} architecture, or a hub id)"
                )
            else:
                extra["config"] = str(config)  # a hub id
        extra.update(kwargs)
        try:
            pipe = pipe_cls.from_single_file(str(p), **dtype_kwarg(dtype), **extra)
        except Exception as err:  # diffusers raises several error types here
            if "meta tensor" in str(err):  # weights the file lacks stay uninitialised and cannot be cast/moved
                raise InputError(
                    f"could not load {str(p)!r} as a single-file {kind} checkpoint: the checkpoint lacks weights of "
                    "a component the config describes (is it complete, and of the config's architecture?); "
                    f"(diffusers: {err})"
                ) from err
            raise InputError(
                f"could not load {str(p)!r} as a single-file {kind} checkpoint: {one_line(err)}; "
                "Offline, pass config=<a local diffusers directory of the same architecture> so the component "
                "configs and tokenizers need no download."
            ) from err
        with as_user_error():
            _check_no_missing_weights(pipe, p)
        if device is not None:
            pipe.to(device)
        return cls(pipe)

    # ---- the backbone interface ---------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], *, negative: bool = False) -> Conditioning:
        """Encode prompts with the pipeline's text encoder(s); no gradient.

        SD: ``encoder_hidden_states [B, 77, D]``. SDXL: also the pooled ``text_embeds [B, 1280]``; an
        all-empty negative prompt is zeros when the model's config says so (as diffusers samples).
        """
        prompts = list(prompts)
        device = self.device
        with torch.no_grad():
            if not self.is_sdxl:
                embeds, _ = self.pipe.encode_prompt(prompts, device, 1, False)
                return Conditioning({"encoder_hidden_states": embeds.to(self.dtype)}, len(prompts))
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
            if negative and self.zero_empty_negative and all(p == "" for p in prompts):
                embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        return Conditioning(
            {"encoder_hidden_states": embeds.to(self.dtype), "text_embeds": pooled.to(self.dtype)}, len(prompts)
        )

    def _time_ids(self, x: torch.Tensor) -> torch.Tensor:
        """SDXL micro-conditioning for the default case: original = target size = the image size, no crop."""
        h, w = x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
        ids = torch.tensor([h, w, 0, 0, h, w], device=x.device, dtype=x.dtype)
        return ids.expand(x.shape[0], 6)

    def forward_network(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if self.is_sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.tensors["text_embeds"], "time_ids": self._time_ids(x)}
        return self.network(x, t, encoder_hidden_states=cond.tensors["encoder_hidden_states"], return_dict=False, **kwargs)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images ``[B, 3, H, W]`` in [0, 1] (differentiable; clamped)."""
        return decode_latents(self.vae, latents)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] -> latents (a sample of the VAE posterior)."""
        return encode_images(self.vae, images, generator, dtype=self.dtype)

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        default = int(self.network.config.sample_size) * self.vae_scale_factor
        h, w = height or default, width or default
        if h % self.vae_scale_factor or w % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {h}x{w}")
        return (int(self.network.config.in_channels), h // self.vae_scale_factor, w // self.vae_scale_factor)


def _pipeline_class(kind: str, path_or_id: str | os.PathLike):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if kind == "auto":
        kind = detect_sd_kind(path_or_id)
    if kind == "sd15":
        return StableDiffusionPipeline
    if kind == "sdxl":
        return StableDiffusionXLPipeline
    raise ValueError(f"kind must be 'auto', 'sd15' or 'sdxl', got {kind!r}")


# ---- SDXL or SD1.x/2.x ------------------------------------------------------------------------------------
_LDM_UNET_PREFIX = "model.diffusion_model."
_SDXL_MARKER = "conditioner.embedders.1."  # SDXL's second (OpenCLIP) text encoder in an LDM checkpoint


def detect_sd_kind(source: Any) -> str:
    """``"sdxl"`` or ``"sd15"`` (SD1.x/2.x) for a model, its weights or where they lie; the one place that decides.

    ``source`` may be:

    - a diffusers pipeline (SDXL has a ``text_encoder_2``) or a ``StableDiffusionBackbone``;
    - a ``UNet2DConditionModel`` or its config (SDXL's UNet has ``addition_embed_type == "text_time"``);
    - a single-file checkpoint path (``.safetensors``, ``.ckpt``) or its keys (a state dict or an iterable of
      key strings): SDXL has a second text encoder ``conditioner.embedders.1.*``;
    - a diffusers directory (SDXL's ``model_index.json`` lists ``text_encoder_2``);
    - any other string is taken as a hub id: SDXL when it contains ``xl`` (a guess; pass ``kind`` to be sure).

    Raises:
        FileNotFoundError: a directory without ``model_index.json``.
        ValueError: a file that cannot be read as a checkpoint, or an object of none of these kinds.
    """
    if hasattr(source, "pipe") and hasattr(source, "network"):  # a backbone
        source = source.pipe
    if hasattr(source, "components") and hasattr(source, "unet"):  # a diffusers pipeline
        return "sdxl" if getattr(source, "text_encoder_2", None) is not None else "sd15"
    config = getattr(source, "config", source)
    if isinstance(config, Mapping) and ("addition_embed_type" in config or "cross_attention_dim" in config):
        return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd15"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir():
            index = path / "model_index.json"
            if not index.is_file():
                raise FileNotFoundError(f"{str(path)!r} is a directory without model_index.json (not a diffusers model)")
            return "sdxl" if "text_encoder_2" in json.loads(index.read_text()) else "sd15"
        if path.is_file():
            return detect_sd_kind(checkpoint_keys(path))
        return "sdxl" if "xl" in str(source).lower() else "sd15"
    if isinstance(source, Mapping):
        source = source.keys()
    if isinstance(source, Iterable):
        return "sdxl" if any(str(k).startswith(_SDXL_MARKER) for k in source) else "sd15"
    raise ValueError(f"cannot tell SDXL from SD1.x/2.x for a {type(source).__name__}: give a pipeline, backbone, "
                     "UNet, checkpoint path, diffusers directory or checkpoint keys")


# ---- single-file checks ---------------------------------------------------------------------------------
def _check_single_file_keys(path: Path, kind: str) -> None:
    """Fail early, with a clear message, on a .safetensors file that is not a full SD checkpoint of ``kind``."""
    keys = checkpoint_keys(path)
    if not any(k.startswith(_LDM_UNET_PREFIX) for k in keys):
        sample = ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")
        raise ValueError(
            f"{str(path)!r} is not a full Stable Diffusion checkpoint: it has no {_LDM_UNET_PREFIX}* (UNet) weights "
            f"(its {len(keys)} tensors start with: {sample or 'nothing'}). Single-file loading needs a checkpoint in "
            "the original LDM layout with UNet, VAE and text encoder(s), like the files in ComfyUI's "
            "models/checkpoints; LoRA, VAE-only or UNet-only files cannot be loaded this way."
        )
    found_kind = detect_sd_kind(keys)
    if found_kind != kind:
        found = "an SDXL" if found_kind == "sdxl" else "an SD1.x/2.x"
        raise ValueError(f"{str(path)!r} looks like {found} checkpoint, but kind={kind!r} was given; "
                         f"use kind={found_kind!r}")


def _check_single_file_config(config_dir: Path, kind: str) -> None:
    """The config directory must be a diffusers pipeline of the same architecture as ``kind``."""
    index = config_dir / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"single-file config directory {str(config_dir)!r} has no model_index.json; give a diffusers-format "
            f"directory of the {kind} architecture (model_index.json plus the component configs and tokenizers)"
        )
    found_kind = detect_sd_kind(config_dir)
    if found_kind != kind:
        found = "an SDXL" if found_kind == "sdxl" else "an SD1.x/2.x"
        raise ValueError(f"single-file config directory {str(config_dir)!r} is {found} pipeline, but kind={kind!r}; "
                         "the config must have the checkpoint's architecture")


def _check_no_missing_weights(pipe: Any, path: Path) -> None:
    """diffusers leaves weights it did not find in the file uninitialised (on the meta device); refuse those."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if not isinstance(module, torch.nn.Module):
            continue
        missing = [k for k, v in module.state_dict().items() if v.is_meta]
        if missing:
            raise ValueError(
                f"{str(path)!r}: the checkpoint lacks {len(missing)} weight(s) of the {name} "
                f"(e.g. {', '.join(missing[:3])}); it does not match the config's architecture"
            )
