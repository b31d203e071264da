"""An :class:`rdt_lib.backbones.base.Backbone` over ComfyUI's own MODEL, CLIP and VAE objects.

The reward trainer (:mod:`rdt_lib.train`) sees a backbone like the diffusers one; underneath, every piece is
ComfyUI's:

- prompts: ``CLIP.tokenize`` + ``CLIP.encode_from_tokens`` (ComfyUI's tokenizer, weighting syntax and text
  encoder), encoded once before training and cached;
- predictions: the MODEL's ``diffusion_model`` (ComfyUI's UNet, its ``comfy.ops`` layers and the input MODEL's
  patches, e.g. an upstream LoRA) with the MODEL's ``model_sampling``: :meth:`ComfyBackbone.denoise` is the
  sigma-space denoiser ``D(x, sigma) = calculate_denoised(sigma, net(calculate_input(sigma, x),
  timestep(sigma)), x)`` exactly as ``BaseModel._apply_model`` computes it, and
  :meth:`ComfyBackbone.forward_network` the same network call in training-timestep units for the
  timestep-space samplers of the objectives;
- decoding: the VAE's ``first_stage_model.decode`` called directly (differentiable; ``VAE.decode`` writes into a
  preallocated buffer and moves to the output device).

The trained LoRA is a peft adapter (:func:`rdt_lib.lora.add_lora`, the headless trainer's code) on the UNet's
attention projections. It is attached through :class:`DiffusersNamedView`: a module tree with diffusers' names
(``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``) whose leaves *are* ComfyUI's layers; when peft
replaces a leaf of the view with its LoRA layer, the view sets that layer into ComfyUI's UNet as well. So the
adapter's parameter names, its initialisation order and the exported kohya keys are the headless trainer's,
and :meth:`DiffusersNamedView.restore` puts ComfyUI's original layers back.

Weights loaded by ComfyUI inside ``torch.inference_mode()`` are inference tensors, which autograd refuses to
save for the backward pass. :func:`autograd_usable` swaps them, for the duration of training, for ordinary
tensors that share their memory (no copy) and puts the original objects back afterwards.

Everything ComfyUI-specific is imported inside functions, so this module imports without ComfyUI.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from rdt_lib.backbones.base import Backbone, Conditioning

from .unet_names import LORA_TARGETS, attention_lora_targets

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedModelError",
    "model_family",
    "autograd_usable",
    "DiffusersNamedView",
    "ComfyBackbone",
    "scheduler_config_from_model_sampling",
]

SUPPORTED_MODEL_TYPES: dict[str, str] = {"SD15": "sd15", "SDXL": "sdxl"}
"""ComfyUI model-config class name -> trainer family (``comfy.supported_models``)."""


class UnsupportedModelError(ValueError):
    """The MODEL is not one of the architectures the reward trainer supports."""


def model_family(model: Any) -> str:
    """``sd15`` or ``sdxl`` for a ComfyUI MODEL (``ModelPatcher``); anything else is refused.

    Raises:
        UnsupportedModelError: naming the model's type and the supported ones.
    """
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    name = type(config).__name__ if config is not None else type(base).__name__
    if name not in SUPPORTED_MODEL_TYPES or getattr(base, "diffusion_model", None) is None:
        raise UnsupportedModelError(
            f"the reward trainer supports SD1.5 and SDXL checkpoints (ComfyUI model types "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}); this MODEL is {name}")
    return SUPPORTED_MODEL_TYPES[name]


# ---------------------------------------------------------------------------------------------------------------
# inference tensors


def _ordinary_alias(t: torch.Tensor) -> torch.Tensor:
    """An ordinary (non-inference) tensor over the same memory as ``t`` (a copy where DLPack cannot alias)."""
    with torch.inference_mode(False):
        try:
            return torch.from_dlpack(t.detach())
        except (RuntimeError, TypeError, BufferError):  # e.g. fp8 dtypes DLPack has no code for
            return t.detach().clone()


@contextlib.contextmanager
def autograd_usable(modules: Iterable[nn.Module]) -> Iterator[int]:
    """Make the parameters and buffers of ``modules`` usable in autograd for the ``with`` block.

    Every inference tensor (created under ``torch.inference_mode()``, as ComfyUI loads models) is replaced in its
    module by an ordinary tensor aliasing the same memory (a ``Parameter`` stays a ``Parameter``, with
    ``requires_grad=False``); on exit the original objects are put back, also after an error. Yields the number of
    tensors swapped.
    """
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    try:
        seen: set[int] = set()
        for module in modules:
            for sub in module.modules():
                if id(sub) in seen:
                    continue
                seen.add(id(sub))
                for store in (sub._parameters, sub._buffers):
                    for name, t in list(store.items()):
                        if t is None or not t.is_inference():
                            continue
                        alias = _ordinary_alias(t)
                        store[name] = nn.Parameter(alias, requires_grad=False) if isinstance(t, nn.Parameter) else alias
                        swapped.append((store, name, t))
        yield len(swapped)
    finally:
        for store, name, t in reversed(swapped):
            store[name] = t


# ---------------------------------------------------------------------------------------------------------------
# the diffusers-named view


class _MirrorNode(nn.Module):
    """A container of :class:`DiffusersNamedView`; setting a mirrored child also sets it in ComfyUI's UNet."""

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["_mirrors"] = {}

    def __setattr__(self, name: str, value: Any) -> None:
        mirrors = self.__dict__.get("_mirrors")
        if mirrors and name in mirrors and isinstance(value, nn.Module):
            parent, leaf = mirrors[name]
            setattr(parent, leaf, value)
        super().__setattr__(name, value)

    def forward(self, *args, **kwargs):  # pragma: no cover - a view is never called
        raise RuntimeError("DiffusersNamedView is a naming view of ComfyUI's UNet; call the UNet instead")


