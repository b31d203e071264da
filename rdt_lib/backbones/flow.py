"""What the flow-matching backbones (SD3 / SD3.5, Flux) share: loading, the 16-channel VAE, latent shapes.

Time convention of every flow backbone (ComfyUI's ``ModelSamplingDiscreteFlow`` / ``CONST``, diffusers'
``FlowMatchEulerDiscreteScheduler``; :class:`rdt_lib.model_sampling.FlowMatch`):

- *sigma* in [0, 1] is the noise level: a noisy latent is ``x = (1 - sigma) * x0 + sigma * noise``; sampling runs
  from sigma 1 (pure noise) to 0.
- the *timestep* the network sees is ``sigma * 1000`` (a float; diffusers' ``scheduler.timesteps``), not an integer
  and not a step index; :meth:`Backbone.forward_network` takes it in these units.
- a *step index* ``i`` counts the sampler's steps over a sigma list (``sigmas[i] -> sigmas[i + 1]``); the dual-model
  schedules weight steps by ``i``.
- the network predicts the velocity ``v = noise - x0``; ``x0 = x - sigma * v``. Mixing two models' velocities at
  the same ``(x, sigma)`` is mixing their x0 predictions with the same weights, so the schedules mean what they
  mean for SD1.5 / SDXL.
- the model's *shift* bends the sigma lists toward high noise: ``sigma(t) = shift * u / (1 + (shift - 1) * u)``,
  ``u = t / 1000`` (SD3: 3.0 from the scheduler config; Flux: from the image size, see
  :func:`rdt_lib.model_sampling.flow_shift_for_size`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import InputError, MissingFileError, as_user_error, one_line
from .base import Backbone
from .pipelines import checkpoint_keys, dtype_kwarg, pipeline_from_pretrained
from .vae import decode_latents, encode_images

__all__ = ["FlowMatchingBackbone", "FLOW_LORA_TARGETS", "detect_flow_kind", "FLOW_KINDS"]

FLOW_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
"""The attention projections of the SD3 / Flux transformers (image stream ``to_*``, text stream ``add_*`` /
``to_add_out``), as in diffusers' SD3 / Flux LoRA training scripts: the reward-LoRA targets of flow models."""

#: the flow kinds, their diffusers pipeline class names, and a key that marks each in a single-file checkpoint
FLOW_KINDS: dict[str, str] = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
_SINGLE_FILE_MARKERS: dict[str, str] = {
    "sd3": "joint_blocks.0.context_block.adaLN_modulation.1.bias",
    "flux": "double_blocks.0.img_attn.norm.key_norm.scale",
}


def detect_flow_kind(source: Any) -> str | None:
    """``"sd3"``, ``"flux"`` or ``None`` (not a flow model) for a diffusers directory (``model_index.json``'s
    ``_class_name``), a single-file checkpoint's keys (``joint_blocks.*`` = SD3 / SD3.5, ``double_blocks.*`` = Flux,
    with or without the ``model.diffusion_model.`` prefix) or a pipeline class name."""
    if isinstance(source, str) and source in FLOW_KINDS.values():
        return next(k for k, v in FLOW_KINDS.items() if v == source)
    if isinstance(source, (str, os.PathLike)) and Path(source).expanduser().is_dir():
        index = Path(source).expanduser() / "model_index.json"
        if not index.is_file():
            return None
        name = str(json.loads(index.read_text()).get("_class_name", ""))
        return next((k for k, v in FLOW_KINDS.items() if name.startswith(v)), None)
    if isinstance(source, str):
        return None
    keys = list(source)
    for kind, marker in _SINGLE_FILE_MARKERS.items():
        if any(str(k).endswith(marker) for k in keys):
            return kind
    return None


