"""LoRA files: writing a peft adapter as a kohya file, reading any SD LoRA file through diffusers, safetensors I/O.

Writing (:func:`unet_lora_to_kohya`, :func:`save_lora`): peft's ``get_peft_model_state_dict`` converted with
diffusers' ``convert_state_dict_to_kohya``; for the UNet module ``down_blocks.0.attentions.0.transformer_blocks.0.
attn1.to_q`` the file holds::

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight   # = lora_A [r, in]
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight     # = lora_B [out, r]
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha              # float32 scalar

(``lora_unet_`` + the diffusers module path with dots as underscores: a name ComfyUI's LoraLoader maps through
``comfy.utils.unet_to_diffusers``, and A1111-style tools and diffusers read). kohya's scale is ``alpha / rank``;
diffusers' converter writes ``alpha = rank`` (scale 1), so the alpha is set here from each peft layer's own scale
(``lora_alpha / r``, rsLoRA ``lora_alpha / sqrt(r)``, rank / alpha patterns). One alpha is stored for every module
and a module's different scale is folded into its ``lora_up``: diffusers' kohya loader applies a single alpha to
all modules (its per-module alphas are keyed under names that match no peft module), while ComfyUI and A1111
read each module's alpha, so a uniform alpha gives the same ``up @ down * alpha / rank`` in all of them.

Reading (:func:`load_lora`): diffusers' ``lora_state_dict`` (kohya files with diffusers-style ``lora_unet_down_
blocks_...`` or LDM-style ``lora_unet_input_blocks_...`` keys, text-encoder ``lora_te_`` / ``lora_te1_`` /
``lora_te2_`` keys, diffusers / PEFT files) and its ``load_lora_into_unet`` / ``load_lora_into_text_encoder``,
which add a peft adapter of the given name. Before that, kohya alphas are made uniform the same way (for files
from other tools), PEFT keys get the component prefix diffusers expects, and afterwards every weight is checked
to have reached a module.

Flow transformers (SD3 / SD3.5; :func:`transformer_lora_to_diffusers`, same :func:`save_lora` / :func:`load_lora`):
the file holds diffusers' own LoRA keys, the one layout that both ComfyUI's LoraLoader and diffusers'
``StableDiffusion3Pipeline.load_lora_weights`` read for SD3::

    transformer.transformer_blocks.0.attn.to_q.lora_A.weight        # [r, in]
    transformer.transformer_blocks.0.attn.to_q.lora_B.weight        # [out, r], the peft scale alpha / r folded in

ComfyUI (``comfy/lora.py`` ``model_lora_keys_unet``, its ``comfy.model_base.SD3`` branch) maps
``transformer.<diffusers path>`` through ``comfy.utils.mmdit_to_diffusers`` (``to_q/to_k/to_v`` and
``add_q_proj/add_k_proj/add_v_proj`` into slices of the fused ``qkv`` weights, ``to_out.0`` / ``to_add_out`` to
``proj``) and reads ``.lora_B.weight`` / ``.lora_A.weight`` pairs (``comfy/weight_adapter/lora.py``), with scale
``alpha / rank`` when a ``.alpha`` key exists, else 1. diffusers' SD3 loader refuses any key without ``lora`` in
it (so no ``.alpha`` keys) and, without metadata, gives every module ``lora_alpha = r`` (scale 1). Folding each
module's scale into ``lora_B`` and writing no alpha gives ``up @ down * scale`` in both. :func:`load_lora` also
reads ``base_model.model.`` / bare PEFT keys and kohya-style ``lora_transformer_<path>`` files (OneTrainer's, which
ComfyUI also maps; their alphas folded the same way) into a transformer.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .atomic_io import write_bytes_atomic

__all__ = [
    "KOHYA_UNET_PREFIX",
    "DEFAULT_TARGET_MODULES",
    "LoadedLora",
    "kohya_module_name",
    "peft_to_kohya",
    "unet_lora_to_kohya",
    "transformer_lora_to_diffusers",
    "lora_layout",
    "base_model_version_of",
    "network_lora_tensors",
    "save_lora",
    "load_lora",
    "read_lora",
    "kohya_metadata",
    "save_lora_safetensors",
    "load_lora_safetensors",
]

KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
KOHYA_TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# "<module>.lora_A.weight" or "<module>.lora_A.<adapter>.weight" (adapter names without dots).
_PEFT_KEY = re.compile(r"^(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_PEFT_PREFIXES = ("base_model.model.", "unet.", "transformer.")
TRANSFORMER_PREFIX = "transformer."
KOHYA_TRANSFORMER_PREFIX = "lora_transformer_"
_KOHYA_KEY = re.compile(r"^(?P<name>[^.]+)\.(?P<kind>lora_down\.weight|lora_up\.weight|alpha)$")


def kohya_module_name(module_path: str) -> str:
    """``"down_blocks.0.attentions.0.proj_in"`` -> ``"lora_unet_down_blocks_0_attentions_0_proj_in"``."""
    return KOHYA_UNET_PREFIX + module_path.replace(".", "_")


# --------------------------------------------------------------------------------------------------
# writing: peft -> kohya


def _peft_modules(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """UNet module path -> {"A": lora_A, "B": lora_B}; anything but LoRA A/B weights is refused."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    bad: list[str] = []
    adapters: set[str] = set()
    for key, value in state_dict.items():
        plain = next((key[len(p):] for p in _PEFT_PREFIXES if key.startswith(p)), key)
        m = _PEFT_KEY.match(plain)
        if m is None:
            bad.append(key)
            continue
        if m.group("adapter") is not None:
            adapters.add(m.group("adapter"))
        slot = groups.setdefault(m.group("module"), {})
        if m.group("ab") in slot:
            raise ValueError(f"duplicate LoRA weight for module {m.group('module')!r} (key {key!r})")
        slot[m.group("ab")] = value
    if bad:
        raise ValueError(
            f"{len(bad)} key(s) are not peft LoRA weights '<module>.lora_A.weight' / '<module>.lora_B.weight' "
            f"(DoRA magnitudes, biases, embeddings and modules_to_save cannot be stored in kohya format): {bad[:8]}"
        )
    if len(adapters) > 1:
        raise ValueError(f"state dict mixes several adapters {sorted(adapters)}; pass one adapter's weights")
    for module, slot in groups.items():
        missing = {"A", "B"} - set(slot)
        if missing:
            raise ValueError(f"module {module!r} has no lora_{'/'.join(sorted(missing))} weight")
        down, up = slot["A"], slot["B"]
        if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
            raise ValueError(f"module {module!r}: lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} are not a "
                             "Linear / Conv2d LoRA pair of one rank")
    if not groups:
        raise ValueError("no LoRA weights to write (empty state dict)")
    return groups


