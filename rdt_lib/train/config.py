"""The reward trainer's configuration: schema, TOML (or YAML) loading with ``--set`` overrides, checks, help.

A configuration is a :class:`TrainConfig` of sections (``run``, ``model``, ``lora``, ``objective``, ``rewards``,
``regularizers``, ``optim``, ``data``, ``sampling``, ``validation``, ``logging``, ``checkpoint``). Every field
has a default and a one-line help text (``format_help()`` prints them all).

Loading (:func:`load_config`):

1. Each file (TOML; ``.yaml`` / ``.yml`` too when PyYAML is installed; or a preset name, see
   :func:`list_presets`) is read and its keys are checked against the schema: an unknown or misspelled key is
   an error naming the file and suggesting the closest valid key.
2. Files are merged in order, later files winning; tables merge key by key, lists (``rewards`` included) are
   replaced as a whole.
3. Overrides ``"section.key=value"`` are applied in order. The value is parsed as a TOML literal
   (``3``, ``2.5e-4``, ``true``, ``[1, 2]``, ``"text"``, ``{name = "pickscore"}``) and taken as plain text
   when that fails or when the key is a string field. ``rewards.0.weight=2`` addresses one reward table;
   index ``len(rewards)`` appends a new one.
4. Values are type-checked (ints are accepted for floats; nothing else is converted) and
   :func:`validate_config` checks ranges and cross-field constraints, reporting every problem at once.

Errors are :class:`ConfigError` (a ``ValueError``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "ConfigError",
    "OBJECTIVES",
    "KNOWN_REWARDS",
    "KNOWN_SCHEDULERS",
    "RunConfig",
    "ModelConfig",
    "LoraSection",
    "ObjectiveConfig",
    "RewardConfig",
    "RegularizerConfig",
    "OptimConfig",
    "DataConfig",
    "SamplingConfig",
    "ValidationConfig",
    "LoggingConfig",
    "CheckpointConfig",
    "TrainConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "parse_override",
    "apply_overrides",
    "validate_config",
    "format_help",
    "to_toml",
    "config_hash",
    "all_keys",
    "list_presets",
    "preset_path",
    "PRESET_DIR",
]

OBJECTIVES: tuple[str, ...] = ("draft", "draft-lv", "refl", "imagerefl")
"""Accepted ``run.objective`` values (DRaFT+ is ``draft`` with ``regularizers.kl_coeff > 0``)."""

KNOWN_REWARDS: tuple[str, ...] = ("pickscore", "hpsv2", "hpsv2.1", "imagereward", "aesthetic", "clipscore")
"""Reward names accepted by default (``rdt_lib.rewards.available()``); pass ``known_rewards`` to change."""

KNOWN_SCHEDULERS: tuple[str, ...] = ("ddim", "ddpm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras")
"""Training sampler names accepted by default (``rdt_lib.sampling.SCHEDULERS``)."""

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


class ConfigError(ValueError):
    """A configuration problem: unknown key, wrong type, invalid value or inconsistent settings."""


def _f(default: Any, help: str, *, choices: Sequence[str] | None = None, str_values: Sequence[str] | None = None):
    """A dataclass field with a default (copied when mutable), a help line and optional accepted values."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if str_values is not None:
        meta["str_values"] = tuple(str_values)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: _deepcopy(d), metadata=meta)
    return field(default=default, metadata=meta)