class DiffusersNamedView(_MirrorNode):
    """ComfyUI's attention projections under diffusers' module names, in diffusers' module order.

    Args:
        unet: ComfyUI's ``diffusion_model`` (LDM layout).
        targets: leaf names among ``to_q, to_k, to_v, to_out.0``.

    Attributes:
        pairs: ``(ldm path, diffusers path)`` of every viewed layer.
    """

    def __init__(self, unet: nn.Module, targets: Sequence[str] = LORA_TARGETS) -> None:
        super().__init__()
        self.__dict__["unet"] = unet  # not a submodule: the view holds only the projections
        self.__dict__["pairs"] = attention_lora_targets([n for n, _ in unet.named_modules()], targets)
        self.__dict__["originals"] = []
        for ldm, diff in self.pairs:
            original = unet.get_submodule(ldm)
            ldm_parent, _, ldm_leaf = ldm.rpartition(".")
            node: _MirrorNode = self
            *parents, leaf = diff.split(".")
            for part in parents:
                child = node._modules.get(part)
                if child is None:
                    child = _MirrorNode()
                    node.add_module(part, child)
                node = child  # type: ignore[assignment]
            node._mirrors[leaf] = (unet.get_submodule(ldm_parent), ldm_leaf)
            node._modules[leaf] = original
            self.originals.append((unet.get_submodule(ldm_parent), ldm_leaf, original))

    def restore(self) -> None:
        """Put ComfyUI's original layers back into the UNet (undoes any LoRA injected through the view)."""
        for parent, leaf, original in self.originals:
            if parent is None:  # a block whose forward was wrapped for gradient checkpointing
                original.__dict__.pop("forward", None)
            else:
                setattr(parent, leaf, original)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the UNet's activations in the backward pass: ``torch.utils.checkpoint`` around every layer of
        ``input_blocks[i]``, ``middle_block`` and ``output_blocks[i]`` (ComfyUI calls those layers one by one, not
        the blocks' own forward); undone by :meth:`restore`."""
        unet = self.unet
        blocks = list(getattr(unet, "input_blocks", [])) + [getattr(unet, "middle_block", None)] + \
            list(getattr(unet, "output_blocks", []))
        for block in blocks:
            for layer in (block.children() if block is not None else []):
                if "forward" in layer.__dict__:
                    continue

                def checkpointed(*args, __layer=layer, **kwargs):
                    cls_forward = type(__layer).forward
                    if not torch.is_grad_enabled():
                        return cls_forward(__layer, *args, **kwargs)
                    return torch.utils.checkpoint.checkpoint(cls_forward, __layer, *args, use_reentrant=False,
                                                             **kwargs)

                layer.forward = checkpointed
                self.originals.append((None, None, layer))


# ---------------------------------------------------------------------------------------------------------------
# the backbone


def scheduler_config_from_model_sampling(model_sampling: Any, model_config: Any, prediction_type: str) -> dict:
    """A diffusers scheduler config with the MODEL's noise schedule.

    SD's ``linear`` schedule (ComfyUI) is diffusers' ``scaled_linear`` with the same start / end; other schedules
    (or zero-terminal-SNR) are passed as ``trained_betas`` computed from the model's sigmas
    (``alphas_cumprod = 1 / (1 + sigma^2)``).
    """
    settings = dict(getattr(model_config, "sampling_settings", {}) or {})
    n = int(getattr(model_sampling, "num_timesteps", len(model_sampling.sigmas)))
    config: dict[str, Any] = {
        "num_train_timesteps": n,
        "prediction_type": prediction_type,
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "clip_sample": False,
        "timestep_spacing": "leading",
    }
    if settings.get("beta_schedule", "linear") == "linear" and not getattr(model_sampling, "zsnr", False):
        config.update(beta_schedule="scaled_linear", beta_start=float(model_sampling.linear_start),
                      beta_end=float(model_sampling.linear_end))
    else:
        sigmas = model_sampling.sigmas.detach().double().cpu()
        ac = 1.0 / (1.0 + sigmas ** 2)
        prev = torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])
        config.update(beta_schedule="linear", trained_betas=(1 - ac / prev).clamp(0, 0.999).tolist())
    return config