def peft_to_kohya(
    state_dict: Mapping[str, torch.Tensor],
    scales: Mapping[str, float] | float,
    *,
    dtype: torch.dtype | None = None,
    uniform_alpha: bool = True,
) -> dict[str, torch.Tensor]:
    """Convert a peft LoRA state dict of a diffusers UNet to kohya tensors with diffusers' converter.

    Args:
        state_dict: ``get_peft_model_state_dict(unet, adapter_name=...)`` output (``<module>.lora_A.weight`` /
            ``.lora_B.weight``); keys carrying the adapter name (``...lora_A.<adapter>.weight``) or a leading
            ``unet.`` / ``base_model.model.`` are accepted too.
        scales: each module's peft scale (``up @ down`` is multiplied by it), by module path, or one for all.
        dtype: cast of the up/down weights (e.g. ``torch.float16``); None keeps theirs. ``.alpha`` is float32.
        uniform_alpha: store one alpha (the most common ``scale * rank``) for every module and fold each module's
            ratio into its ``lora_up`` (the product ``up @ down * alpha / rank`` is unchanged); needed for
            diffusers' loader, see the module docstring. False stores each module's own alpha.

    Returns:
        ``{lora_unet_<path>.lora_down.weight, ...lora_up.weight, ...alpha}`` (CPU, contiguous, new tensors).

    Raises:
        ValueError: keys that are not LoRA A/B weights, a missing A or B, inconsistent shapes, a module without
            a scale.
    """
    from diffusers.utils import convert_state_dict_to_kohya

    groups = _peft_modules(state_dict)
    alphas: dict[str, float] = {}
    for module, slot in groups.items():
        scale = scales if isinstance(scales, (int, float)) else scales.get(module)
        if scale is None:
            raise ValueError(f"no LoRA scale given for module {module!r}")
        alphas[module] = float(scale) * int(slot["A"].shape[0])
    common = Counter(alphas.values()).most_common(1)[0][0]
    peft_sd: dict[str, torch.Tensor] = {}
    for module, slot in groups.items():
        up = slot["B"].detach()
        if uniform_alpha and alphas[module] != common:
            up = (up.to(torch.float64) * (alphas[module] / common)).to(up.dtype)
        cast = dtype or slot["A"].dtype
        peft_sd[f"unet.{module}.lora_A.weight"] = slot["A"].detach().to("cpu", cast).contiguous().clone()
        peft_sd[f"unet.{module}.lora_B.weight"] = up.to("cpu", cast).contiguous().clone()
    kohya = convert_state_dict_to_kohya(peft_sd)
    for module in groups:  # diffusers writes alpha = rank (scale 1); store the scale's alpha in float32
        key = kohya_module_name(module) + ".alpha"
        if key not in kohya:
            raise RuntimeError(f"diffusers' kohya conversion named module {module!r} unexpectedly (no {key!r})")
        kohya[key] = torch.tensor(common if uniform_alpha else alphas[module], dtype=torch.float32)
    return kohya