def _deepcopy(value: Any) -> Any:
    if isinstance(value, list):
        return [_deepcopy(v) for v in value]
    if isinstance(value, dict):
        return {k: _deepcopy(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value)
    return value


# ------------------------------------------------------------------------------------------------------------
# schema


@dataclass
class RunConfig:
    """[run]: what to train and for how long."""

    objective: str = _f("draft", "training objective: draft (DRaFT-K; DRaFT+ with regularizers.kl_coeff > 0), "
                                 "draft-lv, refl or imagerefl", choices=OBJECTIVES)
    max_steps: int = _f(4000, "optimizer steps to train (each = optim.grad_accum micro-batches per process)")
    seed: int = _f(0, "global seed: prompt order, noise, LoRA init; resuming with the same seed reproduces a run")
    output_dir: str = _f("outputs/rdt-lora", "run directory: final LoRA, resolved config, checkpoints, logs")
    output_name: str = _f("lora", "file stem of the final LoRA: <output_dir>/<output_name>.safetensors")
    resume: str = _f("", "'' = start fresh, 'latest' = newest complete checkpoint in output_dir, or a checkpoint dir")
    max_nonfinite_steps: int = _f(5, "stop with an error after this many consecutive NaN/inf losses "
                                     "(each such step is skipped with a warning)")


@dataclass
class ModelConfig:
    """[model]: the base model."""

    path: str = _f("", "diffusers directory, single-file checkpoint (.safetensors, e.g. from ComfyUI "
                       "models/checkpoints) or Hugging Face hub id")
    kind: str = _f("auto", "architecture: sd15, sdxl, or auto (detected from the weights)",
                   choices=("auto", "sd15", "sdxl"))
    resolution: int = _f(0, "training image size in pixels (multiple of 8); 0 = native (512 SD1.5, 1024 SDXL)")
    single_file_config: str = _f("", "single-file checkpoints: a local diffusers directory of the same architecture "
                                     "to take component configs and tokenizers from ('' = fetch them from the hub)")


@dataclass
class LoraSection:
    """[lora]: the trained peft LoRA on the UNet."""

    rank: int = _f(32, "LoRA rank r (>= 1)")
    alpha: float = _f(32.0, "LoRA alpha; the update is scaled by alpha / rank (kohya files store alpha per module)")
    target_modules: list[str] = _f(["to_q", "to_k", "to_v", "to_out.0"],
                                   "UNet module name suffixes that get a LoRA (default: attention projections)")
    dropout: float = _f(0.0, "LoRA dropout probability in [0, 1)")
    init: str = _f("gaussian", "LoRA init: gaussian (A ~ N(0, 1/r)) or kaiming (A kaiming-uniform); B starts at 0",
                   choices=("gaussian", "kaiming"))


@dataclass
class ObjectiveConfig:
    """[objective]: parameters of the training objectives (each uses the ones it names)."""

    num_steps: int = _f(25, "sampling steps of a training trajectory (DRaFT: 25 DDIM steps; ReFL/ImageReFL: 40)")
    k: Union[int, str] = _f(1, "draft: steps with gradient at the end of the trajectory, 1..num_steps, or \"all\"",
                            str_values=("all",))
    lv_n: int = _f(2, "draft-lv: re-noised copies of each no-grad sample, one gradient step each (>= 1)")
    refl_stop_range: list[int] = _f([30, 39], "refl/imagerefl: [first, last] step index (of num_steps, inclusive) "
                                              "at which the gradient step is taken, drawn uniformly")
    imagerefl_start_step: int = _f(30, "imagerefl: step index the real image latent is noised to "
                                       "(<= refl_stop_range[0])")
    diffusion_loss_weight: float = _f(0.01, "imagerefl: weight of the noise-prediction MSE on the noised real latent")
    plain_refl_every: int = _f(0, "imagerefl: every N-th step is a plain ReFL step from noise (0 = never)")
    loss_scale: float = _f(1.0, "multiplies the total loss (ReFL / ImageReFL use 0.001)")
    reward_loss: str = _f("negative", "reward term: negative (-reward) or hinge (relu(hinge_margin - reward), "
                                      "ImageReward's ReFL loss)", choices=("negative", "hinge"))
    hinge_margin: float = _f(2.0, "margin of the hinge reward loss")


@dataclass
class RewardConfig:
    """[[rewards]]: one reward model; the objective maximises sum(weight * scale * (reward + offset))."""

    name: str = _f("", "reward name (required), e.g. pickscore, hpsv2.1, imagereward, aesthetic, clipscore")
    weight: float = _f(1.0, "weight of this reward in the sum")
    scale: float = _f(1.0, "reward normalisation scale (ImageReFL: PickScore 0.1, ImageReward 1.0333, HPS 1)")
    offset: float = _f(0.0, "reward normalisation offset, added before scaling (ImageReFL: PickScore -20, "
                            "ImageReward -0.167, HPS 0)")
    path: str = _f("", "local weights file/directory or hub id; '' = the reward's default source")


@dataclass
class RegularizerConfig:
    """[regularizers]: terms that combine with any objective."""

    kl_coeff: float = _f(0.0, "DRaFT+ KL: kl_coeff * mean((eps_tuned - eps_base)^2) over the gradient steps (>= 0)")
    l2_init_coeff: float = _f(0.0, "R0: coeff * sum of squared differences of the trainable weights from their "
                                   "initial values (>= 0)")
    random_eta_range: list[float] = _f([], "R0: [low, high] range of a DDIM eta drawn per training step "
                                           "(ddim only; [] = off, use sampling.eta)")
    per_reward_grad_norm: bool = _f(False, "R0: normalise each reward's gradient by its own norm before summing")


@dataclass
class OptimConfig:
    """[optim]: optimisation."""

    lr: float = _f(2.5e-4, "peak AdamW learning rate (> 0)")
    weight_decay: float = _f(0.005, "AdamW weight decay (>= 0)")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas [beta1, beta2], each in [0, 1)")
    eps: float = _f(1e-8, "AdamW epsilon")
    lr_schedule: str = _f("constant", "learning-rate schedule after warm-up",
                          choices=("constant", "linear", "cosine"))
    warmup_steps: int = _f(0, "optimizer steps of linear warm-up from 0 to lr")
    grad_clip: float = _f(10.0, "max global gradient norm (0 = no clipping)")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    batch_size: int = _f(1, "prompts per micro-batch per process (global batch = batch_size * grad_accum * processes)")
    ema_decay: float = _f(0.0, "EMA decay of the LoRA weights in [0, 1) (0 = off; DRaFT+ uses 0.9999)")
    mixed_precision: str = _f("no", "autocast precision", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = _f(False, "recompute UNet activations in the backward pass to save memory")


@dataclass
class DataConfig:
    """[data]: prompts and the ImageReFL image dataset."""

    prompts: list[str] = _f([], "training prompts given inline (added to prompts_file)")
    prompts_file: str = _f("", "text file with one prompt per line ('#' lines and blank lines skipped), "
                               "or a .json list of strings")
    dataset: str = _f("", "imagerefl: folder of images with same-stem .txt captions, or a Hugging Face dataset "
                          "name ('hf:' prefix forces the hub)")
    dataset_split: str = _f("train", "split of a Hugging Face dataset")
    image_column: str = _f("image", "image column of a Hugging Face dataset")
    caption_column: str = _f("caption", "caption column of a Hugging Face dataset")


@dataclass
class SamplingConfig:
    """[sampling]: how training trajectories are sampled."""

    scheduler: str = _f("ddim", "sampler of the training trajectory (ddim, ddpm, euler, euler_a, dpmpp_2m, "
                                "dpmpp_2m_karras)")
    cfg_scale: float = _f(7.5, "classifier-free guidance scale (<= 1 = no guidance; SD1.5 7.5, SDXL 5)")
    eta: float = _f(0.0, "DDIM eta in [0, 1] (0 = deterministic; ddim only)")
    negative_prompt: str = _f("", "negative prompt for classifier-free guidance")


@dataclass
class ValidationConfig:
    """[validation]: a fixed image grid logged during training."""

    every: int = _f(0, "optimizer steps between validation grids (0 = off)")
    prompts: list[str] = _f([], "validation prompts ([] = the first 4 training prompts)")
    seeds: list[int] = _f([0, 1], "noise seeds; the grid is prompts x seeds")
    num_steps: int = _f(25, "sampling steps of the validation images")


@dataclass
class LoggingConfig:
    """[logging]: progress and metrics."""

    tensorboard: bool = _f(True, "write TensorBoard scalars (loss, rewards, KL, grad norm, lr) and images")
    log_every: int = _f(1, "optimizer steps between scalar logs (>= 1)")
    progress_bar: bool = _f(True, "show a tqdm progress bar with loss and reward")


@dataclass
class CheckpointConfig:
    """[checkpoint]: crash-safe training checkpoints."""

    every: int = _f(500, "optimizer steps between checkpoints (0 = only at the end and on Ctrl-C)")
    keep_last: int = _f(3, "complete checkpoints to keep (>= 1)")
    save_on_interrupt: bool = _f(True, "write a checkpoint when interrupted with Ctrl-C / SIGTERM")
    lora_dtype: str = _f("fp32", "dtype of the final LoRA file's weights", choices=("fp32", "fp16", "bf16"))


def _default_rewards() -> list[RewardConfig]:
    return [RewardConfig(name="pickscore")]


@dataclass
class TrainConfig:
    """The whole trainer configuration."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    rewards: list[RewardConfig] = field(default_factory=_default_rewards,
                                        metadata={"help": "reward models, as [[rewards]] tables"})
    regularizers: RegularizerConfig = field(default_factory=RegularizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


_SECTION_ORDER = [f.name for f in dataclasses.fields(TrainConfig)]


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section_class(name: str) -> type | None:
    tp = _hints(TrainConfig).get(name)
    if tp is None:
        return None
    return _list_elem(tp) or tp


def _list_elem(tp: Any) -> Any:
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0]
    return None


def all_keys() -> list[str]:
    """Every dotted key of the schema, e.g. ``optim.lr``; reward fields as ``rewards.N.name``."""
    keys = []
    for section in _SECTION_ORDER:
        cls = _section_class(section)
        prefix = f"{section}.N." if section == "rewards" else f"{section}."
        keys += [prefix + f.name for f in dataclasses.fields(cls)]
    return keys


# ------------------------------------------------------------------------------------------------------------
# type names, coercion


def _type_name(tp: Any, meta: Mapping[str, Any] | None = None) -> str:
    meta = meta or {}
    if tp is bool:
        return "boolean (true/false)"
    if tp is int:
        return "integer"
    if tp is float:
        return "number"
    if tp is str:
        return "string"
    elem = _list_elem(tp)
    if elem is not None:
        if dataclasses.is_dataclass(elem):
            return "list of tables"
        return f"list of {_type_name(elem)}s".replace("booleans (true/false)s", "booleans")
    if typing.get_origin(tp) in (Union, types.UnionType):
        parts = [_type_name(a) for a in typing.get_args(tp) if a is not str]
        words = " or ".join(parts)
        if meta.get("str_values"):
            words += " or " + " or ".join(f'"{v}"' for v in meta["str_values"])
        return words
    return getattr(tp, "__name__", str(tp))


def _wrong_type(key: str, tp: Any, meta: Mapping[str, Any], value: Any) -> ConfigError:
    return ConfigError(
        f"{key}: expected {_type_name(tp, meta)}, got {type(value).__name__} {value!r}"
    )


def _coerce(value: Any, tp: Any, meta: Mapping[str, Any], key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _wrong_type(key, tp, meta, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _wrong_type(key, tp, meta, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _wrong_type(key, tp, meta, value)
    if tp is str:
        if isinstance(value, str):
            if meta.get("choices") and value not in meta["choices"]:
                raise ConfigError(_not_one_of(key, value, meta["choices"]))
            return value
        raise _wrong_type(key, tp, meta, value)
    elem = _list_elem(tp)
    if elem is not None:
        if not isinstance(value, list):
            raise _wrong_type(key, tp, meta, value)
        if dataclasses.is_dataclass(elem):
            out = []
            for i, item in enumerate(value):
                if not isinstance(item, Mapping):
                    raise ConfigError(f"{key}.{i}: expected a table, got {type(item).__name__} {item!r}")
                out.append(_build(elem, item, f"{key}.{i}"))
            return out
        return [_coerce(v, elem, {}, f"{key}.{i}") for i, v in enumerate(value)]
    if typing.get_origin(tp) in (Union, types.UnionType):
        if isinstance(value, str):
            allowed = meta.get("str_values")
            if allowed is not None and value not in allowed:
                raise _wrong_type(key, tp, meta, value)
            return value
        for arm in typing.get_args(tp):
            if arm is str:
                continue
            try:
                return _coerce(value, arm, {}, key)
            except ConfigError:
                pass
        raise _wrong_type(key, tp, meta, value)
    raise TypeError(f"unsupported schema type {tp!r} for {key}")  # schema bug, not a user error


def _not_one_of(key: str, value: str, accepted: Sequence[str]) -> str:
    msg = f"{key}: {value!r} is not one of {', '.join(accepted)}"
    close = difflib.get_close_matches(value, list(accepted), n=1, cutoff=0.5)
    return msg + (f" (did you mean {close[0]!r}?)" if close else "")


# Names other trainers use for the same settings (diffusers scripts, kohya) -> our key.
_SYNONYMS = {
    "learning_rate": "optim.lr",
    "lr_warmup_steps": "optim.warmup_steps",
    "max_grad_norm": "optim.grad_clip",
    "gradient_accumulation_steps": "optim.grad_accum",
    "train_batch_size": "optim.batch_size",
    "adam_weight_decay": "optim.weight_decay",
    "ema": "optim.ema_decay",
    "guidance_scale": "sampling.cfg_scale",
    "num_inference_steps": "objective.num_steps",
    "max_train_steps": "run.max_steps",
    "network_dim": "lora.rank",
    "network_alpha": "lora.alpha",
    "lora_rank": "lora.rank",
    "lora_alpha": "lora.alpha",
    "pretrained_model_name_or_path": "model.path",
    "checkpointing_steps": "checkpoint.every",
    "checkpoints_total_limit": "checkpoint.keep_last",
}


def _suggest(section: str | None, name: str, valid: Sequence[str]) -> str:
    """'; did you mean ...?' for an unknown key ``name`` in ``section`` (None = top level)."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {_join(section, close[0])!r}?"
    if name in _SYNONYMS:
        return f"; did you mean {_SYNONYMS[name]!r}?"
    # the right name in another section?
    elsewhere = [k for k in all_keys() if k.rsplit(".", 1)[-1] == name]
    if elsewhere:
        return f"; did you mean {elsewhere[0].replace('.N.', '.0.')!r}?"
    everything = [k.replace(".N.", ".0.") for k in all_keys()]
    close = difflib.get_close_matches(_join(section, name), everything, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; valid keys here: {', '.join(valid)}"


def _join(section: str | None, name: str) -> str:
    return f"{section}.{name}" if section else name


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    """A ``cls`` instance from a table: unknown keys and wrong types raise ConfigError."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            raise ConfigError(f"unknown key {_join(prefix, name)!r}{_suggest(prefix, name, list(fields))}")
        kwargs[name] = _coerce(value, hints[name], fields[name].metadata, _join(prefix, name))
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from nested plain data (missing keys take their defaults); no validation."""
    hints = _hints(TrainConfig)
    kwargs = {}
    for section, value in data.items():
        if section not in hints:
            raise ConfigError(f"unknown section {section!r}{_suggest(None, section, _SECTION_ORDER)}")
        if section == "rewards":
            kwargs[section] = _coerce(value, hints[section], {}, section)
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"{section}: expected a table [{section}], got {type(value).__name__} {value!r}")
        kwargs[section] = _build(hints[section], value, section)
    return TrainConfig(**kwargs)


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Nested plain data (dicts, lists, scalars) of ``config``."""
    return dataclasses.asdict(config)


# ------------------------------------------------------------------------------------------------------------
# files, overrides


def _read_file(path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as exc:  # pragma: no cover - PyYAML is normally present via transformers
                raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or use TOML") from exc
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        else:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {str(path)!r} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    except Exception as exc:
        if type(exc).__module__.startswith("yaml"):
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
        raise
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of sections")
    return data


def _resolve_config_path(item: str | os.PathLike[str]) -> Path:
    path = Path(item)
    if path.exists() or path.suffix:
        return path
    if str(item) in list_presets():
        return preset_path(str(item))
    return path


def _merge(base: dict[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = _deepcopy(value)
    return out


def _check_keys(data: Mapping[str, Any], source: str) -> None:
    """Unknown-key check of one file, before merging, so the error can name the file."""
    try:
        config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def parse_override(text: str) -> tuple[str, Any, str]:
    """``"optim.lr=1e-4"`` -> ``("optim.lr", 1e-4, "1e-4")``: key, TOML-parsed value (raw text if not TOML), raw."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key before '='")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value, raw


def _field_info(path: list[str], full: str) -> tuple[Any, Mapping[str, Any]]:
    """Type and metadata of the field addressed by ``path`` (rewards.N.x), or ConfigError with a suggestion."""
    section = path[0]
    hints = _hints(TrainConfig)
    if section not in hints:
        raise ConfigError(f"unknown key {full!r}{_suggest(None, section, _SECTION_ORDER)}")
    if section == "rewards":
        if len(path) == 1:
            return hints["rewards"], {}
        if not path[1].isdigit():
            raise ConfigError(f"{full!r}: reward tables are addressed as rewards.<index>.<key>, e.g. rewards.0.weight")
        if len(path) == 2:
            return dict, {}
        rest, cls, prefix = path[2:], RewardConfig, f"rewards.{path[1]}"
    else:
        if len(path) == 1:
            return dict, {}
        rest, cls, prefix = path[1:], hints[section], section
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if len(rest) != 1 or rest[0] not in fields:
        raise ConfigError(f"unknown key {full!r}{_suggest(prefix, rest[0], list(fields))}")
    return _hints(cls)[rest[0]], fields[rest[0]].metadata


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to nested plain data (returns a new dict)."""
    data = _deepcopy(dict(data))
    for text in overrides:
        key, value, raw = parse_override(text)
        path = key.split(".")
        tp, _meta = _field_info(path, key)
        if tp is str and not isinstance(value, str):
            value = raw  # e.g. model.path=2024 or output_dir=runs/1e-4: keep the text
        if path[0] == "rewards" and len(path) >= 2:
            rewards = data.setdefault("rewards", [_asdict_reward(r) for r in _default_rewards()])
            if not isinstance(rewards, list):
                raise ConfigError(f"rewards: expected a list of tables, got {type(rewards).__name__}")
            index = int(path[1])
            if index > len(rewards):
                raise ConfigError(f"{key!r}: rewards has {len(rewards)} entries; use an index up to {len(rewards)} "
                                  f"({len(rewards)} appends a new reward)")
            if index == len(rewards):
                rewards.append({})
            if len(path) == 2:
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{key}: expected a table such as {{name = \"pickscore\"}}, got {raw!r}")
                rewards[index] = dict(value)
            else:
                rewards[index] = {**rewards[index], path[2]: value}
        elif len(path) == 1:
            data[path[0]] = value
        else:
            section = data.setdefault(path[0], {})
            if not isinstance(section, dict):
                raise ConfigError(f"{path[0]}: expected a table, got {type(section).__name__}")
            section[path[1]] = value
    return data


def _asdict_reward(reward: RewardConfig) -> dict[str, Any]:
    return dataclasses.asdict(reward)


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
        known_rewards, known_schedulers: accepted names (default :data:`KNOWN_REWARDS`, :data:`KNOWN_SCHEDULERS`).
        check_inputs: also check the run's inputs: model path given and (if local) present, prompts given and
            the prompts file present, the imagerefl dataset given and (if local) a folder, the resume directory.
            Presets validate with False: they leave model/prompts/dataset to the user.
        validate: run :func:`validate_config` (set False to only parse).

    Raises:
        ConfigError: unknown key (with the closest valid key), wrong type, invalid value or inconsistency.
    """
    data: dict[str, Any] = {}
    for item in paths:
        path = _resolve_config_path(item)
        file_data = _read_file(path)
        _check_keys(file_data, str(path))
        data = _merge(data, file_data)
    data = apply_overrides(data, overrides)
    config = config_from_dict(data)
    if validate:
        validate_config(config, known_rewards=known_rewards, known_schedulers=known_schedulers,
                        check_inputs=check_inputs)
    return config


# ------------------------------------------------------------------------------------------------------------
# validation

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_local(value: str) -> bool:
    """A path (rather than a hub id): exists, is absolute/relative-explicit, has >1 '/', or a file suffix."""
    if Path(value).expanduser().exists():
        return True
    if value.startswith(("/", "./", "../", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", value):
        return True
    if value.lower().endswith((".safetensors", ".ckpt", ".pt", ".bin")):
        return True
    return not _HF_ID.match(value)


def validate_config(
    config: TrainConfig,
    *,
    known_rewards: Iterable[str] | None = None,
    known_schedulers: Iterable[str] | None = None,
    check_inputs: bool = True,
) -> None:
    """Check value ranges and cross-field constraints; raise one ConfigError listing every problem."""
    rewards_ok = tuple(known_rewards) if known_rewards is not None else KNOWN_REWARDS
    schedulers_ok = tuple(known_schedulers) if known_schedulers is not None else KNOWN_SCHEDULERS
    errors: list[str] = []
    err = errors.append
    c = config

    # run
    if c.run.objective not in OBJECTIVES:
        err(_not_one_of("run.objective", c.run.objective, OBJECTIVES))
    if c.run.max_steps < 1:
        err(f"run.max_steps must be >= 1, got {c.run.max_steps}")
    if c.run.max_nonfinite_steps < 1:
        err(f"run.max_nonfinite_steps must be >= 1, got {c.run.max_nonfinite_steps}")
    if not c.run.output_dir:
        err("run.output_dir is empty")
    if not c.run.output_name or any(ch in c.run.output_name for ch in "/\\"):
        err(f"run.output_name must be a plain file stem without slashes, got {c.run.output_name!r}")

    # model
    if c.model.resolution != 0 and (c.model.resolution < 8 or c.model.resolution % 8):
        err(f"model.resolution must be 0 (native) or a multiple of 8 >= 8, got {c.model.resolution}")

    # lora
    if c.lora.rank < 1:
        err(f"lora.rank must be >= 1, got {c.lora.rank}")
    if not c.lora.alpha > 0:
        err(f"lora.alpha must be > 0, got {c.lora.alpha}")
    if not c.lora.target_modules:
        err("lora.target_modules is empty; the default is [\"to_q\", \"to_k\", \"to_v\", \"to_out.0\"]")
    if not 0 <= c.lora.dropout < 1:
        err(f"lora.dropout must be in [0, 1), got {c.lora.dropout}")

    # objective
    o, obj = c.objective, c.run.objective
    if o.num_steps < 1:
        err(f"objective.num_steps must be >= 1, got {o.num_steps}")
    if isinstance(o.k, int):
        if o.k < 1:
            err(f"objective.k must be >= 1 or \"all\", got {o.k}")
        elif obj == "draft" and o.k > o.num_steps:
            err(f"objective.k = {o.k} is larger than objective.num_steps = {o.num_steps}; "
                f"use k <= {o.num_steps} or k = \"all\"")
    if obj == "draft-lv" and o.k != 1:
        err(f"draft-lv takes one gradient step per re-noised sample (K = 1); objective.k = {o.k!r} is not used, "
            f"set it to 1")
    if o.lv_n < 1:
        err(f"objective.lv_n must be >= 1, got {o.lv_n}")
    if obj in ("refl", "imagerefl"):
        rng = o.refl_stop_range
        if len(rng) != 2:
            err(f"objective.refl_stop_range must be [first, last], got {rng}")
        elif not (0 <= rng[0] <= rng[1] < o.num_steps):
            err(f"objective.refl_stop_range = {rng} must satisfy 0 <= first <= last < objective.num_steps "
                f"= {o.num_steps}")
        elif obj == "imagerefl" and not 0 <= o.imagerefl_start_step <= rng[0]:
            err(f"objective.imagerefl_start_step = {o.imagerefl_start_step} must be in [0, refl_stop_range[0] "
                f"= {rng[0]}]")
    if o.diffusion_loss_weight < 0:
        err(f"objective.diffusion_loss_weight must be >= 0, got {o.diffusion_loss_weight}")
    if o.plain_refl_every < 0:
        err(f"objective.plain_refl_every must be >= 0, got {o.plain_refl_every}")
    if not (o.loss_scale > 0 and math.isfinite(o.loss_scale)):
        err(f"objective.loss_scale must be a finite number > 0, got {o.loss_scale}")

    # rewards
    if not c.rewards:
        err(f"no rewards configured; add a [[rewards]] table with name = one of {', '.join(rewards_ok)}")
    for i, r in enumerate(c.rewards):
        if not r.name:
            err(f"rewards.{i}.name is missing; accepted: {', '.join(rewards_ok)}")
        elif r.name not in rewards_ok:
            close = difflib.get_close_matches(r.name, list(rewards_ok), n=1, cutoff=0.5)
            err(f"rewards.{i}.name: unknown reward {r.name!r}; accepted: {', '.join(rewards_ok)}"
                + (f" (did you mean {close[0]!r}?)" if close else ""))
        for attr in ("weight", "scale", "offset"):
            if not math.isfinite(getattr(r, attr)):
                err(f"rewards.{i}.{attr} must be finite, got {getattr(r, attr)}")

    # regularizers
    g = c.regularizers
    if g.kl_coeff < 0:
        err(f"regularizers.kl_coeff must be >= 0, got {g.kl_coeff}")
    if g.l2_init_coeff < 0:
        err(f"regularizers.l2_init_coeff must be >= 0, got {g.l2_init_coeff}")
    if g.random_eta_range:
        if len(g.random_eta_range) != 2 or not 0 <= g.random_eta_range[0] <= g.random_eta_range[1] <= 1:
            err(f"regularizers.random_eta_range must be [] or [low, high] with 0 <= low <= high <= 1, "
                f"got {g.random_eta_range}")
        if c.sampling.scheduler != "ddim":
            err(f"regularizers.random_eta_range needs sampling.scheduler = \"ddim\", got {c.sampling.scheduler!r}")

    # optim
    p = c.optim
    if not p.lr > 0:
        err(f"optim.lr must be > 0, got {p.lr}")
    if p.weight_decay < 0:
        err(f"optim.weight_decay must be >= 0, got {p.weight_decay}")
    if len(p.betas) != 2 or not all(0 <= b < 1 for b in p.betas):
        err(f"optim.betas must be [beta1, beta2] with each in [0, 1), got {p.betas}")
    if not p.eps > 0:
        err(f"optim.eps must be > 0, got {p.eps}")
    if p.warmup_steps < 0:
        err(f"optim.warmup_steps must be >= 0, got {p.warmup_steps}")
    if p.grad_clip < 0:
        err(f"optim.grad_clip must be >= 0 (0 = off), got {p.grad_clip}")
    if p.grad_accum < 1:
        err(f"optim.grad_accum must be >= 1, got {p.grad_accum}")
    if p.batch_size < 1:
        err(f"optim.batch_size must be >= 1, got {p.batch_size}")
    if not 0 <= p.ema_decay < 1:
        err(f"optim.ema_decay must be in [0, 1) (0 = off), got {p.ema_decay}")

    # sampling
    s = c.sampling
    if s.scheduler not in schedulers_ok:
        err(_not_one_of("sampling.scheduler", s.scheduler, schedulers_ok))
    if s.cfg_scale < 0:
        err(f"sampling.cfg_scale must be >= 0, got {s.cfg_scale}")
    if not 0 <= s.eta <= 1:
        err(f"sampling.eta must be in [0, 1], got {s.eta}")
    elif s.eta > 0 and s.scheduler != "ddim":
        err(f"sampling.eta = {s.eta} applies to the ddim scheduler only (sampling.scheduler = {s.scheduler!r})")

    # validation, logging, checkpoint
    if c.validation.every < 0:
        err(f"validation.every must be >= 0 (0 = off), got {c.validation.every}")
    if c.validation.every > 0 and not c.validation.seeds:
        err("validation.seeds is empty; give at least one seed or set validation.every = 0")
    if c.validation.num_steps < 1:
        err(f"validation.num_steps must be >= 1, got {c.validation.num_steps}")
    if c.logging.log_every < 1:
        err(f"logging.log_every must be >= 1, got {c.logging.log_every}")
    if c.checkpoint.every < 0:
        err(f"checkpoint.every must be >= 0 (0 = only at the end), got {c.checkpoint.every}")
    if c.checkpoint.keep_last < 1:
        err(f"checkpoint.keep_last must be >= 1, got {c.checkpoint.keep_last}")

    # the run's inputs: model, prompts, dataset, resume directory (presets leave some of them to the user)
    d = c.data
    if check_inputs:
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
            folder = Path(d.dataset).expanduser()
            if not folder.is_dir():
                hint = "" if d.dataset.startswith(("/", "~", ".", "\\")) or ":" in d.dataset else (
                    f" (for a Hugging Face dataset write 'hf:{d.dataset}')")
                err(f"data.dataset folder {d.dataset!r} does not exist{hint}")
        if c.run.resume not in ("", "latest") and not Path(c.run.resume).expanduser().is_dir():
            err(f"run.resume {c.run.resume!r} is not a checkpoint directory (use '' , 'latest' or a path)")

    if errors:
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(f"{len(errors)} configuration problems:\n" + "\n".join(f"  - {e}" for e in errors))


# ------------------------------------------------------------------------------------------------------------
# help, TOML output


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def to_toml(config: TrainConfig, *, comments: bool = True) -> str:
    """The resolved configuration as TOML text; ``load_config`` of it gives an equal config."""
    lines = ["# rdt reward-trainer configuration (resolved)"] if comments else []
    for section in _SECTION_ORDER:
        value = getattr(config, section)
        items = value if section == "rewards" else [value]
        for item in items:
            if lines:
                lines.append("")
            lines.append(f"[[{section}]]" if section == "rewards" else f"[{section}]")
            for f in dataclasses.fields(item):
                if comments:
                    lines.append(f"# {f.metadata.get('help', '')}")
                lines.append(f"{f.name} = {_toml_value(getattr(item, f.name))}")
    if not config.rewards:  # an empty array of tables has no [[rewards]] header: write it before any table
        lines.insert(0, "rewards = []")
    return "\n".join(lines) + "\n"


def config_hash(config: TrainConfig) -> str:
    """SHA-256 (hex) of the comment-free TOML of ``config``: equal configs give equal hashes."""
    return hashlib.sha256(to_toml(config, comments=False).encode("utf-8")).hexdigest()


def format_help(known_rewards: Iterable[str] | None = None) -> str:
    """Every configuration key with its type, default and help, grouped by section (for ``--help``)."""
    rewards_ok = tuple(known_rewards) if known_rewards is not None else KNOWN_REWARDS
    out = [
        "Configuration keys (set them in a TOML file or with --set section.key=value):",
        "",
    ]
    for section in _SECTION_ORDER:
        cls = _section_class(section)
        if section == "rewards":
            out.append("[[rewards]]  (list of tables; override one with --set rewards.0.key=value, "
                       "default: one pickscore reward)")
            out.append(f"  reward names: {', '.join(rewards_ok)}")
            defaults = RewardConfig()
            prefix = "rewards.N."
        else:
            out.append(f"[{section}]  {cls.__doc__.split(':', 1)[-1].strip() if cls.__doc__ else ''}")
            defaults = cls()
            prefix = f"{section}."
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            default = getattr(defaults, f.name)
            shown = "(required)" if section == "rewards" and f.name == "name" else _toml_value(default)
            out.append(f"  {prefix}{f.name} = {shown}    [{_type_name(hints[f.name], f.metadata)}]")
            text = f.metadata.get("help", "")
            if f.metadata.get("choices"):
                text += f" (one of: {', '.join(f.metadata['choices'])})"
            out.append(f"      {text}")
        out.append("")
    presets = list_presets()
    if presets:
        out.append(f"Presets (use as a config file name): {', '.join(presets)}")
    return "\n".join(out).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------------------
# presets


def list_presets() -> list[str]:
    """Names of the shipped presets (``rdt_lib/presets/<name>.toml``), sorted."""
    if not PRESET_DIR.is_dir():
        return []
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
