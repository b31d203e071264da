"""The reward trainer's settings, each declared once (pydantic field: type, default, range, accepted names, help).

The declarations feed the TOML / YAML files, ``--set``, ``--help`` (:func:`format_help`), the presets, the error
messages and user interfaces (:func:`setting_spec`). :func:`load_config` reads files or preset names (each file's
keys and types checked alone, so errors name the file), merges them in order (tables key by key, lists replaced),
applies ``"section.key=value"`` overrides (TOML literals; text for string keys; ``rewards.0.weight=2``, index
``len(rewards)`` appends a reward), checks types strictly (ints accepted for numbers), ranges and cross-field
constraints, and reports every problem at once as a :class:`ConfigError`.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal, Mapping, NamedTuple, Optional, Sequence, Union

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "ConfigError", "OBJECTIVES", "PRESET_DIR", "SettingSpec", "TrainConfig", "RewardConfig",
    "scheduler_names", "reward_names", "setting_spec", "setting_specs", "all_keys",
    "load_config", "config_from_dict", "config_to_dict", "parse_override", "apply_overrides", "validate_config",
    "format_help", "to_toml", "config_hash", "list_presets", "preset_path",
]

OBJECTIVES: tuple[str, ...] = ("draft", "draft-lv", "refl", "imagerefl")
"""Accepted ``run.objective`` values (DRaFT+ is ``draft`` with ``regularizers.kl_coeff > 0``)."""

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


def scheduler_names() -> tuple[str, ...]:
    """The training sampler names (the sampling registry's; the one line to change when it moves)."""
    from ..sampling import SCHEDULERS

    return tuple(SCHEDULERS)


def reward_names() -> tuple[str, ...]:
    """The reward names of the reward registry (:func:`rdt_lib.rewards.available`)."""
    from ..rewards import available

    return tuple(available())


_NAME_LISTS: dict[str, Callable[[], tuple[str, ...]]] = {"schedulers": scheduler_names, "rewards": reward_names}


class ConfigError(ValueError):
    """A configuration problem: unknown key, wrong type, invalid value or inconsistent settings."""


def S(default: Any = None, help: str = "", *, names: str | None = None, factory: Callable[[], Any] | None = None,
      **limits: float) -> Any:
    """One setting: default (or ``factory``), help line, range limits (ge, gt, le, lt), registry of accepted names."""
    extra = {"names": names} if names else None
    if factory is not None:
        return Field(default_factory=factory, description=help, json_schema_extra=extra, **limits)
    return Field(default, description=help, json_schema_extra=extra, **limits)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class RunConfig(Section):
    """[run]: what to train and for how long."""

    objective: Literal[OBJECTIVES] = S(
        "draft", "training objective: draft (DRaFT-K; DRaFT+ with regularizers.kl_coeff > 0), draft-lv, refl or "
        "imagerefl")
    max_steps: int = S(4000, "optimizer steps to train (each = optim.grad_accum micro-batches per process)", ge=1)
    seed: int = S(0, "global seed: prompt order, noise, LoRA init; resuming with the same seed reproduces a run")
    output_dir: str = S("outputs/rdt-lora", "run directory: final LoRA, resolved config, checkpoints, logs")
    output_name: str = S("lora", "file stem of the final LoRA: <output_dir>/<output_name>.safetensors")
    resume: str = S("", "'' = start fresh, 'latest' = newest complete checkpoint in output_dir, or a checkpoint dir")
    max_nonfinite_steps: int = S(5, "stop with an error after this many consecutive NaN/inf losses (each such step "
                                    "is skipped with a warning)", ge=1)


class ModelConfig(Section):
    """[model]: the base model."""

    path: str = S("", "diffusers directory, single-file checkpoint (.safetensors, e.g. from ComfyUI "
                      "models/checkpoints) or Hugging Face hub id")
    kind: Literal["auto", "sd15", "sdxl", "sd3", "flux"] = S(
        "auto", "architecture: sd15, sdxl, sd3 (SD3 / SD3.5, rectified flow), flux (FLUX.1, rectified flow, "
        "guidance-distilled), or auto (detected from the weights)")
    resolution: int = S(0, "training image size in pixels (a multiple of 8; SD3: of 16); 0 = native (512 SD1.5, "
                           "1024 SDXL and SD3)", ge=0)
    single_file_config: str = S("", "single-file checkpoints: a local diffusers directory of the same architecture "
                                    "to take component configs and tokenizers from ('' = fetch them from the hub)")


class LoraSection(Section):
    """[lora]: the trained peft LoRA on the denoiser (UNet or transformer)."""

    rank: int = S(32, "LoRA rank r", ge=1)
    alpha: float = S(32.0, "LoRA alpha; the update is scaled by alpha / rank (kohya files store alpha per module)",
                     gt=0)
    target_modules: list[str] = S([], "module name suffixes that get a LoRA; [] = the model's attention "
                                      "projections (UNet: to_q, to_k, to_v, to_out.0; SD3 transformer: also the "
                                      "text-stream add_q_proj, add_k_proj, add_v_proj, to_add_out)")
    dropout: float = S(0.0, "LoRA dropout probability", ge=0, lt=1)
    init: Literal["gaussian", "kaiming"] = S("gaussian", "LoRA init: gaussian (A ~ N(0, 1/r)) or kaiming "
                                                         "(A kaiming-uniform); B starts at 0")


class ObjectiveConfig(Section):
    """[objective]: parameters of the training objectives (each uses the ones it names)."""

    num_steps: int = S(25, "sampling steps of a training trajectory (DRaFT: 25 DDIM steps; ReFL/ImageReFL: 40)", ge=1)
    k: Union[Annotated[int, Field(ge=1)], Literal["all"]] = S(
        1, "draft: steps with gradient at the end of the trajectory, 1..num_steps, or \"all\"")
    lv_n: int = S(2, "draft-lv: re-noised copies of each no-grad sample, one gradient step each", ge=1)
    refl_stop_range: list[int] = S([30, 39], "refl/imagerefl: [first, last] step index (of num_steps, inclusive) "
                                             "at which the gradient step is taken, drawn uniformly")
    imagerefl_start_step: int = S(30, "imagerefl: step index the real image latent is noised to "
                                      "(<= refl_stop_range[0])", ge=0)
    diffusion_loss_weight: float = S(0.01, "imagerefl: weight of the noise-prediction MSE on the noised real latent",
                                     ge=0)
    plain_refl_every: int = S(0, "imagerefl: every N-th step is a plain ReFL step from noise (0 = never)", ge=0)
    loss_scale: float = S(1.0, "multiplies the total loss (ReFL / ImageReFL use 0.001)", gt=0)
    reward_loss: Literal["negative", "hinge"] = S("negative", "reward term: negative (-reward) or hinge "
                                                              "(relu(hinge_margin - reward), ImageReward's ReFL loss)")
    hinge_margin: float = S(2.0, "margin of the hinge reward loss")
    intermediate_weight: float = S(0.0, "draft: R0+ intermediate supervision: weight of the reward on the x0 "
                                        "prediction at a step drawn from [0, num_steps - 2], earlier steps without "
                                        "gradient (0 = off)", ge=0)


class RewardConfig(Section):
    """[[rewards]]: one reward model; the objective maximises sum(weight * scale * (reward + offset))."""

    name: str = S("", "reward name (required)", names="rewards")
    weight: float = S(1.0, "weight of this reward in the sum")
    scale: float = S(1.0, "reward normalisation scale (ImageReFL: PickScore 0.1, ImageReward 1.0333, HPS 1)")
    offset: float = S(0.0, "reward normalisation offset, added before scaling (ImageReFL: PickScore -20, "
                           "ImageReward -0.167, HPS 0)")
    path: str = S("", "local weights file/directory or hub id; '' = the reward's default source")


class RegularizerConfig(Section):
    """[regularizers]: terms that combine with any objective."""

    kl_coeff: float = S(0.0, "DRaFT+ KL: kl_coeff * mean((out_tuned - out_base)^2) over the gradient steps, out = "
                             "the network output (eps, v, or a flow model's velocity)", ge=0)
    l2_init_coeff: float = S(0.0, "R0: coeff * sum of squared differences of the trainable weights from their "
                                  "initial values", ge=0)
    random_eta_range: list[float] = S([], "R0: [low, high] range of an eta drawn per sampling step (SD: DDIM's; "
                                          "flow models: the rectified-flow ancestral step's); [] = off, use "
                                          "sampling.eta")
    per_reward_grad_norm: bool = S(False, "R0: normalise each reward's gradient by its own norm before summing")


class OptimConfig(Section):
    """[optim]: optimisation."""

    lr: float = S(2.5e-4, "peak AdamW learning rate", gt=0)
    weight_decay: float = S(0.005, "AdamW weight decay", ge=0)
    betas: list[float] = S([0.9, 0.999], "AdamW betas [beta1, beta2], each in [0, 1)")
    eps: float = S(1e-8, "AdamW epsilon", gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = S("constant", "learning-rate schedule after warm-up")
    warmup_steps: int = S(0, "optimizer steps of linear warm-up from 0 to lr", ge=0)
    grad_clip: float = S(10.0, "max global gradient norm (0 = no clipping)", ge=0)
    grad_accum: int = S(1, "micro-batches per optimizer step", ge=1)
    batch_size: int = S(1, "prompts per micro-batch per process (global batch = batch_size * grad_accum * "
                           "processes)", ge=1)
    ema_decay: float = S(0.0, "EMA decay of the LoRA weights (0 = off; DRaFT+ uses 0.9999)", ge=0, lt=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = S("no", "autocast precision")
    gradient_checkpointing: bool = S(False, "recompute UNet activations in the backward pass to save memory")


class DataConfig(Section):
    """[data]: prompts and the ImageReFL image dataset."""

    prompts: list[str] = S([], "training prompts given inline (added to prompts_file)")
    prompts_file: str = S("", "text file with one prompt per line ('#' lines and blank lines skipped), "
                              "or a .json list of strings")
    dataset: str = S("", "imagerefl: folder of images with same-stem .txt captions, or a Hugging Face dataset "
                         "name ('hf:' prefix forces the hub)")
    dataset_split: str = S("train", "split of a Hugging Face dataset")
    image_column: str = S("image", "image column of a Hugging Face dataset")
    caption_column: str = S("caption", "caption column of a Hugging Face dataset")


class SamplingConfig(Section):
    """[sampling]: how training trajectories are sampled."""

    scheduler: str = S("auto", "sampler of the training trajectory; auto = the model family's (SD: DDIM on its "
                               "uniform timesteps; flow: Euler on the SD3 pipeline's sigmas, its ancestral step "
                               "when an eta is set)", names="schedulers")
    cfg_scale: Optional[float] = S(None, "classifier-free guidance scale (<= 1 = no guidance); unset = the model's "
                                         "own default (7.5 SD1.5, 5 SDXL, 7 SD3)", ge=0)
    eta: float = S(0.0, "eta of the trajectory's stochastic sampler (0 = deterministic; SD: DDIM's eta; flow: the "
                        "rectified-flow ancestral step's)", ge=0, le=1)
    negative_prompt: str = S("", "negative prompt for classifier-free guidance")


class ValidationConfig(Section):
    """[validation]: a fixed image grid logged during training."""

    every: int = S(0, "optimizer steps between validation grids (0 = off)", ge=0)
    prompts: list[str] = S([], "validation prompts ([] = the first 4 training prompts)")
    seeds: list[int] = S([0, 1], "noise seeds; the grid is prompts x seeds")
    num_steps: int = S(25, "sampling steps of the validation images", ge=1)


class LoggingConfig(Section):
    """[logging]: progress and metrics."""

    tensorboard: bool = S(True, "write TensorBoard scalars (loss, rewards, KL, grad norm, lr) and images")
    log_every: int = S(1, "optimizer steps between scalar logs", ge=1)
    progress_bar: bool = S(True, "show a tqdm progress bar with loss and reward")


class CheckpointConfig(Section):
    """[checkpoint]: crash-safe training checkpoints."""

    every: int = S(500, "optimizer steps between checkpoints (0 = only at the end and on Ctrl-C)", ge=0)
    keep_last: int = S(3, "complete checkpoints to keep", ge=1)
    save_on_interrupt: bool = S(True, "write a checkpoint when interrupted with Ctrl-C / SIGTERM")
    lora_dtype: Literal["fp32", "fp16", "bf16"] = S("fp32", "dtype of the final LoRA file's weights")


class TrainConfig(Section):
    """The whole trainer configuration."""

    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSection = Field(default_factory=LoraSection)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    rewards: list[RewardConfig] = Field(default_factory=lambda: [RewardConfig(name="pickscore")],
                                        description="reward models, as [[rewards]] tables")
    regularizers: RegularizerConfig = Field(default_factory=RegularizerConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)


SECTIONS: dict[str, type[Section]] = {name: (RewardConfig if name == "rewards" else f.annotation)
                                      for name, f in TrainConfig.model_fields.items()}

# ------------------------------------------------------------------------------------------------------------
# reading the declarations back


class SettingSpec(NamedTuple):
    """One setting as declared: ``type`` is int, float, bool, str or list (``annotation`` is the full type)."""

    key: str
    type: type
    default: Any
    ge: float | None
    gt: float | None
    le: float | None
    lt: float | None
    choices: tuple[str, ...] | None
    help: str
    annotation: Any


def _arms(tp: Any) -> list[Any]:
    """The parts of a type: Union/Optional arms, Annotated base types, Literal kept whole."""
    origin = typing.get_origin(tp)
    if origin is Union:
        return [a for arm in typing.get_args(tp) if arm is not type(None) for a in _arms(arm)]
    if origin is Annotated:
        return _arms(typing.get_args(tp)[0])
    return [tp]


def _limits(field: Any) -> dict[str, float]:
    found: dict[str, float] = {}
    metas = list(field.metadata)
    for arm in typing.get_args(field.annotation):  # constraints on a Union arm: Annotated[int, Field(ge=1)]
        if typing.get_origin(arm) is Annotated:
            metas += [m for info in typing.get_args(arm)[1:] for m in getattr(info, "metadata", [info])]
    for m in metas:
        for name in ("ge", "gt", "le", "lt"):
            if getattr(m, name, None) is not None:
                found[name] = getattr(m, name)
    return found


def setting_spec(key: str) -> SettingSpec:
    """The declaration of one setting, e.g. ``setting_spec("optim.lr")`` (rewards as ``rewards.0.weight``)."""
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "rewards" and (parts[1].isdigit() or parts[1] == "N"):
        parts = ["rewards", parts[2]]
    section, field = SECTIONS.get(parts[0]), None
    if section is not None and len(parts) == 2:
        field = section.model_fields.get(parts[1])
    if field is None:
        prefix = ".".join(key.split(".")[:-1]) or None
        raise ConfigError(f"unknown key {key!r}{_suggest(parts[0] if section else None, parts[-1], prefix)}")
    arms = _arms(field.annotation)
    literals = tuple(v for a in arms if typing.get_origin(a) is Literal for v in typing.get_args(a))
    extra = field.json_schema_extra or {}
    pure_literal = typing.get_origin(field.annotation) is Literal
    choices = _NAME_LISTS[extra["names"]]() if "names" in extra else (literals if pure_literal else None)
    base = str if pure_literal else (typing.get_origin(arms[0]) or arms[0])
    name = f"rewards.N.{parts[1]}" if parts[0] == "rewards" else f"{parts[0]}.{parts[1]}"
    return SettingSpec(name, base, field.get_default(call_default_factory=True),
                       *[_limits(field).get(n) for n in ("ge", "gt", "le", "lt")], choices,
                       field.description or "", field.annotation)


def setting_specs() -> list[SettingSpec]:
    """Every setting's declaration, section by section (reward fields once, as ``rewards.N.<field>``)."""
    return [setting_spec(f"{s}.{f}") for s, cls in SECTIONS.items() for f in cls.model_fields]


def all_keys() -> list[str]:
    """Every dotted key, e.g. ``optim.lr``; reward fields as ``rewards.N.name``."""
    return [f"{s}.N.{f}" if s == "rewards" else f"{s}.{f}" for s, cls in SECTIONS.items() for f in cls.model_fields]


def _range_text(spec: SettingSpec) -> str:
    lo = f"[{spec.ge:g}" if spec.ge is not None else f"({spec.gt:g}" if spec.gt is not None else None
    hi = f"{spec.le:g}]" if spec.le is not None else f"{spec.lt:g})" if spec.lt is not None else None
    if lo and hi:
        return f"in {lo}, {hi}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1:]}"
    if hi:
        return f"{'<=' if hi[-1] == ']' else '<'} {hi[:-1]}"
    return ""


def _type_name(tp: Any) -> str:
    arms = _arms(tp)
    words = []
    for a in arms:
        if typing.get_origin(a) is Literal:
            words.append("string" if len(arms) == 1 else " or ".join(json.dumps(v) for v in typing.get_args(a)))
        elif typing.get_origin(a) is list:
            elem = typing.get_args(a)[0]
            words.append("list of tables" if isinstance(elem, type) and issubclass(elem, BaseModel)
                         else f"list of {_type_name(elem)}s")
        else:
            words.append({bool: "boolean (true/false)", int: "integer", float: "number", str: "string"}.get(a, str(a)))
    return " or ".join(words)


# ------------------------------------------------------------------------------------------------------------
# error messages

# Names other trainers use for the same settings (diffusers scripts, kohya) -> our key.
_SYNONYMS = {
    "learning_rate": "optim.lr", "lr_warmup_steps": "optim.warmup_steps", "max_grad_norm": "optim.grad_clip",
    "gradient_accumulation_steps": "optim.grad_accum", "train_batch_size": "optim.batch_size",
    "adam_weight_decay": "optim.weight_decay", "ema": "optim.ema_decay", "guidance_scale": "sampling.cfg_scale",
    "num_inference_steps": "objective.num_steps", "max_train_steps": "run.max_steps", "network_dim": "lora.rank",
    "network_alpha": "lora.alpha", "lora_rank": "lora.rank", "lora_alpha": "lora.alpha",
    "pretrained_model_name_or_path": "model.path", "checkpointing_steps": "checkpoint.every",
    "checkpoints_total_limit": "checkpoint.keep_last",
}


def _suggest(section: str | None, name: str, prefix: str | None = None) -> str:
    """'; did you mean ...?' for an unknown key ``name`` of ``section`` (None = top level) written as
    ``prefix.name`` (default prefix: the section)."""
    valid = list(SECTIONS[section].model_fields) if section else list(SECTIONS)
    prefix = prefix or section
    join = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
    everything = [k.replace(".N.", ".0.") for k in all_keys()]
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    elsewhere = [k for k in everything if k.rsplit(".", 1)[-1] == name]
    anywhere = difflib.get_close_matches(join(name), everything, n=1, cutoff=0.6)
    hint = (join(close[0]) if close else _SYNONYMS.get(name) or (elsewhere or anywhere or [None])[0])
    return f"; did you mean {hint!r}?" if hint else f"; valid keys here: {', '.join(valid)}"


def _not_one_of(key: str, value: Any, accepted: Sequence[str], what: str = "{!r} is not one of") -> str:
    close = difflib.get_close_matches(str(value), list(accepted), n=1, cutoff=0.5)
    return (f"{key}: {what.format(value)} {', '.join(accepted)}"
            + (f" (did you mean {close[0]!r}?)" if close else ""))


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}


def _describe(errors: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """pydantic errors -> ``(kind, message)`` with kind ``key``, ``type`` or ``value``, one per setting."""
    out: dict[str, tuple[str, str]] = {}
    for e in errors:
        loc, value = list(e["loc"]), e["input"]
        if e["type"] == "extra_forbidden":
            section = ".".join(str(p) for p in loc[:-1]) or None
            name = ".".join(str(p) for p in loc)
            msg = (f"unknown key {name!r}{_suggest(str(loc[0]), str(loc[-1]), section)}"
                   if section else f"unknown section {name!r}{_suggest(None, name)}")
            out[name] = ("key", msg)
            continue
        path = [str(p) for p in loc[:2 if loc[0] != "rewards" else 3]]
        field = None
        cls = SECTIONS.get(path[0])
        if path[0] == "rewards" and len(path) == 3:
            field = RewardConfig.model_fields[path[2]]
        elif path[0] != "rewards" and len(path) == 2:
            field = cls.model_fields[path[1]]
        index = [str(p) for p in loc[len(path):] if isinstance(p, int)]  # list element
        key = ".".join(path + index)
        if key in out:
            continue
        if field is None:  # a whole section or reward table of the wrong type
            what = "a list of tables" if key == "rewards" else "a table" + ("" if "." in key else f" [{key}]")
            out[key] = ("type", f"{key}: expected {what}, got {type(value).__name__} {value!r}")
            continue
        spec = setting_spec(".".join(path[::2] if path[0] == "rewards" else path))
        tp = typing.get_args(_arms(field.annotation)[0])[0] if index else field.annotation
        ranges = [x for x in errors if x["type"] in _RANGE_ERRORS and [str(p) for p in x["loc"]][:len(path)] == path]
        if ranges and not index:
            what = "a finite number" if ranges[0]["type"] == "finite_number" else _range_text(spec)
            out[key] = ("value", f"{key} must be {what}, got {value}")
        elif e["type"] == "literal_error" and spec.type is str and isinstance(value, str) and spec.choices:
            out[key] = ("value", _not_one_of(key, value, spec.choices))
        else:
            out[key] = ("type", f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return list(out.values())


def _raise(problems: list[str], source: str = "") -> None:
    if problems:
        prefix = f"{source}: " if source else ""
        if len(problems) == 1:
            raise ConfigError(prefix + problems[0])
        listed = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"{prefix}{len(problems)} configuration problems:\n{listed}")


def _parse(data: Mapping[str, Any]) -> tuple[TrainConfig | None, list[tuple[str, str]]]:
    """The config of ``data`` (None when a key or type is wrong) and its problems."""
    try:
        return TrainConfig.model_validate(data), []
    except ValidationError as exc:
        problems = _describe(exc.errors())
    if any(kind != "value" for kind, _ in problems):
        return None, problems
    # only values out of range: build it unchecked so the cross-field checks can report their problems too
    parts = {k: ([RewardConfig.model_construct(**r) for r in v] if k == "rewards" else SECTIONS[k].model_construct(**v))
             for k, v in data.items()}
    return TrainConfig.model_construct(**parts), problems


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from nested plain data (missing keys take their defaults); ranges are checked,
    cross-field constraints are not (:func:`validate_config`)."""
    config, problems = _parse(data)
    _raise([msg for _, msg in problems])
    return config


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Nested plain data of ``config`` (unset optional settings left out, as in the TOML)."""
    return config.model_dump(exclude_none=True)


# ------------------------------------------------------------------------------------------------------------
# files, overrides


def _read_file(path: Path) -> dict[str, Any]:
    """One TOML / YAML file, its keys and value types checked (errors name the file)."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    yaml_file = path.suffix.lower() in (".yaml", ".yml")
    try:
        if yaml_file:
            import yaml

            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        else:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
    except Exception as exc:  # tomllib.TOMLDecodeError, yaml.YAMLError
        raise ConfigError(f"{path}: invalid {'YAML' if yaml_file else 'TOML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of sections")
    _raise([msg for kind, msg in _parse(data)[1] if kind != "value"], str(path))
    return data


def _resolve_config_path(item: str | os.PathLike[str]) -> Path:
    path = Path(item)
    if not path.exists() and not path.suffix and str(item) in list_presets():
        return preset_path(str(item))
    return path


def _merge(base: dict[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in new.items():
        both = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = _merge(out[key], value) if both else copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[str, Any, str]:
    """``"optim.lr=1e-4"`` -> ``("optim.lr", 1e-4, "1e-4")``: key, TOML-parsed value (raw text if not TOML), raw."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    if not key:
        raise ConfigError(f"override {text!r} has no key before '='")
    try:
        return key, tomllib.loads(f"v = {raw}")["v"], raw
    except tomllib.TOMLDecodeError:
        return key, raw, raw


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to nested plain data (returns a new dict)."""
    data = _merge({}, data)
    for text in overrides:
        key, value, raw = parse_override(text)
        path = key.split(".")
        if path[0] not in SECTIONS:
            raise ConfigError(f"unknown key {key!r}{_suggest(None, path[0])}")
        if path[0] == "rewards" and len(path) > 1:
            if not path[1].isdigit():
                raise ConfigError(f"{key!r}: reward tables are addressed as rewards.<index>.<key>, "
                                  f"e.g. rewards.0.weight")
            rewards = data.setdefault("rewards", [r.model_dump() for r in TrainConfig().rewards])
            index = int(path[1])
            if not isinstance(rewards, list) or index > len(rewards):
                raise ConfigError(f"{key!r}: rewards has {len(rewards)} entries; use an index up to {len(rewards)} "
                                  f"({len(rewards)} appends a new reward)")
            if index == len(rewards):
                rewards.append({})
            if len(path) == 2:
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{key}: expected a table such as {{name = \"pickscore\"}}, got {raw!r}")
                rewards[index] = dict(value)
                continue
            target, name = rewards[index], path[2]
        elif len(path) == 1:
            target, name = data, path[0]
        else:
            target, name = data.setdefault(path[0], {}), path[1]
            if not isinstance(target, dict):
                raise ConfigError(f"{path[0]}: expected a table, got {type(target).__name__}")
        if len(path) > 1:
            spec = setting_spec(key)  # unknown key -> ConfigError with a suggestion
            if len(path) > (3 if path[0] == "rewards" else 2):
                raise ConfigError(f"unknown key {key!r}; did you mean {spec.key!r}?")
            if spec.type is str and not isinstance(value, str):
                value = raw  # e.g. model.path=2024 or output_dir=runs/1e-4: keep the text
        target[name] = value
    return data


def load_config(
    paths: Sequence[str | os.PathLike[str]] = (),
    overrides: Sequence[str] = (),
    *,
    known_rewards: Iterable[str] | None = None,
    known_schedulers: Iterable[str] | None = None,
    check_inputs: bool = True,
    validate: bool = True,
) -> TrainConfig:
    """Load, merge, override, type-check and validate a configuration.

    Args:
        paths: TOML / YAML files or preset names, in order (later wins). None of them = the defaults.
        overrides: ``"section.key=value"`` strings, applied after the files, in order.
        known_rewards, known_schedulers: accepted names (default: the reward and sampler registries).
        check_inputs: also check the run's inputs: model path given and (if local) present, prompts given and
            the prompts file present, the imagerefl dataset given and (if local) a folder, the resume directory.
            Presets validate with False: they leave model/prompts/dataset to the user.
        validate: check ranges and cross-field constraints (False: only keys and types).

    Raises:
        ConfigError: every problem found (unknown keys with the closest valid key, wrong types, invalid values).
    """
    data: dict[str, Any] = {}
    for item in paths:
        path = _resolve_config_path(item)
        data = _merge(data, _read_file(path))
    data = apply_overrides(data, overrides)
    config, problems = _parse(data)
    if not validate:
        _raise([msg for kind, msg in problems if kind != "value"])
        return config
    if config is not None:
        problems += [("value", p) for p in _cross_checks(config, known_rewards, known_schedulers, check_inputs)]
    _raise([msg for _, msg in problems])
    return config


# ------------------------------------------------------------------------------------------------------------
# cross-field checks

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_local(value: str) -> bool:
    """A path (rather than a hub id): exists, is absolute/relative-explicit, has >1 '/', or a file suffix."""
    if Path(value).expanduser().exists() or value.startswith(("/", "./", "../", "~", "\\")):
        return True
    if re.match(r"^[A-Za-z]:[\\/]", value) or value.lower().endswith((".safetensors", ".ckpt", ".pt", ".bin")):
        return True
    return not _HF_ID.match(value)


def validate_config(config: TrainConfig, *, known_rewards: Iterable[str] | None = None,
                    known_schedulers: Iterable[str] | None = None, check_inputs: bool = True) -> None:
    """Check ranges and cross-field constraints of a built config; raise one ConfigError listing every problem."""
    checked, problems = _parse(config.model_dump(exclude_none=True, warnings=False))
    cross = _cross_checks(checked, known_rewards, known_schedulers, check_inputs) if checked is not None else []
    _raise([msg for _, msg in problems] + cross)


def _takes_eta(scheduler: str) -> bool:
    """Whether the training trajectory of ``sampling.scheduler`` takes an eta (DDIM / ancestral / SDE steps)."""
    from ..sampling import resolve_sampler

    try:
        sampler, _ = resolve_sampler(None, scheduler)
    except ValueError:
        return False
    return sampler in ("ddim", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde")


def _cross_checks(c: TrainConfig, known_rewards: Iterable[str] | None, known_schedulers: Iterable[str] | None,
                  check_inputs: bool) -> list[str]:
    rewards_ok = tuple(known_rewards) if known_rewards is not None else reward_names()
    schedulers_ok = tuple(known_schedulers) if known_schedulers is not None else scheduler_names()
    errors: list[str] = []
    err = errors.append
    o, obj, g, d, s = c.objective, c.run.objective, c.regularizers, c.data, c.sampling
    if not c.run.output_dir:
        err("run.output_dir is empty")
    if not c.run.output_name or any(ch in c.run.output_name for ch in "/\\"):
        err(f"run.output_name must be a plain file stem without slashes, got {c.run.output_name!r}")
    if c.model.resolution % 8:
        err(f"model.resolution must be 0 (native) or a multiple of 8, got {c.model.resolution}")
    if obj == "draft" and isinstance(o.k, int) and o.k > o.num_steps:
        err(f"objective.k = {o.k} is larger than objective.num_steps = {o.num_steps}; use k <= {o.num_steps} or "
            f"k = \"all\"")
    if obj == "draft-lv" and o.k != 1:
        err(f"draft-lv takes one gradient step per re-noised sample (K = 1); objective.k = {o.k!r} is not used, "
            f"set it to 1")
    if o.intermediate_weight > 0 and obj != "draft":
        err(f"objective.intermediate_weight (R0+ intermediate supervision) applies to run.objective = 'draft', "
            f"not {obj!r}")
    elif o.intermediate_weight > 0 and o.num_steps < 2:
        err("objective.intermediate_weight needs an intermediate step: objective.num_steps >= 2")
    if obj in ("refl", "imagerefl"):
        rng = o.refl_stop_range
        if len(rng) != 2:
            err(f"objective.refl_stop_range must be [first, last], got {rng}")
        elif not 0 <= rng[0] <= rng[1] < o.num_steps:
            err(f"objective.refl_stop_range = {rng} must satisfy 0 <= first <= last < objective.num_steps "
                f"= {o.num_steps}")
        elif obj == "imagerefl" and not o.imagerefl_start_step <= rng[0]:
            err(f"objective.imagerefl_start_step = {o.imagerefl_start_step} must be in [0, refl_stop_range[0] "
                f"= {rng[0]}]")
    if not c.rewards:
        err(f"no rewards configured; add a [[rewards]] table with name = one of {', '.join(rewards_ok)}")
    for i, r in enumerate(c.rewards):
        if not r.name:
            err(f"rewards.{i}.name is missing; accepted: {', '.join(rewards_ok)}")
        elif r.name not in rewards_ok:
            err(_not_one_of(f"rewards.{i}.name", r.name, rewards_ok, "unknown reward {!r}; accepted:"))
    if g.random_eta_range:
        if len(g.random_eta_range) != 2 or not 0 <= g.random_eta_range[0] <= g.random_eta_range[1] <= 1:
            err(f"regularizers.random_eta_range must be [] or [low, high] with 0 <= low <= high <= 1, "
                f"got {g.random_eta_range}")
        if s.scheduler in schedulers_ok and not _takes_eta(s.scheduler):
            err(f"regularizers.random_eta_range needs a sampler that takes an eta (sampling.scheduler = \"auto\", "
                f"\"ddim\", \"euler_a\" or a sigma-list name), got {s.scheduler!r}")
    if len(c.optim.betas) != 2 or not all(0 <= b < 1 for b in c.optim.betas):
        err(f"optim.betas must be [beta1, beta2] with each in [0, 1), got {c.optim.betas}")
    if s.scheduler not in schedulers_ok:
        err(_not_one_of("sampling.scheduler", s.scheduler, schedulers_ok))
    elif s.eta > 0 and not _takes_eta(s.scheduler):
        err(f"sampling.eta = {s.eta} needs a sampler that takes an eta (\"auto\", \"ddim\", \"euler_a\" or a "
            f"sigma-list name), not sampling.scheduler = {s.scheduler!r}")
    if c.validation.every > 0 and not c.validation.seeds:
        err("validation.seeds is empty; give at least one seed or set validation.every = 0")
    if not check_inputs:
        return errors
    # the run's inputs: model, prompts, dataset, resume directory (presets leave some of them to the user)
    if obj in ("draft", "draft-lv", "refl") and not d.prompts and not d.prompts_file:
        err(f"run.objective = {obj!r} needs training prompts: set data.prompts or data.prompts_file")
    if obj == "imagerefl" and not d.dataset:
        err("run.objective = 'imagerefl' needs data.dataset: a folder of images with .txt captions, "
            "or a Hugging Face dataset name")
    if not c.model.path:
        err("model.path is empty: give a diffusers directory, a .safetensors checkpoint or a hub id")
    elif _looks_local(c.model.path) and not Path(c.model.path).expanduser().exists():
        err(f"model.path {c.model.path!r} does not exist")
    if c.model.single_file_config and not Path(c.model.single_file_config).expanduser().is_dir():
        err(f"model.single_file_config {c.model.single_file_config!r} is not a directory")
    if d.prompts_file and not Path(d.prompts_file).expanduser().is_file():
        err(f"data.prompts_file {d.prompts_file!r} does not exist")
    if obj == "imagerefl" and d.dataset and not d.dataset.startswith("hf:") and _looks_local(d.dataset):
        if not Path(d.dataset).expanduser().is_dir():
            hint = "" if d.dataset.startswith(("/", "~", ".", "\\")) or ":" in d.dataset else (
                f" (for a Hugging Face dataset write 'hf:{d.dataset}')")
            err(f"data.dataset folder {d.dataset!r} does not exist{hint}")
    if c.run.resume not in ("", "latest") and not Path(c.run.resume).expanduser().is_dir():
        err(f"run.resume {c.run.resume!r} is not a checkpoint directory (use '' , 'latest' or a path)")
    return errors


# ------------------------------------------------------------------------------------------------------------
# help, TOML output, presets


def to_toml(config: TrainConfig, *, comments: bool = True) -> str:
    """The resolved configuration as TOML (tomli-w); ``load_config`` of it gives an equal config."""
    text = tomli_w.dumps(config_to_dict(config))
    return ("# rdt reward-trainer configuration (resolved; python -m rdt_lib.train --help explains every key)\n"
            + text) if comments else text


def config_hash(config: TrainConfig) -> str:
    """SHA-256 (hex) of the comment-free TOML of ``config``: equal configs give equal hashes."""
    return hashlib.sha256(to_toml(config, comments=False).encode("utf-8")).hexdigest()


def format_help() -> str:
    """Every configuration key with its default, type, range, accepted names and help, by section (``--help``)."""
    out = ["Configuration keys (set them in a TOML file or with --set section.key=value):", ""]
    for section, cls in SECTIONS.items():
        if section == "rewards":
            out.append("[[rewards]]  (list of tables; override one with --set rewards.0.key=value, "
                       "default: one pickscore reward)")
        else:
            out.append(f"[{section}]  {(cls.__doc__ or '').split(':', 1)[-1].strip()}")
        for name in cls.model_fields:
            spec = setting_spec(f"{section}.{name}")
            shown = ("(required)" if spec.key == "rewards.N.name" else "(unset)" if spec.default is None
                     else json.dumps(spec.default))
            out.append(f"  {spec.key} = {shown}    "
                       f"[{_type_name(spec.annotation)}]")
            rng = _range_text(spec)
            out.append(f"      {spec.help}" + (f"; range {rng}" if rng else "")
                       + (f" (one of: {', '.join(spec.choices)})" if spec.choices else ""))
        out.append("")
    out.append(f"Presets (use as a config file name): {', '.join(list_presets())}")
    return "\n".join(out) + "\n"


def list_presets() -> list[str]:
    """Names of the shipped presets (``rdt_lib/presets/<name>.toml``), sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name: str) -> Path:
    """Path of a shipped preset by name (``.toml`` optional); ConfigError listing the presets otherwise."""
    stem = name[:-5] if name.endswith(".toml") else name
    available = list_presets()
    if stem not in available:
        close = difflib.get_close_matches(stem, available, n=1, cutoff=0.5)
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(available)}"
                          + (f" (did you mean {close[0]!r}?)" if close else ""))
    return PRESET_DIR / f"{stem}.toml"