def _layer_scales(network: torch.nn.Module, adapter_name: str, modules: Mapping[str, Any]) -> dict[str, float]:
    """peft scale of ``adapter_name`` in each of ``modules``, read from the LoRA layers themselves."""
    from peft.tuners.lora import LoraLayer

    layers = dict(network.named_modules())
    scales: dict[str, float] = {}
    for module in modules:
        layer = layers.get(module, layers.get("base_model.model." + module))
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.scaling:
            raise ValueError(f"module {module!r} of the state dict has no LoRA adapter {adapter_name!r} on the model")
        r, lora_alpha, scale = int(layer.r[adapter_name]), float(layer.lora_alpha[adapter_name]), float(layer.scaling[adapter_name])
        # lora_alpha / r when that is the scale, so that alpha = scale * rank is lora_alpha exactly
        scales[module] = lora_alpha / r if scale == lora_alpha / r else scale
    return scales


def unet_lora_to_kohya(
    unet: torch.nn.Module,
    adapter_name: str = "default",
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    uniform_alpha: bool = True,
) -> dict[str, torch.Tensor]:
    """Kohya tensors of one peft adapter on ``unet``, each module's scale read from its LoRA layer.

    Reading ``layer.scaling[adapter_name]`` covers rank / alpha patterns and rsLoRA (a scale changed with
    ``set_adapters(..., weights)`` / ``scale_layer`` is exported too).

    Args:
        unet: a module carrying the adapter (``add_lora`` / ``unet.add_adapter`` / a PeftModel).
        adapter_name: the adapter to export.
        state_dict: weights to export in place of the adapter's current ones (e.g. EMA weights), keys as
            ``get_peft_model_state_dict`` gives them or as parameter names (``...lora_A.<adapter>.weight``).
        dtype, uniform_alpha: see :func:`peft_to_kohya`.
    """
    from peft import get_peft_model_state_dict

    if state_dict is None:
        state_dict = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    groups = _peft_modules(state_dict)
    return peft_to_kohya(state_dict, _layer_scales(unet, adapter_name, groups), dtype=dtype,
                         uniform_alpha=uniform_alpha)


def lora_layout(network: torch.nn.Module) -> str:
    """The LoRA file layout for a denoiser: ``"kohya_unet"`` for a diffusers UNet, ``"diffusers_transformer"`` for a
    diffusers transformer (``SD3Transformer2DModel``, ``FluxTransformer2DModel``: any ``...Transformer2DModel``
    with ``transformer_blocks``)."""
    name = type(network).__name__
    if name.endswith("Transformer2DModel") and hasattr(network, "transformer_blocks"):
        return "diffusers_transformer"
    return "kohya_unet"


def base_model_version_of(network: torch.nn.Module) -> str:
    """kohya's ``ss_base_model_version`` for the denoiser a LoRA was trained on: ``"sdxl_base_v1-0"`` for an SDXL
    UNet (``addition_embed_type == "text_time"``), ``"sd3"`` / ``"flux1"`` for the SD3 / Flux transformers, else
    ``"sd_v1"``."""
    name = type(network).__name__
    if name.startswith("SD3"):
        return "sd3"
    if name.startswith("Flux"):
        return "flux1"
    config = getattr(network, "config", None)
    return "sdxl_base_v1-0" if getattr(config, "addition_embed_type", None) == "text_time" else "sd_v1"