class ComfyBackbone(Backbone):
    """The trainer's backbone over a ComfyUI MODEL (a clone the caller owns), CLIP and VAE.

    Args:
        model: a ``ModelPatcher`` of an SD1.5 or SDXL checkpoint; the caller passes its own clone and loads it
            (``comfy.model_management.load_models_gpu``) before training.
        clip: the checkpoint's CLIP (prompt encoding).
        vae: the checkpoint's VAE (decoding; encoding real images for ImageReFL).
        resolution: default training image size in pixels.

    The backbone's ``dtype`` is float32: latents stay float32 between network calls (as in ComfyUI's samplers);
    each call casts the input to the UNet's compute dtype and the output back to float32.
    """

    def __init__(self, model: Any, clip: Any, vae: Any, *, resolution: int | None = None) -> None:
        import comfy.model_sampling

        self.family = model_family(model)
        self.patcher = model
        self.base_model = model.model
        self.unet = self.base_model.diffusion_model
        # ComfyUI's own object; Backbone.model_sampling is rdt's, built from the scheduler_config below
        self.comfy_model_sampling = self.base_model.model_sampling
        self.latent_format = self.base_model.latent_format
        self.clip = clip
        self.vae = vae
        self.is_sdxl = self.family == "sdxl"
        self.default_cfg = 5.0 if self.is_sdxl else 7.5
        self.vae_scale_factor = 8
        self.default_resolution = int(resolution or (1024 if self.is_sdxl else 512))
        if isinstance(self.comfy_model_sampling, comfy.model_sampling.V_PREDICTION):
            self.prediction_type = "v_prediction"
        elif isinstance(self.comfy_model_sampling, comfy.model_sampling.EPS):
            self.prediction_type = "epsilon"
        else:
            raise UnsupportedModelError(f"unsupported model sampling {type(self.comfy_model_sampling).__name__} "
                                        "(the trainer needs an eps- or v-prediction model)")
        self.scheduler_config = scheduler_config_from_model_sampling(
            self.comfy_model_sampling, self.base_model.model_config, self.prediction_type)
        self.network = DiffusersNamedView(self.unet)
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    # ---- properties ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def compute_dtype(self) -> torch.dtype:
        """The UNet's compute dtype (its weight dtype, or ComfyUI's manual-cast dtype)."""
        return self.base_model.manual_cast_dtype or self.base_model.get_dtype()

    # ---- prompts ---------------------------------------------------------------------------------------------
    def precompute_prompts(self, prompts: Iterable[str]) -> None:
        """Encode ``prompts`` now (CLIP loads through ComfyUI's model management), so training needs no CLIP."""
        for p in dict.fromkeys(prompts):
            self._encode_one(p)

    def _encode_one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        hit = self._prompt_cache.get(prompt)
        if hit is None:
            with torch.no_grad():
                out = self.clip.encode_from_tokens(self.clip.tokenize(prompt), return_pooled=True, return_dict=True)
            pooled = out.get("pooled_output")
            hit = (out["cond"].detach().float().cpu().clone(),
                   None if pooled is None else pooled.detach().float().cpu().clone())
            self._prompt_cache[prompt] = hit
        return hit

    def encode_prompts(self, prompts: Sequence[str], *, negative: bool = False) -> Conditioning:
        """CLIP embeddings ``encoder_hidden_states [B, T, D]`` (and SDXL's pooled ``text_embeds [B, 1280]``).

        ComfyUI encodes a long prompt as several 77-token chunks; rows of different lengths are repeated to a
        common length as ComfyUI batches conditionings (repeating every key leaves cross-attention unchanged).
        An empty SDXL negative is encoded like any prompt (ComfyUI's behaviour; diffusers zeroes it instead).
        """
        del negative
        rows = [self._encode_one(p) for p in prompts]
        length = 1
        for cond, _ in rows:
            length = length * cond.shape[1] // math.gcd(length, cond.shape[1])
        conds = [c.repeat(1, length // c.shape[1], 1) for c, _ in rows]
        tensors = {"encoder_hidden_states": torch.cat(conds).to(self.device)}
        if self.is_sdxl:
            tensors["text_embeds"] = torch.cat([p for _, p in rows]).to(self.device)
        return Conditioning(tensors, len(rows))

    # ---- the network -----------------------------------------------------------------------------------------
    def _network(self, xc: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One UNet call as ``BaseModel._apply_model`` makes it: input and context in the compute dtype, the
        SDXL size embedding ``y`` from ``encode_adm`` (original = target size = the image size, no crop),
        output float32."""
        dtype = self.compute_dtype
        device = xc.device
        kwargs: dict[str, Any] = {}
        if self.is_sdxl:
            h, w = xc.shape[-2] * self.vae_scale_factor, xc.shape[-1] * self.vae_scale_factor
            y = self.base_model.encode_adm(pooled_output=cond.tensors["text_embeds"].to(device), width=w, height=h)
            kwargs["y"] = y.to(device=device, dtype=dtype)
        transformer_options = dict(self.patcher.model_options.get("transformer_options", {}))
        context = cond.tensors["encoder_hidden_states"].to(device=device, dtype=dtype)
        out = self.unet(xc.to(dtype), timestep.float(), context=context, control=None,
                        transformer_options=transformer_options, **kwargs)
        return out.float()

    def forward_network(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The raw network output at training timesteps ``t`` (0..999) for variance-preserving latents ``x``
        (= ComfyUI's ``calculate_input(sigma, x_sigma)``, the UNet's input)."""
        return self._network(x, t.to(x.device), cond)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                adapters: str | None | Sequence[str | None] = None) -> torch.Tensor:
        """The sigma-space denoiser ``D(x, sigma) -> x0`` with the MODEL's own model sampling (``x`` is
        ``x0 + sigma * noise``, sigma one per row or a scalar)."""
        from rdt_lib.lora import use_adapters

        ms = self.comfy_model_sampling
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        xc = ms.calculate_input(sigma, x)
        timestep = ms.timestep(sigma)
        with use_adapters(self.network, adapters):
            out = self._network(xc, timestep, cond)
        return ms.calculate_denoised(sigma, out, x)

    # ---- VAE -------------------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (model space) -> images ``[B, 3, H, W]`` in [0, 1], differentiable."""
        vae = self.vae
        z = self.latent_format.process_out(latents.float())
        img = vae.first_stage_model.decode(z.to(device=vae.device, dtype=vae.vae_dtype))
        return ((img.float() + 1.0) / 2.0).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] -> model-space latents (ComfyUI's VAE encoding; no gradient)."""
        vae = self.vae
        with torch.no_grad():
            pixels = vae.process_input(images.to(device=vae.device, dtype=vae.vae_dtype))
            z = vae.first_stage_model.encode(pixels).float()
        return self.latent_format.process_in(z).to(self.device)

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        h, w = height or self.default_resolution, width or self.default_resolution
        if h % self.vae_scale_factor or w % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {h}x{w}")
        channels = int(getattr(self.latent_format, "latent_channels", 4))
        return (channels, h // self.vae_scale_factor, w // self.vae_scale_factor)
