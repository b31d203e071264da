"""The evaluation sweep's settings, each declared once (the same machinery as the trainer's: :mod:`rdt_lib.settings`).

Files (TOML / YAML, several merged in order), presets by name (``rdt_lib/presets/eval/<name>.toml``),
``--set section.key=value`` overrides, ``--help`` listing every key; :data:`SCHEMA` holds them. The cross checks
(:func:`_cross_checks`) refuse, before anything is loaded or sampled, unknown schedule and reward names, seeds
that do not match ``prompts.images_per_prompt``, a LoRA-scale schedule without a LoRA, and missing local paths.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional, Sequence

from pydantic import Field

from ..settings import (ConfigError, S, Section, SettingsSchema, looks_local, model_kinds, not_one_of, reward_names,
                        sampler_names, scheduler_names)

__all__ = ["ConfigError", "EvalConfig", "SCHEMA", "DEFAULT_SCHEDULES", "load_config", "format_help", "to_toml", "list_presets",
           "PRESET_DIR", "model_kinds", "reward_names", "sampler_names", "scheduler_names"]

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets" / "eval"

DEFAULT_SCHEDULES: tuple[str, ...] = ("base", "tuned", "switch@0.5", "switch@0.75", "linear", "power:2", "power:4",
                                      "lora:0.5", "lora:0.75")
"""The schedules swept by default: both models alone, combined generation at half and three quarters of the
steps, AIG (linear, power 2 and 4), and the "LoRA scaling" baseline (the tuned LoRA at strength 0.5 and 0.75)."""


class RunSection(Section):
    """[run]: where the results go and what runs the sweep."""

    output_dir: str = S("outputs/rdt-eval", "run directory: results.csv / .json, pareto.png, grids/, report.html, "
                                            "and cache/ (generated images, reused by later runs)")
    device: str = S("auto", "auto (cuda when available, else cpu; under accelerate each process's own device), "
                            "cpu, cuda or cuda:N")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = S(
        "auto", "weights' dtype of the models: auto = fp16 (bf16 where supported) on a GPU, fp32 on the CPU")
    batch_size: int = S(4, "images per sampler call (a batch never mixes schedules)", ge=1)
    progress_bar: bool = S(True, "show a progress bar over the whole sweep (images done / total, ETA)")


class BaseModelSection(Section):
    """[model]: the base model."""

    path: str = S("", "diffusers directory, single-file checkpoint (.safetensors) or Hugging Face hub id")
    kind: str = S("auto", "architecture, or auto (detected from the weights)", names="model_kinds")
    single_file_config: str = S("", "single-file checkpoints (base, and a full tuned model): a local diffusers "
                                    "directory of the same architecture to take component configs and tokenizers "
                                    "from ('' = fetch them from the hub)")
    cfg_scale: Optional[float] = S(None, "classifier-free guidance scale of the base model (<= 1 = none); unset = "
                                         "the model's default (7.5 SD1.5, 5 SDXL, 7 SD3, 1 Flux: its guidance is a "
                                         "network input)", ge=0)


class TunedModelSection(Section):
    """[tuned]: the reward-tuned model: a LoRA on the base model, or a full model."""

    path: str = S("", "LoRA file (.safetensors: kohya with diffusers- or LDM-style keys, PEFT, diffusers, rdt's own) "
                      "or PEFT adapter folder; or a full model (diffusers directory, single file, hub id: its UNet "
                      "and text encoders denoise, the base model's VAE decodes)")
    type: Literal["auto", "lora", "model"] = S(
        "auto", "what path holds: lora, model, or auto (a diffusers directory / model_index.json or a file with "
                "UNet weights = model; other .safetensors files and adapter folders = lora)")
    kind: str = S("auto", "architecture of a full tuned model", names="model_kinds")
    cfg_scale: Optional[float] = S(None, "classifier-free guidance scale of the tuned model; unset = the base "
                                         "model's cfg_scale (ImageReFL runs the tuned model without CFG: 1)", ge=0)


class PromptsSection(Section):
    """[prompts]: the prompt set and the images per prompt."""

    source: str = S("default", "'default' (the prompt set shipped with rdt), a .txt (one per line) / .json / .csv "
                               "file, a known dataset name (hpdv2, parti, drawbench) or hf:<dataset id> (needs "
                               "the datasets package)")
    text: list[str] = S([], "prompts given inline; when not empty they replace source")
    limit: int = S(0, "use only the first N prompts (0 = all)", ge=0)
    column: str = S("", "column of a .csv file or dataset ('' = prompt / Prompt / Prompts / caption / text)")
    split: str = S("", "split of a Hugging Face dataset ('' = the dataset's usual test split)")
    images_per_prompt: int = S(5, "images per prompt, one per seed; diversity compares them, so at least 2", ge=1)
    seeds: list[int] = S([], "the seeds, one per image of a prompt ([] = 0 .. images_per_prompt - 1); every prompt "
                             "and schedule uses the same seeds")


class SamplingSection(Section):
    """[sampling]: how every image is sampled (the same for every schedule)."""

    sampler: str = S("ddim", "step rule", names="samplers")
    scheduler: str = S("normal", "sigma list (or a legacy combined name such as dpmpp_2m_karras)",
                       names="schedulers")
    steps: int = S(25, "sampling steps", ge=1)
    resolution: int = S(0, "image size in pixels (a multiple of 8; SD3 and Flux: of 16); 0 = native (512 SD1.5, "
                           "1024 SDXL, SD3 and Flux)", ge=0)
    negative_prompt: str = S("", "negative prompt for classifier-free guidance")
    eta: Optional[float] = S(None, "noise of the stochastic samplers (unset = their default)", ge=0)


class SchedulesSection(Section):
    """[schedules]: what is swept."""

    names: list[str] = S(list(DEFAULT_SCHEDULES), help=(
        "one row each: base, tuned, switch:K, switch@F, linear, power:P, cosine, keyframes:..., and lora:S (the "
        "tuned LoRA alone at strength S, the 'LoRA scaling' baseline)"))


class EvalRewardSection(Section):
    """[[rewards]]: one reward model scored on every image."""

    name: str = S("", "reward name (required)", names="rewards")
    path: str = S("", "local weights file/directory or hub id; '' = the reward's default source")


class MetricsSection(Section):
    """[metrics]: diversity and coverage measures."""

    embedder: str = S("facebook/dino-vits16", "DINO ViT (transformers ViTModel) whose CLS embeddings the diversity, "
                                              "Vendi and spectral metrics use: hub id or local directory")
    diversity: bool = S(True, "1 - mean pairwise cosine of the embeddings within each prompt's images, mean over "
                              "prompts (ImageReFL)")
    vendi: bool = S(True, "Vendi score of each prompt's images (cosine kernel), mean over prompts")
    spectral: bool = S(True, "spectral distance (and its log10 variant) of each schedule's embeddings to the base "
                             "schedule's (AIG); needs 'base' among the schedules")
    batch_size: int = S(16, "images per reward / embedder call", ge=1)


class ReportSection(Section):
    """[report]: the image grids and the report page."""

    grid_prompts: int = S(4, "prompts shown per schedule grid (rows; columns = seeds)", ge=1)
    title: str = S("", "title of the plot and the report page ('' = the models' names)")


class EvalConfig(Section):
    """The whole evaluation sweep configuration."""

    run: RunSection = Field(default_factory=RunSection)
    model: BaseModelSection = Field(default_factory=BaseModelSection)
    tuned: TunedModelSection = Field(default_factory=TunedModelSection)
    prompts: PromptsSection = Field(default_factory=PromptsSection)
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    schedules: SchedulesSection = Field(default_factory=SchedulesSection)
    rewards: list[EvalRewardSection] = Field(default_factory=lambda: [EvalRewardSection(name="pickscore")],
                                             description="reward models, as [[rewards]] tables")
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    report: ReportSection = Field(default_factory=ReportSection)


_SYNONYMS = {
    "num_inference_steps": "sampling.steps", "guidance_scale": "model.cfg_scale", "lora": "tuned.path",
    "lora_path": "tuned.path", "pretrained_model_name_or_path": "model.path", "num_images_per_prompt":
    "prompts.images_per_prompt", "prompt_file": "prompts.source", "prompts_file": "prompts.source",
    "output": "run.output_dir", "seed": "prompts.seeds",
}


def _check_schedule(spec: str) -> str | None:
    """The problem with one schedule name, or None."""
    from ..schedules import parse_schedule

    text = spec.strip().lower()
    if text.startswith(("lora:", "lora@")):
        try:
            scale = float(text[5:])
        except ValueError:
            return f"bad schedule {spec!r}: lora:S needs a number S (the LoRA strength), e.g. lora:0.5"
        return None if scale >= 0 else f"bad schedule {spec!r}: the LoRA strength must be >= 0"
    try:
        parse_schedule(text)
    except ValueError as err:
        return f"{err}, or lora:S (the tuned LoRA alone at strength S >= 0)"
    return None


def _cross_checks(c: EvalConfig, check_inputs: bool = True) -> list[str]:
    errors: list[str] = []
    err = errors.append
    if not c.run.output_dir:
        err("run.output_dir is empty")
    if c.sampling.resolution % 8:
        err(f"sampling.resolution must be 0 (native) or a multiple of 8, got {c.sampling.resolution}")
    for key, value, names in (("model.kind", c.model.kind, model_kinds()), ("tuned.kind", c.tuned.kind, model_kinds()),
                              ("sampling.sampler", c.sampling.sampler, sampler_names()),
                              ("sampling.scheduler", c.sampling.scheduler, scheduler_names())):
        if value not in names:
            err(not_one_of(key, value, names))
    names = [n.strip().lower() for n in c.schedules.names]
    if not names:
        err("schedules.names is empty; the default is " + ", ".join(DEFAULT_SCHEDULES))
    for i, spec in enumerate(c.schedules.names):
        problem = _check_schedule(spec)
        if problem:
            err(f"schedules.names.{i}: {problem}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        err(f"schedules.names lists {', '.join(map(repr, dupes))} more than once")
    if c.tuned.type == "model" and any(n.startswith(("lora:", "lora@")) for n in names):
        err("schedules.names has lora:S schedules (the LoRA scaling baseline), which need a LoRA; tuned.type is "
            "'model': remove them or give a LoRA file")
    if c.metrics.spectral and "base" not in names:
        err("metrics.spectral compares each schedule with the base model's images: add 'base' to schedules.names "
            "or set metrics.spectral = false")
    rewards_ok = reward_names()
    if not c.rewards:
        err(f"no rewards configured; add a [[rewards]] table with name = one of {', '.join(rewards_ok)}")
    for i, r in enumerate(c.rewards):
        if not r.name:
            err(f"rewards.{i}.name is missing; accepted: {', '.join(rewards_ok)}")
        elif r.name.strip().lower() not in rewards_ok:
            err(not_one_of(f"rewards.{i}.name", r.name, rewards_ok, "unknown reward {!r}; accepted:"))
    p = c.prompts
    if p.images_per_prompt < 2:
        err(f"prompts.images_per_prompt = {p.images_per_prompt}: diversity compares the images of one prompt with "
            "each other, so it needs at least 2 per prompt (ImageReFL uses 5)")
    if p.seeds:
        if len(p.seeds) != p.images_per_prompt:
            err(f"prompts.seeds has {len(p.seeds)} seeds but prompts.images_per_prompt = {p.images_per_prompt}; "
                f"give one seed per image or leave seeds = []")
        if len(set(p.seeds)) != len(p.seeds):
            err(f"prompts.seeds repeats a seed ({p.seeds}): repeated seeds give identical images")
    if not check_inputs:
        return errors
    if not c.model.path:
        err("model.path is empty: give a diffusers directory, a .safetensors checkpoint or a hub id")
    elif looks_local(c.model.path) and not Path(c.model.path).expanduser().exists():
        err(f"model.path {c.model.path!r} does not exist")
    needs_tuned = any(n != "base" for n in names)
    if not c.tuned.path and needs_tuned:
        err("tuned.path is empty: give the reward-tuned LoRA file or model (or sweep only 'base')")
    elif c.tuned.path and looks_local(c.tuned.path) and not Path(c.tuned.path).expanduser().exists():
        err(f"tuned.path {c.tuned.path!r} does not exist")
    for i, r in enumerate(c.rewards):
        if r.path and looks_local(r.path) and not Path(r.path).expanduser().exists():
            err(f"rewards.{i}.path {r.path!r} does not exist")
    if c.model.single_file_config and not Path(c.model.single_file_config).expanduser().is_dir():
        err(f"model.single_file_config {c.model.single_file_config!r} is not a directory")
    return errors


SCHEMA = SettingsSchema(
    EvalConfig, preset_dir=PRESET_DIR, cross_checks=_cross_checks, synonyms=_SYNONYMS,
    program="python -m rdt_lib.eval", title="rdt evaluation sweep configuration",
    list_defaults={"rewards": "one pickscore reward"},
)


def load_config(paths: Sequence[str | os.PathLike[str]] = (), overrides: Sequence[str] = (), *,
                check_inputs: bool = True, validate: bool = True) -> EvalConfig:
    """Load, merge, override and check an evaluation configuration (see :meth:`SettingsSchema.load_config`);
    ``check_inputs`` also checks that the local model, LoRA and reward paths exist."""
    return SCHEMA.load_config(paths, overrides, validate=validate, check_inputs=check_inputs)


def format_help() -> str:
    """Every key with its default, type, range, accepted names and help (``--help``)."""
    return SCHEMA.format_help()


def to_toml(config: EvalConfig, *, comments: bool = True) -> str:
    return SCHEMA.to_toml(config, comments=comments)


def list_presets() -> list[str]:
    return SCHEMA.list_presets()