def transformer_lora_to_diffusers(
    network: torch.nn.Module,
    adapter_name: str = "default",
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """diffusers-format LoRA tensors of one peft adapter on a transformer (module docstring): for every LoRA'd
    module ``transformer.<path>.lora_A.weight`` and ``transformer.<path>.lora_B.weight`` with the module's peft scale
    (``layer.scaling``: ``lora_alpha / r``, rsLoRA, patterns) multiplied into ``lora_B`` (in float64, then cast);
    no alpha keys.

    Args:
        network: the transformer carrying the adapter.
        adapter_name, state_dict: as :func:`unet_lora_to_kohya`.
        dtype: cast of the weights (None keeps theirs).
    """
    from peft import get_peft_model_state_dict

    if state_dict is None:
        state_dict = get_peft_model_state_dict(network, adapter_name=adapter_name)
    groups = _peft_modules(state_dict)
    scales = _layer_scales(network, adapter_name, groups)
    out: dict[str, torch.Tensor] = {}
    for module, slot in sorted(groups.items()):
        cast = dtype or slot["A"].dtype
        up = slot["B"].detach().to("cpu", torch.float64) * scales[module]
        out[f"{TRANSFORMER_PREFIX}{module}.lora_A.weight"] = slot["A"].detach().to("cpu", cast).contiguous().clone()
        out[f"{TRANSFORMER_PREFIX}{module}.lora_B.weight"] = up.to(cast).contiguous()
    return out


def network_lora_tensors(
    network: torch.nn.Module,
    adapter_name: str = "default",
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The file tensors of adapter ``adapter_name`` in the layout of ``network`` (:func:`lora_layout`): kohya keys
    for a UNet (:func:`unet_lora_to_kohya`), diffusers keys for a transformer (:func:`transformer_lora_to_diffusers`)."""
    if lora_layout(network) == "diffusers_transformer":
        return transformer_lora_to_diffusers(network, adapter_name, state_dict=state_dict, dtype=dtype)
    return unet_lora_to_kohya(network, adapter_name, state_dict=state_dict, dtype=dtype)


def lora_rank_alpha(tensors: Mapping[str, torch.Tensor]) -> tuple[int, float]:
    """The most common rank and alpha of file tensors from :func:`network_lora_tensors` (for kohya metadata):
    kohya files store alphas; diffusers-layout files have the scale folded in, alpha = rank."""
    ranks = [v.shape[0] for k, v in tensors.items() if k.endswith((".lora_down.weight", ".lora_A.weight"))]
    rank = Counter(ranks).most_common(1)[0][0]
    alphas = [float(v) for k, v in tensors.items() if k.endswith(".alpha")]
    return rank, (Counter(alphas).most_common(1)[0][0] if alphas else float(rank))


def save_lora(
    network: torch.nn.Module,
    path: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, Any] | None = None,
    base_model_version: str | None = None,
) -> Path:
    """Write the adapter ``adapter_name`` of ``network`` as a ``.safetensors`` file (atomically): kohya keys for a
    UNet, diffusers keys for an SD3 / Flux transformer (:func:`network_lora_tensors`).

    Args:
        network: the diffusers UNet or transformer carrying the adapter (a backbone's ``network``).
        path: the file to write; its folder is created.
        state_dict, dtype: see :func:`unet_lora_to_kohya`.
        metadata: extra metadata entries (values become strings), added to the kohya ``ss_*`` fields.
        base_model_version: kohya's ``ss_base_model_version`` (``"sd_v1"``, ``"sdxl_base_v1-0"``, ``"sd3"``);
            ``None`` = from the network (:func:`base_model_version_of`).

    Returns:
        The path written.
    """
    tensors = network_lora_tensors(network, adapter_name, state_dict=state_dict, dtype=dtype)
    rank, alpha = lora_rank_alpha(tensors)
    version = base_model_version or base_model_version_of(network)
    meta = kohya_metadata(rank=rank, alpha=alpha, base_model_version=version, extra=metadata)
    return save_lora_safetensors(path, tensors, meta)


# --------------------------------------------------------------------------------------------------
# reading: any SD LoRA file -> a peft adapter, through diffusers


@dataclass
class LoadedLora:
    """What :func:`load_lora` added.

    Attributes:
        adapter_name: the peft adapter's name on every component it reached.
        modules: component (``unet``, ``text_encoder``, ``text_encoder_2``) -> number of LoRA'd modules.
        file_format: ``"kohya"`` (``lora_unet_`` / ``lora_te*_`` keys, either UNet layout), ``"peft"``
            (``lora_A`` / ``lora_B`` keys) or ``"diffusers"`` (other diffusers layouts, passed on as they are).
        skipped: text-encoder keys not loaded (``text_encoders=False``).
    """

    adapter_name: str
    modules: dict[str, int] = field(default_factory=dict)
    file_format: str = ""
    skipped: list[str] = field(default_factory=list)


def read_lora(source: str | os.PathLike[str] | Mapping[str, torch.Tensor]
              ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The tensors of a LoRA and its adapter configuration in diffusers' metadata form, when it has one.

    ``source``: a ``.safetensors`` file, a PEFT adapter folder (``adapter_model.safetensors`` + ``adapter_config.
    json``, as ``PeftModel.save_pretrained`` writes) or a tensor dict. The configuration (``LoraConfig`` fields
    with a component prefix, ``{"unet.r": 4, "unet.lora_alpha": 8, ...}``) comes from an ``adapter_config.json``
    beside the weights (a UNet adapter) or from diffusers' ``lora_adapter_metadata`` entry in the file.
    """
    if isinstance(source, Mapping):
        return dict(source), None
    path = Path(source).expanduser()
    if path.is_dir():
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"LoRA folder {str(path)!r} has no adapter_model.safetensors (a PEFT adapter folder "
                                    "holds adapter_model.safetensors and adapter_config.json)")
        path = weights
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {str(path)!r} does not exist")
    try:
        tensors, file_meta = load_lora_safetensors(path)
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{str(path)!r} is not a readable .safetensors LoRA file: {err}") from err
    config_file = path.parent / "adapter_config.json"
    if config_file.is_file():
        from dataclasses import fields

        from peft import LoraConfig

        names = {f.name for f in fields(LoraConfig)} - {"peft_type", "task_type", "base_model_name_or_path",
                                                        "revision", "inference_mode", "auto_mapping"}
        config = json.loads(config_file.read_text())
        return tensors, {f"unet.{k}": v for k, v in config.items() if k in names}
    raw = file_meta.get("lora_adapter_metadata")
    return tensors, (json.loads(raw) if raw else None)


def _uniform_kohya_alphas(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One alpha for every kohya module, each module's ``alpha / rank`` kept by folding the ratio into lora_up.

    A module without ``.alpha`` has kohya's default alpha = rank (scale 1).
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _KOHYA_KEY.match(key)
        if m is not None:
            groups.setdefault(m.group("name"), {})[m.group("kind")] = value
    alphas = {}
    for name, slot in groups.items():
        if "lora_down.weight" not in slot or "lora_up.weight" not in slot:
            raise ValueError(f"kohya LoRA module {name!r} needs both lora_down.weight and lora_up.weight, "
                             f"has {sorted(slot)}")
        rank = slot["lora_down.weight"].shape[0]
        alphas[name] = float(slot["alpha"].item()) if "alpha" in slot else float(rank)
    if not alphas:
        return tensors
    common = Counter(alphas.values()).most_common(1)[0][0]
    out = dict(tensors)
    for name, alpha in alphas.items():
        if alpha != common:
            up = out[name + ".lora_up.weight"]
            out[name + ".lora_up.weight"] = (up.to(torch.float64) * (alpha / common)).to(up.dtype)
        out[name + ".alpha"] = torch.tensor(common, dtype=torch.float32)
    return out


def _peft_component_prefixes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``base_model.model.<path>`` and bare ``<path>`` PEFT keys -> ``unet.<path>`` (diffusers' component prefix)."""
    out = {}
    for key, value in tensors.items():
        if key.startswith("base_model.model."):
            key = key[len("base_model.model."):]
        if not key.split(".", 1)[0] in COMPONENTS:
            key = "unet." + key
        out[key] = value
    return out


def _one_text_encoder_key_style(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-encoder keys of a converted kohya file in one diffusers style.

    diffusers 0.42 converts kohya attention keys to its old style (``self_attn.to_q_lora.down``) and MLP keys to
    the new one (``mlp.fc1.lora_linear_layer.down``); its text-encoder loader infers one style for the whole dict
    and then drops the attention weights of a file that has both. diffusers' own old -> new mapping puts all of
    them in the new style.
    """
    from diffusers.utils.state_dict_utils import DIFFUSERS_OLD_TO_DIFFUSERS, convert_state_dict

    te = {k: v for k, v in state_dict.items() if k.startswith("text_encoder")}
    if not any("lora_linear_layer" in k for k in te) or not any("_lora." in k for k in te):
        return state_dict
    out = {k: v for k, v in state_dict.items() if not k.startswith("text_encoder")}
    out.update(convert_state_dict(te, DIFFUSERS_OLD_TO_DIFFUSERS))
    return out


def _resolve_target(target: Any) -> tuple[Any, torch.nn.Module, dict[str, torch.nn.Module]]:
    """(pipeline or None, UNet, {component name: module}) of a backbone, a pipeline or a UNet."""
    if hasattr(target, "pipe") and hasattr(target, "network"):  # a StableDiffusionBackbone
        target = target.pipe
    if hasattr(target, "unet") and hasattr(target, "components"):  # a diffusers pipeline
        parts = {name: getattr(target, name, None) for name in COMPONENTS}
        return target, target.unet, {k: v for k, v in parts.items() if isinstance(v, torch.nn.Module)}
    if isinstance(target, torch.nn.Module) and hasattr(target, "load_lora_adapter"):
        return None, target, {"unet": target}
    raise TypeError(f"load_lora needs a StableDiffusionBackbone, a diffusers Stable Diffusion pipeline or a "
                    f"UNet2DConditionModel, got a {type(target).__name__}")


def _transformer_target(target: Any) -> torch.nn.Module | None:
    """The diffusers transformer of a flow backbone, a pipeline with a ``transformer``, or the transformer itself;
    None for UNet models."""
    for candidate in (getattr(target, "network", None), getattr(target, "transformer", None), target):
        if isinstance(candidate, torch.nn.Module) and lora_layout(candidate) == "diffusers_transformer":
            return candidate
    return None


def _kohya_transformer_to_peft(tensors: Mapping[str, torch.Tensor], transformer: torch.nn.Module
                               ) -> dict[str, torch.Tensor]:
    """kohya-style ``lora_transformer_<path with underscores>`` tensors -> ``transformer.<path>.lora_A/B.weight``
    (each module's ``alpha / rank`` folded into lora_B; no alpha = scale 1), the paths resolved against the
    transformer's own module names."""
    names = {KOHYA_TRANSFORMER_PREFIX + path.replace(".", "_"): path for path, _ in transformer.named_modules() if path}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _KOHYA_KEY.match(key)
        if m is None:
            raise ValueError(f"{key!r} is not a kohya LoRA key (<name>.lora_down.weight / .lora_up.weight / .alpha)")
        groups.setdefault(m.group("name"), {})[m.group("kind")] = value
    unknown = sorted(n for n in groups if n not in names)
    if unknown:
        raise ValueError(f"{len(unknown)} kohya LoRA module name(s) match no module of this transformer, e.g. "
                         f"{unknown[:3]}; is the LoRA for another architecture? Nothing was loaded.")
    out: dict[str, torch.Tensor] = {}
    for name, slot in groups.items():
        if "lora_down.weight" not in slot or "lora_up.weight" not in slot:
            raise ValueError(f"kohya LoRA module {name!r} needs both lora_down.weight and lora_up.weight")
        down, up = slot["lora_down.weight"], slot["lora_up.weight"]
        scale = float(slot["alpha"].item()) / down.shape[0] if "alpha" in slot else 1.0
        path = names[name]
        out[f"{TRANSFORMER_PREFIX}{path}.lora_A.weight"] = down
        out[f"{TRANSFORMER_PREFIX}{path}.lora_B.weight"] = (up.to(torch.float64) * scale).to(up.dtype)
    return out


def _load_transformer_lora(transformer: torch.nn.Module, source: Any, adapter_name: str, *,
                           text_encoders: bool) -> LoadedLora:
    """:func:`load_lora` for a flow transformer: diffusers' ``load_lora_adapter`` with prefix ``transformer``."""
    tensors, metadata = read_lora(source)
    if not tensors:
        raise ValueError("the LoRA has no tensors")
    if adapter_name in (getattr(transformer, "peft_config", None) or {}) or _adapter_modules(transformer, adapter_name):
        raise ValueError(f"the transformer already has an adapter named {adapter_name!r}; pick another adapter_name")
    te_prefixes = KOHYA_TE_PREFIXES + ("text_encoder.", "text_encoder_2.", "text_encoder_3.")
    te_keys = sorted(k for k in tensors if k.startswith(te_prefixes))
    if te_keys and text_encoders:
        raise ValueError(f"the LoRA has {len(te_keys)} text-encoder weight(s) (e.g. {te_keys[0]!r}); text-encoder "
                         "LoRAs of flow models are not loaded here: pass text_encoders=False to load the "
                         "transformer part only")
    skip = set(te_keys)
    tensors = {k: v for k, v in tensors.items() if k not in skip}
    if tensors and all(k.startswith(KOHYA_TRANSFORMER_PREFIX) for k in tensors):
        file_format, metadata = "kohya", None
        tensors = _kohya_transformer_to_peft(tensors, transformer)
    elif tensors and all(_PEFT_KEY.match(k) for k in tensors):
        file_format = "peft"
        tensors = {(k if k.startswith(TRANSFORMER_PREFIX) else TRANSFORMER_PREFIX
                    + (k[len("base_model.model."):] if k.startswith("base_model.model.") else k)): v
                   for k, v in tensors.items()}
        if metadata:
            metadata = {(TRANSFORMER_PREFIX + k[len("unet."):] if k.startswith("unet.") else k): v
                        for k, v in metadata.items()}
    else:
        bad = sorted(k for k in tensors if not _PEFT_KEY.match(k))[:3]
        raise ValueError(f"cannot read this LoRA for a transformer: keys such as {bad} are neither diffusers / PEFT "
                         "(<module>.lora_A.weight / .lora_B.weight) nor kohya lora_transformer_ keys")
    expected = sum(k.endswith(".lora_A.weight") for k in tensors)
    try:
        transformer.load_lora_adapter(dict(tensors), prefix="transformer", adapter_name=adapter_name,
                                      metadata=metadata)
    except Exception as err:
        _delete_adapter({"transformer": transformer}, adapter_name)
        if isinstance(err, RuntimeError) and "size mismatch" in str(err):
            raise ValueError(f"the LoRA does not fit this transformer, its weights have other shapes (is it for "
                             f"another architecture?): {_first_error_line(err)}. Nothing was loaded.") from err
        raise
    loaded = _adapter_modules(transformer, adapter_name)
    if loaded != expected:
        _delete_adapter({"transformer": transformer}, adapter_name)
        raise ValueError(f"LoRA weights did not all reach a module ({loaded} of {expected} LoRA'd modules); the file "
                         f"is for another architecture (keys such as {sorted(tensors)[:2]}). Nothing was loaded.")
    return LoadedLora(adapter_name, {"transformer": loaded}, file_format, te_keys)


def _first_error_line(err: BaseException) -> str:
    """The first ``size mismatch`` line of a state-dict loading error (or its first line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    hits = [line for line in lines if "size mismatch" in line]
    return (hits or lines or [type(err).__name__])[0]


def _adapter_modules(module: torch.nn.Module, adapter_name: str) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) and adapter_name in m.lora_A for m in module.modules())


def _lora_modules_in(state_dict: Mapping[str, Any], component: str) -> int:
    """LoRA'd modules of ``component`` in a diffusers-converted state dict (one down / A weight each)."""
    downs = (".lora_A.weight", ".down.weight")
    return sum(k.startswith(component + ".") and k.endswith(downs) for k in state_dict)


def _unet_modules_missed(state_dict: Mapping[str, torch.Tensor], unet: torch.nn.Module, adapter_name: str) -> list[str]:
    """UNet module paths (as diffusers converted the keys) that did not get the adapter."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.tuners.lora import LoraLayer

    part = {k[len("unet."):]: v for k, v in state_dict.items() if k.startswith("unet.")}
    wanted = {k.split(".lora_A")[0] for k in convert_unet_state_dict_to_peft(part) if ".lora_A" in k}
    got = {n for n, m in unet.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A}
    return sorted(wanted - got)


def _delete_adapter(components: Mapping[str, torch.nn.Module], adapter_name: str) -> None:
    """Remove a half-loaded adapter so that a failed load leaves the model as it was.

    The LoRA layers themselves are unwrapped (diffusers' ``recurse_remove_peft_layers``) when no other adapter
    is left on the component.
    """
    from diffusers.utils import recurse_remove_peft_layers
    from peft.tuners.lora import LoraLayer

    for module in components.values():
        others = set()
        for layer in module.modules():
            if isinstance(layer, LoraLayer):
                if adapter_name in layer.lora_A:
                    layer.delete_adapter(adapter_name)
                others |= set(layer.lora_A)
        config = getattr(module, "peft_config", None)
        if isinstance(config, dict):
            config.pop(adapter_name, None)
        if not others and any(isinstance(m, LoraLayer) for m in module.modules()):
            recurse_remove_peft_layers(module)
            if hasattr(module, "peft_config") and not module.peft_config:
                del module.peft_config
            if hasattr(module, "_hf_peft_config_loaded"):
                module._hf_peft_config_loaded = None


def load_lora(
    target: Any,
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    adapter_name: str = "default",
    *,
    text_encoders: bool = True,
) -> LoadedLora:
    """Add a LoRA file to a Stable Diffusion model as the peft adapter ``adapter_name``, through diffusers.

    Reads kohya files (``lora_unet_`` keys in the diffusers UNet layout ``down_blocks_...`` or the LDM layout
    ``input_blocks_...``, text-encoder ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` keys, per-module alphas),
    PEFT files and folders (``<module>.lora_A.weight``, with ``unet.`` / ``base_model.model.`` or no prefix;
    their ``LoraConfig`` from an ``adapter_config.json`` beside them or diffusers' ``lora_adapter_metadata``, else
    diffusers' default for PEFT keys: scale 1 per module) and diffusers' own LoRA files.
    diffusers' ``lora_state_dict`` converts the keys (with the UNet's config, which LDM block numbers need) and
    ``load_lora_into_unet`` / ``load_lora_into_text_encoder`` inject the adapter. The adapter is active after
    loading; choose per call with :func:`rdt_lib.lora.use_adapters` (UNet) -- a text-encoder adapter acts on
    prompt encoding, for base and tuned model alike.

    A flow model (a backbone whose ``network`` is an SD3 / Flux transformer, its pipeline, or the transformer) gets
    the transformer part through diffusers' ``load_lora_adapter`` (keys ``transformer.<path>.lora_A/B.weight``, bare
    or ``base_model.model.`` PEFT keys, or kohya ``lora_transformer_`` keys; see the module docstring); its
    text-encoder weights are not loaded (``text_encoders=False`` skips them, else they are refused).

    Args:
        target: a ``StableDiffusionBackbone``, a diffusers SD / SDXL pipeline, or a ``UNet2DConditionModel``
            (UNet only: a file with text-encoder keys is then refused unless ``text_encoders=False``); or a flow
            backbone / pipeline / transformer.
        source: a ``.safetensors`` file, a PEFT adapter folder, or the tensors.
        adapter_name: the new adapter's name; must not exist yet.
        text_encoders: False loads only the UNet part and lists the text-encoder keys in ``skipped``.

    Returns:
        :class:`LoadedLora` (modules per component).

    Raises:
        ValueError: an unreadable file, keys diffusers cannot convert, text-encoder keys with a UNet-only target,
            an adapter name in use, or weights that matched no module (the partly added adapter is removed).
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    from .backbones.stable_diffusion import detect_sd_kind

    transformer = _transformer_target(target)
    if transformer is not None:
        return _load_transformer_lora(transformer, source, adapter_name, text_encoders=text_encoders)
    pipe, unet, components = _resolve_target(target)
    tensors, metadata = read_lora(source)
    if not tensors:
        raise ValueError("the LoRA has no tensors")
    for name, module in components.items():
        if adapter_name in (getattr(module, "peft_config", None) or {}) or _adapter_modules(module, adapter_name):
            raise ValueError(f"the {name} already has an adapter named {adapter_name!r}; pick another adapter_name")

    if all(k.startswith(KOHYA_PREFIXES) for k in tensors):
        file_format = "kohya"
        metadata = None  # the alphas are in the tensors
        tensors = _uniform_kohya_alphas(tensors)
        te_keys = sorted(k for k in tensors if k.startswith(KOHYA_TE_PREFIXES))
    elif any(_PEFT_KEY.match(k) for k in tensors):
        file_format = "peft"
        tensors = _peft_component_prefixes(tensors)
        te_keys = sorted(k for k in tensors if not k.startswith("unet."))
    else:
        file_format = "diffusers"
        te_keys = sorted(k for k in tensors if k.startswith(("text_encoder.", "text_encoder_2.")))
    skipped: list[str] = []
    if te_keys and (not text_encoders or pipe is None):
        if text_encoders:
            raise ValueError(
                f"the LoRA has {len(te_keys)} text-encoder weight(s) (e.g. {te_keys[0]!r}) but only a UNet was given; "
                "pass the pipeline or backbone to load them too, or text_encoders=False to load the UNet part only"
            )
        skipped = te_keys
        drop = set(te_keys)
        tensors = {k: v for k, v in tensors.items() if k not in drop}

    mixin = StableDiffusionXLLoraLoaderMixin if detect_sd_kind(unet) == "sdxl" else StableDiffusionLoraLoaderMixin
    try:  # (diffusers pops from the dict it is given)
        state_dict, alphas = mixin.lora_state_dict(dict(tensors), unet_config=unet.config)
    except (ValueError, KeyError) as err:
        raise ValueError(f"diffusers could not read this LoRA ({file_format} keys such as {sorted(tensors)[:2]}): "
                         f"{err}") from err
    state_dict = _one_text_encoder_key_style(state_dict)
    expected = {name: _lora_modules_in(state_dict, name) for name in components}
    unknown = [k for k in state_dict if k.split(".", 1)[0] not in components]
    if unknown:
        raise ValueError(f"{len(unknown)} LoRA weight(s) belong to no component of this model "
                         f"({sorted(components)}): {unknown[:5]}")
    try:
        mixin.load_lora_into_unet(state_dict, alphas, unet, adapter_name=adapter_name, metadata=metadata,
                                  _pipeline=pipe)
        for name in ("text_encoder", "text_encoder_2"):
            if expected.get(name):
                mixin.load_lora_into_text_encoder(state_dict, alphas, components[name], prefix=name,
                                                  adapter_name=adapter_name, metadata=metadata, _pipeline=pipe)
    except Exception as err:
        _delete_adapter(components, adapter_name)
        if isinstance(err, RuntimeError) and "size mismatch" in str(err):
            lines = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
            raise ValueError(f"the LoRA does not fit this {detect_sd_kind(unet)} model, its weights have other shapes "
                             f"(is it for another architecture?): {lines[0]}. Nothing was loaded.") from err
        if "not found in the base model" in str(err):
            raise ValueError(f"no LoRA weight matches a module of this {detect_sd_kind(unet)} model (keys such as "
                             f"{sorted(tensors)[:2]}); is it for another architecture? Nothing was loaded.") from err
        raise
    loaded = {name: _adapter_modules(module, adapter_name) for name, module in components.items()}
    short = {name: (loaded[name], n) for name, n in expected.items() if loaded[name] != n}
    if short:
        missed = _unet_modules_missed(state_dict, unet, adapter_name) if "unet" in short else []
        _delete_adapter(components, adapter_name)
        detail = ", ".join(f"{name}: {got} of {want}" for name, (got, want) in short.items())
        raise ValueError(f"LoRA weights did not all reach a module ({detail} LoRA'd modules; no UNet module "
                         f"{missed[:5]}); the file is for another architecture or a layout diffusers does not "
                         f"convert (keys such as {sorted(tensors)[:2]}). Nothing was loaded.")
    return LoadedLora(adapter_name, {k: v for k, v in loaded.items() if v}, file_format, skipped)


# --------------------------------------------------------------------------------------------------
# metadata and files


def kohya_metadata(*, rank: int, alpha: float, base_model_version: str = "sd_v1",
                   extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """kohya-style ``ss_*`` metadata (read by A1111-style tools and model sites) plus ``extra`` as strings.

    Args:
        rank, alpha: network dim and alpha (most common ones when they vary).
        base_model_version: e.g. ``"sd_v1"`` or ``"sdxl_base_v1-0"`` (kohya's spellings).
        extra: further entries; values are converted with ``str`` (pass JSON strings for structures).
    """
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": repr(float(alpha)),
        "ss_base_model_version": base_model_version,
    }
    for key, value in (extra or {}).items():
        meta[str(key)] = value if isinstance(value, str) else str(value)
    return meta


def save_lora_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                          metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` (+ string ``metadata``) to a safetensors file atomically.

    The bytes go to a temporary file in the same directory, which is fsynced and then ``os.replace``d onto
    ``path`` (and the directory fsynced): a crash or a full disk leaves either the old file or the new one,
    never a truncated file. The parent directory is created if needed.

    Raises:
        TypeError: a metadata key or value is not a ``str`` (safetensors metadata is str -> str).
    """
    from safetensors.torch import save as st_save

    meta = dict(metadata or {})
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str; entry {key!r}: {type(value).__name__} {value!r}")
    # clone: safetensors refuses tensors that share storage; LoRA files are small
    data = st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, metadata=meta or None)
    return write_bytes_atomic(path, data)


def load_lora_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file into CPU tensors and its metadata (empty dict when there is none)."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        metadata = dict(fh.metadata() or {})
        for key in fh.keys():
            tensors[key] = fh.get_tensor(key)
    return tensors, metadata