class FlowMatchingBackbone(Backbone):
    """A diffusers flow-matching pipeline (transformer + VAE + text encoders) as a backbone.

    Subclasses set :attr:`kind` and implement ``encode_prompts`` / ``forward_network``. Latents are the VAE's
    ``[B, 16, H / 8, W / 8]`` in model space (``(z - shift_factor) * scaling_factor``) for every flow model (Flux
    packs them into 2x2 patches inside ``forward_network`` only). :attr:`lora_targets` names the modules a reward
    LoRA goes on (``add_lora(bb.network, target_modules=bb.lora_targets)``).
    """

    kind: ClassVar[str] = ""
    lora_targets: ClassVar[tuple[str, ...]] = FLOW_LORA_TARGETS

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.network = pipe.transformer
        self.vae = pipe.vae
        # a scheduler built in code has no _class_name in its config; model_sampling_from_config reads it
        self.scheduler_config = {"_class_name": type(pipe.scheduler).__name__, **dict(pipe.scheduler.config)}
        if not self.scheduler_config["_class_name"].startswith("FlowMatch"):
            raise InputError(f"{self.kind} needs a FlowMatch* scheduler, the pipeline has "
                             f"{self.scheduler_config['_class_name']}")
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def _pipeline_class(cls) -> Any:
        import diffusers

        return getattr(diffusers, FLOW_KINDS[cls.kind])

    @classmethod
    def _component_overrides(cls, t5: bool) -> dict[str, Any]:
        """Pipeline components to leave out (SD3 without T5)."""
        if not t5:
            raise InputError(f"{cls.kind} needs its T5 text encoder (t5=False is accepted for sd3 only)")
        return {}

    @classmethod
    def from_pipeline(cls, pipe: Any) -> "FlowMatchingBackbone":
        """Wrap an already loaded diffusers pipeline."""
        return cls(pipe)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        *,
        t5: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ) -> "FlowMatchingBackbone":
        """Load a diffusers-format model: a local directory with ``model_index.json`` or a hub id.

        ``t5``: load the T5 text encoder (SD3 only may leave it out: its prompt tokens are then zeros, as diffusers
        does with ``text_encoder_3=None``). ``kwargs`` go to diffusers' ``from_pretrained``.
        """
        extra = {**cls._component_overrides(t5), **kwargs}
        pipe = pipeline_from_pretrained(cls._pipeline_class(), path_or_id, what=f"{cls.kind} model", dtype=dtype,
                                        layout="transformer/, vae/, text_encoder*/, tokenizer*/, scheduler/", **extra)
        if device is not None:
            pipe.to(device)
        return cls(pipe)

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        *,
        config: str | os.PathLike | None = None,
        t5: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ) -> "FlowMatchingBackbone":
        """Load a single-file checkpoint (ComfyUI's ``models/checkpoints`` layout: ``model.diffusion_model.*``,
        ``first_stage_model.*``, ``text_encoders.{clip_l,clip_g,t5xxl}.*``).

        ``config``: a local diffusers directory of the same architecture (configs and tokenizers; its weights are
        not used) so nothing is downloaded; ``None`` = diffusers fetches the configs from the hub. ``t5=False``
        (SD3): a checkpoint without T5 weights, sampled without T5.
        """
        p = Path(path).expanduser()
        if not p.is_file():
            raise MissingFileError(f"checkpoint file {str(p)!r} does not exist")
        if p.suffix.lower() == ".safetensors":
            with as_user_error():
                keys = checkpoint_keys(p)
            found = detect_flow_kind(keys)
            if found != cls.kind:
                what = f"a {found} checkpoint" if found else "not an SD3 / Flux checkpoint"
                raise InputError(f"{str(p)!r} is {what}, but kind={cls.kind!r} was given")
            if cls.kind == "sd3" and t5 and not any(k.startswith("text_encoders.t5xxl.") for k in keys):
                raise InputError(f"{str(p)!r} has no T5 text encoder weights (text_encoders.t5xxl.*): load it with "
                                 "t5=False to sample without T5, or use a checkpoint that includes T5")
        extra: dict[str, Any] = cls._component_overrides(t5)
        if config is not None:
            config_dir = Path(config).expanduser()
            if config_dir.is_dir():
                if detect_flow_kind(config_dir) != cls.kind:
                    raise InputError(f"single-file config directory {str(config_dir)!r} is not a diffusers "
                                     f"{FLOW_KINDS[cls.kind]} directory (model_index.json)")
                extra.update(config=str(config_dir), local_files_only=True)
            elif Path(config).is_absolute() or str(config).startswith((".", "~")) or str(config).count("/") > 1:
                raise MissingFileError(f"single-file config directory {str(config)!r} does not exist (give a local "
                                       f"diffusers directory of the {cls.kind} architecture, or a hub id)")
            else:
                extra["config"] = str(config)
        extra.update(kwargs)
        try:
            pipe = cls._pipeline_class().from_single_file(str(p), **dtype_kwarg(dtype), **extra)
        except Exception as err:  # diffusers raises several error types here
            raise InputError(
                f"could not load {str(p)!r} as a single-file {cls.kind} checkpoint: {one_line(err)}; offline, pass "
                "config=<a local diffusers directory of the same architecture> so nothing needs a download"
            ) from err
        for name, module in pipe.components.items():  # diffusers leaves weights the file lacks on the meta device
            missing = [k for k, v in module.state_dict().items() if v.is_meta] if isinstance(module, torch.nn.Module) else []
            if missing:
                raise InputError(f"{str(p)!r}: the checkpoint lacks {len(missing)} weight(s) of the {name} (e.g. "
                                 f"{', '.join(missing[:3])}); it does not match the config's architecture")
        if device is not None:
            pipe.to(device)
        return cls(pipe)

    # ---- shared backbone methods --------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        """Pixels per latent token side (SD3 ``patch_size``; Flux packs 2x2): height and width are multiples of
        ``vae_scale_factor * patch_size``."""
        return int(getattr(self.network.config, "patch_size", 1) or 1)

    def default_size(self) -> int:
        """The default image side in pixels (SD3: transformer ``sample_size`` latents; Flux 1024 at 8x)."""
        return int(getattr(self.network.config, "sample_size", 128)) * self.vae_scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, 16, h, w]`` -> images ``[B, 3, H, W]`` in [0, 1] (differentiable; clamped)."""
        return decode_latents(self.vae, latents)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] -> latents (a sample of the VAE posterior)."""
        return encode_images(self.vae, images, generator, dtype=self.dtype)

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        h, w = height or self.default_size(), width or self.default_size()
        step = self.vae_scale_factor * self.patch_size
        if h % step or w % step:
            raise InputError(f"height and width must be multiples of {step} for {self.kind}, got {h}x{w}")
        return (int(self.vae.config.latent_channels), h // self.vae_scale_factor, w // self.vae_scale_factor)
