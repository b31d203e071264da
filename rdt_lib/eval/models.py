"""The sweep's two models and its schedules: the base backbone, the tuned one (a LoRA adapter on the base network
or a second backbone), and the :class:`ModelBranch` pair each schedule samples with."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backbones.base import Backbone
from ..denoisers import ModelBranch
from ..errors import InputError
from ..schedules import Schedule, TunedOnly, parse_schedule
from .cache import model_identity
from .config import EvalConfig

__all__ = ["SweepSchedule", "parse_sweep_schedule", "SweepModels", "tuned_is_lora", "load_models", "ADAPTER"]

ADAPTER = "tuned"


@dataclass(frozen=True)
class SweepSchedule:
    """One row of the sweep: ``name`` as configured, the mixing schedule, the tuned LoRA's strength."""

    name: str
    mix: Schedule
    lora_scale: float = 1.0

    @property
    def uses_tuned(self) -> bool:
        return self.mix.needs_tuned

    @property
    def canonical(self) -> str:
        """A spec that names the same sampling (``lora:0.5`` or the schedule's own ``str``)."""
        return f"lora:{self.lora_scale:g}" if self.name.strip().lower().startswith("lora") else str(self.mix)


def parse_sweep_schedule(spec: str) -> SweepSchedule:
    """A schedule spec of :mod:`rdt_lib.schedules`, or ``lora:S`` (the tuned LoRA alone at strength ``S``)."""
    text = spec.strip().lower()
    if text.startswith(("lora:", "lora@")):
        return SweepSchedule(spec, TunedOnly(), float(text[5:]))
    return SweepSchedule(spec, parse_schedule(text))


def tuned_is_lora(path: str, declared: str = "auto") -> bool:
    """Whether ``tuned.path`` is a LoRA: ``declared`` unless ``auto``; else a PEFT adapter folder or a
    .safetensors file whose keys are LoRA keys (``lora_`` / ``.alpha``) is a LoRA, anything else a model."""
    if declared != "auto":
        return declared == "lora"
    local = Path(path).expanduser()
    if local.is_dir():
        return (local / "adapter_model.safetensors").is_file() and not (local / "model_index.json").is_file()
    if local.is_file() and local.suffix.lower() == ".safetensors":
        from ..backbones.pipelines import checkpoint_keys

        keys = checkpoint_keys(local)
        return bool(keys) and all("lora" in k.lower() or k.endswith(".alpha") for k in keys)
    return False


@dataclass
class SweepModels:
    """The loaded models: ``tuned`` is ``base`` itself for a LoRA (adapter :data:`ADAPTER`), another backbone for
    a full model, ``None`` when no schedule needs it. ``base_id`` / ``tuned_id``: identities for the cache."""

    base: Backbone
    tuned: Backbone | None
    lora: bool
    base_id: str
    tuned_id: str

    def branches(self, schedule: SweepSchedule, config: EvalConfig) -> tuple[ModelBranch, ModelBranch | None]:
        """The base and tuned :class:`ModelBranch` for one schedule (tuned ``None`` for ``base``)."""
        base_cfg = config.model.cfg_scale
        tuned_cfg = config.tuned.cfg_scale if config.tuned.cfg_scale is not None else base_cfg
        base = ModelBranch(self.base, cfg_scale=base_cfg)
        if not schedule.uses_tuned:
            return base, None
        if self.tuned is None:
            raise InputError(f"schedule {schedule.name!r} needs the tuned model: set tuned.path")
        if self.lora:
            return base, ModelBranch(self.tuned, ADAPTER, cfg_scale=tuned_cfg, lora_scale=schedule.lora_scale)
        return base, ModelBranch(self.tuned, cfg_scale=tuned_cfg)


def load_models(config: EvalConfig, *, device: torch.device, dtype: torch.dtype, need_tuned: bool) -> SweepModels:
    """Load the base model and the tuned LoRA or model (a LoRA that does not fit the base model: an
    :class:`InputError` naming the first mismatched key and both shapes, before anything is sampled)."""
    from ..backbones.loading import load_backbone
    from ..lora_io import load_lora

    m, t = config.model, config.tuned
    base = load_backbone(m.path, kind=m.kind, single_file_config=m.single_file_config or None, dtype=dtype,
                         device=device)
    base_id = model_identity(m.path)
    if not need_tuned or not t.path:
        return SweepModels(base, None, False, base_id, "")
    tuned_id = model_identity(t.path)
    if tuned_is_lora(t.path, t.type):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = load_lora(base, t.path, adapter_name=ADAPTER, text_encoders=False)
        except (ValueError, FileNotFoundError) as err:
            raise InputError(f"tuned.path {t.path!r}: {err}") from err
        if loaded.skipped:
            print(f"note: the LoRA's {len(loaded.skipped)} text-encoder weight(s) are not used (the base and tuned "
                  f"models share one text encoder here); only its UNet part is evaluated", flush=True)
        return SweepModels(base, base, True, base_id, tuned_id + "|lora")
    tuned = load_backbone(t.path, kind=t.kind, single_file_config=m.single_file_config or None, dtype=dtype,
                          device=device)
    if tuple(tuned.latent_shape(16, 16)) != tuple(base.latent_shape(16, 16)):
        raise InputError(f"tuned model {t.path!r} has another latent format than the base model "
                         f"({tuned.latent_shape(16, 16)} vs {base.latent_shape(16, 16)} for a 16 px image); both "
                         "models must share one")
    return SweepModels(base, tuned, False, base_id, tuned_id + "|model:" + json.dumps(t.kind))
