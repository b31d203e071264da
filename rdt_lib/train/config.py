"""The reward trainer's settings, each declared once (pydantic field: type, default, range, accepted names, help).

The declarations feed the TOML / YAML files, ``--set``, ``--help`` (:func:`format_help`), the presets, the error
messages and user interfaces (:func:`setting_spec`). :func:`load_config` reads files or preset names (each file's
keys and types checked alone, so errors name the file), merges them in order (tables key by key, lists replaced),
applies ``"section.key=value"`` overrides (TOML literals; text for string keys; ``rewards.0.weight=2``, index
``len(rewards)`` appends a reward), checks types strictly (ints accepted for numbers), ranges and cross-field
constraints, and reports every problem at once as a :class:`ConfigError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Mapping, Optional, Sequence, Union

from pydantic import Field

from ..settings import (ConfigError, S, Section, SettingSpec, SettingsSchema, looks_local, model_kinds, not_one_of,
                        parse_override, reward_names, scheduler_names)

__all__ = [
    "ConfigError", "OBJECTIVES", "PRESET_DIR", "SettingSpec", "TrainConfig", "RewardConfig", "SCHEMA",
    "scheduler_names", "reward_names", "setting_spec", "setting_specs", "all_keys",
    "load_config", "config_from_dict", "config_to_dict", "parse_override", "apply_overrides", "validate_config",
    "format_help", "to_toml", "config_hash", "list_presets", "preset_path",
]

OBJECTIVES: tuple[str, ...] = ("draft", "draft-lv", "refl", "imagerefl")
"""Accepted ``run.objective`` values (DRaFT+ is ``draft`` with ``regularizers.kl_coeff > 0``)."""

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


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
    kind: str = S("auto", "architecture: sd15, sdxl, sd3 (SD3 / SD3.5, rectified flow), flux (FLUX.1, rectified flow, "
                          "guidance-distilled), or auto (detected from the weights)", names="model_kinds")
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


# ------------------------------------------------------------------------------------------------------------
# error messages and cross-field checks

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

_looks_local = looks_local


def _takes_eta(scheduler: str) -> bool:
    """Whether the training trajectory of ``sampling.scheduler`` takes an eta (DDIM / ancestral / SDE steps)."""
    from ..sampling import resolve_sampler

    try:
        sampler, _ = resolve_sampler(None, scheduler)
    except ValueError:
        return False
    return sampler in ("ddim", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde")


def _cross_checks(c: TrainConfig, known_rewards: Iterable[str] | None = None,
                  known_schedulers: Iterable[str] | None = None, check_inputs: bool = True) -> list[str]:
    rewards_ok = tuple(known_rewards) if known_rewards is not None else reward_names()
    schedulers_ok = tuple(known_schedulers) if known_schedulers is not None else scheduler_names()
    errors: list[str] = []
    err = errors.append
    o, obj, g, d, s = c.objective, c.run.objective, c.regularizers, c.data, c.sampling
    if not c.run.output_dir:
        err("run.output_dir is empty")
    if not c.run.output_name or any(ch in c.run.output_name for ch in "/\\"):
        err(f"run.output_name must be a plain file stem without slashes, got {c.run.output_name!r}")
    if c.model.kind not in model_kinds():
        err(not_one_of("model.kind", c.model.kind, model_kinds()))
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
            err(not_one_of(f"rewards.{i}.name", r.name, rewards_ok, "unknown reward {!r}; accepted:"))
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
        err(not_one_of("sampling.scheduler", s.scheduler, schedulers_ok))
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
# the trainer's settings schema and its module-level API (names other modules and tests import)

SCHEMA = SettingsSchema(
    TrainConfig, preset_dir=PRESET_DIR, cross_checks=_cross_checks, synonyms=_SYNONYMS,
    program="python -m rdt_lib.train", title="rdt reward-trainer configuration",
    list_defaults={"rewards": "one pickscore reward"},
)
SECTIONS: dict[str, type[Section]] = SCHEMA.sections


def setting_spec(key: str) -> SettingSpec:
    """The declaration of one setting, e.g. ``setting_spec("optim.lr")`` (rewards as ``rewards.0.weight``)."""
    return SCHEMA.setting_spec(key)


def setting_specs() -> list[SettingSpec]:
    """Every setting's declaration, section by section (reward fields once, as ``rewards.N.<field>``)."""
    return SCHEMA.setting_specs()


def all_keys() -> list[str]:
    """Every dotted key, e.g. ``optim.lr``; reward fields as ``rewards.N.name``."""
    return SCHEMA.all_keys()


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from nested plain data (missing keys take their defaults); ranges are checked,
    cross-field constraints are not (:func:`validate_config`)."""
    return SCHEMA.config_from_dict(data)


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Nested plain data of ``config`` (unset optional settings left out, as in the TOML)."""
    return SCHEMA.config_to_dict(config)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to nested plain data (returns a new dict)."""
    return SCHEMA.apply_overrides(data, overrides)


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
    return SCHEMA.load_config(paths, overrides, validate=validate, known_rewards=known_rewards,
                              known_schedulers=known_schedulers, check_inputs=check_inputs)


def validate_config(config: TrainConfig, *, known_rewards: Iterable[str] | None = None,
                    known_schedulers: Iterable[str] | None = None, check_inputs: bool = True) -> None:
    """Check ranges and cross-field constraints of a built config; raise one ConfigError listing every problem."""
    SCHEMA.validate_config(config, known_rewards=known_rewards, known_schedulers=known_schedulers,
                           check_inputs=check_inputs)


def to_toml(config: TrainConfig, *, comments: bool = True) -> str:
    """The resolved configuration as TOML (tomli-w); ``load_config`` of it gives an equal config."""
    return SCHEMA.to_toml(config, comments=comments)


def config_hash(config: TrainConfig) -> str:
    """SHA-256 (hex) of the comment-free TOML of ``config``: equal configs give equal hashes."""
    return SCHEMA.config_hash(config)


def format_help() -> str:
    """Every configuration key with its default, type, range, accepted names and help, by section (``--help``)."""
    return SCHEMA.format_help()


def list_presets() -> list[str]:
    """Names of the shipped presets (``rdt_lib/presets/<name>.toml``), sorted."""
    return SCHEMA.list_presets()


def preset_path(name: str) -> Path:
    """Path of a shipped preset by name (``.toml`` optional); ConfigError listing the presets otherwise."""
    return SCHEMA.preset_path(name)
