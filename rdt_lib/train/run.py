"""The trainer application: a :class:`~.config.TrainConfig` in, a kohya-format LoRA out.

Two steps, two front doors:

- :func:`build_run` turns a config into a :class:`TrainingRun` (backbone with its LoRA, rewards, objective, data,
  :class:`~.trainer.RewardTrainer`). A caller may inject its own backbone and reward models (the ComfyUI
  training node does); otherwise they are loaded from ``config.model`` / ``config.rewards``.
- :func:`run_training` runs the loop of a built run: logging (tqdm, TensorBoard scalars, a validation grid), a
  ``progress(step, metrics)`` callback, a ``should_stop()`` flag, optional checkpoints
  (:class:`RunCheckpoints`), and at the end the LoRA file and the resolved config.

:func:`train_from_config` is the command line's composition of the two: accelerate (several processes, mixed
precision), Ctrl-C / SIGTERM handling, resuming and checkpoints every N steps and on a stop. A finished run
writes::

    <output_dir>/<output_name>.safetensors   kohya keys + metadata (EMA weights when EMA is on)
    <output_dir>/<output_name>.toml          the resolved configuration
    <output_dir>/checkpoint-<step>/          the last checkpoints (see :mod:`.checkpoint`)
    <output_dir>/logs/                       TensorBoard events
    <output_dir>/validation/step-<N>.png     validation grids (rows: prompts, columns: seeds)

Several processes (``accelerate launch -m rdt_lib.train``): every process builds the same model and draws the
same global batches, trains on its share, and the LoRA gradients are averaged (see :mod:`.trainer`). Only the
main process writes files; checkpoint saves follow the collective-free protocol of :mod:`.checkpoint`.
"""

from __future__ import annotations

import json
import math
import contextlib
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..atomic_io import write_text_atomic
from ..images import image_grid, write_png
from ..lora import DEFAULT_SD_TARGETS, add_lora
from ..lora_io import (base_model_version_of, kohya_metadata, lora_rank_alpha, network_lora_tensors,
                      save_lora_safetensors)
from .checkpoint import (CheckpointManager, capture_rng_state, check_output_dir, estimate_checkpoint_bytes,
                         restore_rng_state)
from .config import ConfigError, TrainConfig, config_hash, to_toml
from .trainer import NonFiniteLossError, RewardTrainer, TrainerSettings

__all__ = [
    "TrainResult",
    "TrainingRun",
    "build_run",
    "run_training",
    "RunCheckpoints",
    "LocalAccelerator",
    "train_from_config",
    "export_lora",
    "build_backbone",
    "build_reward",
    "build_objective",
    "build_data",
    "detect_checkpoint_kind",
    "ADAPTER",
]

ADAPTER = "tuned"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        lora_path: the kohya-format LoRA file (None when the run was interrupted before the end).
        config_path: the resolved configuration next to it.
        steps: optimizer steps done.
        history: per-step metrics of this process's run (after resume: only the new steps).
        interrupted: stopped by Ctrl-C / SIGTERM (a checkpoint was saved).
        checkpoint: the last checkpoint written (or resumed from).
    """

    lora_path: Path | None
    config_path: Path | None
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    interrupted: bool = False
    checkpoint: Path | None = None


# ------------------------------------------------------------------------------------------------------------
# builders


def detect_checkpoint_kind(path: str | Path) -> str:
    """``sdxl`` or ``sd15`` from a single-file checkpoint's keys (see :func:`..backbones.stable_diffusion.detect_sd_kind`)."""
    from ..backbones.stable_diffusion import detect_sd_kind

    return detect_sd_kind(Path(path))


def build_backbone(config: TrainConfig, *, device: torch.device, dtype: torch.dtype):
    """The backbone of ``config.model`` (diffusers dir, single file or hub id), frozen
    (:func:`rdt_lib.backbones.loading.load_backbone`)."""
    from ..backbones.loading import load_backbone

    m = config.model
    return load_backbone(m.path, kind=m.kind, single_file_config=m.single_file_config or None, dtype=dtype,
                         device=device)


def build_reward(config: TrainConfig, *, device: torch.device, dtype: torch.dtype | None = None,
                 gradient_checkpointing: bool = False, models: Mapping[str, Any] | None = None):
    """A ``CombinedReward`` of ``config.rewards`` (labels: the reward names, ``name#i`` for repeats) with each
    reward's weight and ``(reward + offset) * scale`` normalisation.

    ``models`` supplies loaded reward models by label or name (the others are loaded with ``load_reward``)."""
    from ..rewards import CombinedReward, Normalization, load_reward

    given = dict(models or {})
    models, weights, norms = {}, {}, {}
    for i, r in enumerate(config.rewards):
        label = r.name if r.name not in models else f"{r.name}#{i}"
        model = given.get(label, given.get(r.name))
        if model is None:
            model = load_reward(r.name, path=r.path or None, device=device, dtype=dtype)
        if gradient_checkpointing and hasattr(model, "enable_gradient_checkpointing"):
            model.enable_gradient_checkpointing(True)
        models[label] = model
        weights[label] = r.weight
        norms[label] = Normalization(offset=r.offset, scale=r.scale)
    return CombinedReward(models, weights, norms)


def model_family(backbone: Any) -> str:
    """``sd15``, ``sdxl``, ``sd3`` or ``flux`` (a backbone's ``kind`` attribute when it has one), for logs and metadata."""
    kind = getattr(backbone, "kind", None)
    if isinstance(kind, str) and kind:
        return kind
    if getattr(backbone, "is_sdxl", False):
        return "sdxl"
    return "sd3" if getattr(getattr(backbone, "model_sampling", None), "is_flow", False) else "sd15"


def lora_targets(config: TrainConfig, backbone: Any) -> list[str]:
    """``lora.target_modules``, or the backbone's default attention projections when it is empty: a UNet's
    ``to_q/to_k/to_v/to_out.0`` (:data:`rdt_lib.lora.DEFAULT_SD_TARGETS`); an SD3 / Flux transformer's
    ``lora_targets`` (:data:`rdt_lib.backbones.flow.FLOW_LORA_TARGETS`), which add the text stream's
    ``add_q_proj/add_k_proj/add_v_proj/to_add_out``: in these joint-attention models the prompt reaches the image
    only through the joint attention (no cross-attention), so image-stream projections alone could not change how
    the prompt tokens are projected; diffusers' SD3 LoRA script trains the same eight, and ComfyUI maps all of them
    (``comfy.utils.mmdit_to_diffusers``)."""
    return list(config.lora.target_modules) or list(getattr(backbone, "lora_targets", None) or DEFAULT_SD_TARGETS)


def build_objective(config: TrainConfig):
    """The objective of ``config.run.objective`` with the objective, sampling and regulariser settings."""
    from ..objectives import DraftK, DraftLV, ImageReFL, ReFL

    o, s, g = config.objective, config.sampling, config.regularizers
    res = config.model.resolution or None
    common = dict(
        num_steps=o.num_steps, adapter=ADAPTER, cfg_scale=s.cfg_scale, scheduler=s.scheduler, eta=s.eta,
        eta_range=tuple(g.random_eta_range) if g.random_eta_range else None, kl_coeff=g.kl_coeff,
        reward_loss=o.reward_loss, hinge_margin=o.hinge_margin, loss_scale=o.loss_scale, height=res, width=res,
        negative_prompt=s.negative_prompt,
    )
    name = config.run.objective
    if name == "draft":
        return DraftK(k=None if o.k == "all" else int(o.k), intermediate_weight=o.intermediate_weight, **common)
    if name == "draft-lv":
        return DraftLV(n=o.lv_n, **common)
    if name == "refl":
        return ReFL(stop_range=tuple(o.refl_stop_range), **common)
    if name == "imagerefl":
        return ImageReFL(stop_range=tuple(o.refl_stop_range), start_step=o.imagerefl_start_step,
                         diffusion_loss_weight=o.diffusion_loss_weight, plain_refl_every=o.plain_refl_every, **common)
    raise ConfigError(f"unknown objective {name!r}")


def build_data(config: TrainConfig, image_size: int):
    """Prompts (draft, draft-lv, refl) or the image + caption dataset (imagerefl)."""
    from .data import load_prompts, open_image_dataset
    from .trainer import PromptSource

    d = config.data
    if config.run.objective == "imagerefl":
        return open_image_dataset(d.dataset, image_size, split=d.dataset_split, image_column=d.image_column,
                                  caption_column=d.caption_column)
    return PromptSource(load_prompts(d.prompts, d.prompts_file))


class LocalAccelerator:
    """The part of ``accelerate.Accelerator`` the loop uses, for one process without accelerate (ComfyUI,
    notebooks): device, ``mixed_precision`` (``no`` / ``fp16`` (CUDA only) / ``bf16``), ``autocast()``."""

    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self, mixed_precision: str = "no", device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if mixed_precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("optim.mixed_precision = \"fp16\" needs a CUDA GPU; use \"bf16\" or \"no\" on CPU")
        self.mixed_precision = mixed_precision

    def autocast(self):
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.mixed_precision])

    def wait_for_everyone(self) -> None:
        pass


@dataclass
class TrainingRun:
    """A run built from a config (:func:`build_run`), ready for :func:`run_training`.

    Attributes:
        config: the validated configuration.
        backbone: the model; its network carries the trained LoRA adapter :data:`ADAPTER`.
        trainer: the optimisation loop's state (LoRA, optimizer, EMA, data order).
        accelerator: an ``accelerate.Accelerator`` or a :class:`LocalAccelerator`.
        log: message sink.
    """

    config: TrainConfig
    backbone: Any
    trainer: RewardTrainer
    accelerator: Any
    log: Callable[[str], None]

    @property
    def out_dir(self) -> Path:
        return Path(self.config.run.output_dir).expanduser()


def build_run(
    config: TrainConfig,
    *,
    backbone: Any = None,
    rewards: Any = None,
    accelerator: Any = None,
    log: Callable[[str], None] | None = None,
) -> TrainingRun:
    """Build everything ``config`` describes (validated already; see :func:`.config.load_config`).

    Args:
        backbone: a :class:`~rdt_lib.backbones.base.Backbone` to train (default: loaded from ``config.model``).
            A LoRA adapter :data:`ADAPTER` is added from ``config.lora`` unless its network already has one.
        rewards: reward models by name (``{"pickscore": model}``; combined with ``config.rewards``' weights and
            normalisation; names not given are loaded), or a ready reward callable ``fn(images, prompts) -> [B]``.
        accelerator: an ``accelerate.Accelerator`` (default: a :class:`LocalAccelerator`, one process, with
            ``optim.mixed_precision``).
        log: message sink (default: ``print`` on the main process).

    Raises:
        ConfigError / DataError: inputs that turn out unusable once loaded (e.g. an empty dataset).
    """
    from ..lora import adapter_names

    acc = accelerator or LocalAccelerator(config.optim.mixed_precision,
                                          backbone.device if backbone is not None else None)
    say = log or (lambda msg: print(msg, flush=True) if acc.is_main_process else None)
    device = acc.device
    t0 = time.perf_counter()
    if backbone is None:
        weight_dtype = torch.float32
        if device.type == "cuda" and config.optim.mixed_precision in ("fp16", "bf16"):
            weight_dtype = _DTYPES[config.optim.mixed_precision]
        backbone = build_backbone(config, device=device, dtype=weight_dtype)
    if ADAPTER not in adapter_names(backbone.network):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.run.seed)
            add_lora(backbone.network, ADAPTER, rank=config.lora.rank, alpha=config.lora.alpha,
                     target_modules=lora_targets(config, backbone), dropout=config.lora.dropout,
                     init_lora_weights="gaussian" if config.lora.init == "gaussian" else True)
    if config.optim.gradient_checkpointing:
        backbone.network.enable_gradient_checkpointing()
        if hasattr(getattr(backbone, "vae", None), "enable_gradient_checkpointing"):
            backbone.vae.enable_gradient_checkpointing()
    if rewards is None or isinstance(rewards, Mapping):
        rewards = build_reward(config, device=device, dtype=None if device.type == "cuda" else torch.float32,
                               gradient_checkpointing=config.optim.gradient_checkpointing, models=rewards)
    objective = build_objective(config)
    image_size = config.model.resolution
    if config.run.objective == "imagerefl" and not image_size:
        image_size = backbone.latent_shape()[-1] * backbone.vae_scale_factor
    data = build_data(config, image_size)
    torch.manual_seed(config.run.seed + 1000 * acc.process_index)  # LoRA dropout etc.: per process
    trainer = RewardTrainer(backbone, objective, rewards, data, adapter=ADAPTER,
                            settings=TrainerSettings.from_config(config), accelerator=acc)
    n_params = sum(p.numel() for p in trainer.param_list)
    o = config.optim
    kind = model_family(backbone)
    say(f"model {config.model.path or type(backbone).__name__} ({kind}, {device}), LoRA rank {config.lora.rank}: "
        f"{n_params:,} trainable parameters; objective {config.run.objective}; rewards "
        f"{', '.join(r.name for r in config.rewards)}; {len(data)} training items; {acc.num_processes} "
        f"process(es), global batch {o.batch_size * o.grad_accum * acc.num_processes} "
        f"[{time.perf_counter() - t0:.1f} s]")
    return TrainingRun(config, backbone, trainer, acc, say)


class RunCheckpoints:
    """Checkpoints of a run in ``<output_dir>/checkpoint-<step>`` (``config.checkpoint``): every N steps, when
    the run is stopped (``save_on_interrupt``), before a :class:`NonFiniteLossError`, at the end; and
    :meth:`resume` from one (``config.run.resume``). Collective-safe on several processes."""

    def __init__(self, run: TrainingRun) -> None:
        self.run = run
        self.manager = CheckpointManager(run.out_dir, run.config.checkpoint.keep_last,
                                         is_main_process=run.accelerator.is_main_process)
        self.config_text = to_toml(run.config)
        self.last: Path | None = None
        if run.accelerator.is_main_process:  # before the first step: writable, room for a checkpoint and the LoRA
            trainer = run.trainer
            n_params = sum(p.numel() for p in trainer.param_list)
            check_output_dir(run.out_dir, estimate_checkpoint_bytes(
                n_params, len(trainer.param_list), ema=trainer.ema is not None,
                export_bytes=_DTYPES[run.config.checkpoint.lora_dtype].itemsize),
                what=f"one checkpoint of {n_params:,} LoRA parameters with optimizer state, and the LoRA")

    def resume(self) -> Path | None:
        """Load ``run.resume`` ('' = nothing, 'latest' or a directory) into the trainer and the RNGs."""
        config, trainer, acc = self.run.config, self.run.trainer, self.run.accelerator
        if not config.run.resume:
            return None
        state, ckpt = self.manager.load_for_resume(
            config.run.resume, log=self.run.log, expected_lora={k: p.shape for k, p in trainer.params.items()})
        if ckpt is None:
            self.run.log(f"resume = latest: no checkpoint in {self.run.out_dir} yet, starting from scratch")
            return None
        trainer.load_state_dict(state)
        rng = state.get("rng")
        if isinstance(rng, list) and len(rng) == acc.num_processes:
            restore_rng_state(rng[acc.process_index])
        old_hash = state["meta"].get("config_hash")
        if old_hash and old_hash != config_hash(_resume_neutral(config)):
            warnings.warn("the configuration differs from the one the checkpoint was written with; continuing "
                          "with the new settings", RuntimeWarning, stacklevel=2)
        self.run.log(f"resumed from {ckpt} at step {trainer.step_count}")
        self.last = ckpt
        return ckpt

    def save(self) -> Path | None:
        """Write a checkpoint now (call on every process)."""
        trainer, acc, config = self.run.trainer, self.run.accelerator, self.run.config
        state = trainer.state_dict()
        rng_states = [capture_rng_state()]
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            rng_states = gather_object(rng_states)
        state["rng"] = list(rng_states)
        acc.wait_for_everyone()
        path = self.manager.save(trainer.step_count, state, extra_files={"config.toml": self.config_text},
                                 metadata={"config_hash": config_hash(_resume_neutral(config)),
                                           "objective": config.run.objective, "world_size": acc.num_processes})
        acc.wait_for_everyone()
        if path is not None:
            self.run.log(f"checkpoint saved: {path}")
        self.last = path or self.last
        return path

    def after_step(self, metrics: dict[str, float], stopping: bool) -> None:
        c, step = self.run.config.checkpoint, self.run.trainer.step_count
        if (c.every > 0 and step % c.every == 0 and metrics["skipped"] == 0) or (stopping and c.save_on_interrupt):
            self.save()

    def on_error(self) -> None:
        if self.run.trainer.step_count > 0:
            self.save()

    def at_end(self) -> None:
        every = self.run.config.checkpoint.every
        if every == 0 or self.run.trainer.step_count % every != 0:
            self.save()


# ------------------------------------------------------------------------------------------------------------
# validation grid


@torch.no_grad()
def validation_grid(backbone, config: TrainConfig, prompts: list[str]) -> torch.Tensor:
    """The tuned model's images for ``prompts`` x ``config.validation.seeds`` as one grid ``[3, H', W']``."""
    from ..denoisers import ModelBranch
    from ..sampling import sample

    v, s = config.validation, config.sampling
    seeds = list(v.seeds)
    res = config.model.resolution or None
    rows = [p for p in prompts for _ in seeds]
    row_seeds = [sd for _ in prompts for sd in seeds]
    tuned = ModelBranch(backbone, adapter=ADAPTER, cfg_scale=s.cfg_scale)
    out = sample(ModelBranch(backbone, cfg_scale=s.cfg_scale), rows, tuned=tuned, schedule="tuned",
                 scheduler=s.scheduler, num_steps=v.num_steps, seeds=row_seeds, height=res, width=res,
                 negative_prompt=s.negative_prompt)
    return image_grid(out.images.float().cpu(), len(prompts), len(seeds))


# ------------------------------------------------------------------------------------------------------------
# the run


def export_lora(trainer: RewardTrainer, config: TrainConfig, backbone, path: Path) -> Path:
    """Write the trained (EMA when on) LoRA as kohya-format safetensors with metadata."""
    state = trainer.lora_state(ema=True)
    dtype = _DTYPES[config.checkpoint.lora_dtype]
    tensors = network_lora_tensors(backbone.network, ADAPTER, state_dict=state, dtype=dtype)
    rewards = [{"name": r.name, "weight": r.weight, "scale": r.scale, "offset": r.offset} for r in config.rewards]
    rank, alpha = lora_rank_alpha(tensors)  # a transformer file has the scale folded in: alpha = rank
    meta = kohya_metadata(
        rank=rank, alpha=alpha,
        base_model_version=base_model_version_of(backbone.network),
        extra={
            "ss_steps": str(trainer.step_count),
            "ss_output_name": config.run.output_name,
            "ss_sd_model_name": Path(config.model.path).name or config.model.path,
            "ss_seed": str(config.run.seed),
            "ss_learning_rate": repr(config.optim.lr),
            "rdt_objective": config.run.objective,
            "rdt_rewards": json.dumps(rewards),
            "rdt_base_model": config.model.path,
            "rdt_steps": str(trainer.step_count),
            "rdt_ema": "true" if trainer.ema is not None else "false",
            "rdt_target_modules": json.dumps(lora_targets(config, backbone)),
            "rdt_lora_alpha": repr(float(config.lora.alpha)),
            "rdt_regularizers": json.dumps({"kl_coeff": config.regularizers.kl_coeff,
                                            "l2_init_coeff": config.regularizers.l2_init_coeff,
                                            "random_eta_range": list(config.regularizers.random_eta_range),
                                            "per_reward_grad_norm": config.regularizers.per_reward_grad_norm}),
            "rdt_config_hash": config_hash(config),
        },
    )
    return save_lora_safetensors(path, tensors, meta)


def run_training(
    run: TrainingRun,
    *,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoints: RunCheckpoints | None = None,
) -> TrainResult:
    """Train ``run`` up to ``config.run.max_steps`` optimizer steps; write the LoRA and the config at the end.

    Args:
        progress: called after each optimizer step as ``progress(step, metrics)`` (step = steps done, 1-based).
        should_stop: polled after each step; True stops the run there (``TrainResult.interrupted``; no LoRA file
            is written, a checkpoint is when ``checkpoints`` is given and ``checkpoint.save_on_interrupt`` is on).
        checkpoints: periodic / on-stop / on-error checkpoints (None: none are written).

    Raises:
        NonFiniteLossError: too many consecutive NaN / inf steps (with ``checkpoints``: the last good state is saved).
    """
    config, trainer, acc, backbone, say = run.config, run.trainer, run.accelerator, run.backbone, run.log
    out_dir, main = run.out_dir, acc.is_main_process
    writer = None
    if main and config.logging.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "logs"))
    val_prompts = list(config.validation.prompts)
    if config.validation.every > 0 and not val_prompts:
        val_prompts = trainer.data.get(list(range(min(4, len(trainer.data)))))[0]
    bar = None
    if main and config.logging.progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.run.max_steps, initial=trainer.step_count, desc="training", dynamic_ncols=True)

    history: list[dict[str, float]] = []
    interrupted = False
    try:
        while trainer.step_count < config.run.max_steps:
            try:
                metrics = trainer.step()
            except NonFiniteLossError:
                if checkpoints is not None:
                    checkpoints.on_error()
                raise
            history.append(metrics)
            step = trainer.step_count
            if bar is not None:
                bar.n = step
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", reward=f"{metrics.get('reward', float('nan')):.4g}")
                bar.refresh()
            if writer is not None and metrics["skipped"] == 0 and step % config.logging.log_every == 0:
                for key, value in metrics.items():
                    if key != "step" and math.isfinite(value):
                        writer.add_scalar(f"train/{key}", value, step)
            if progress is not None:
                progress(step, metrics)
            if metrics["skipped"] == 0 and config.validation.every > 0 and step % config.validation.every == 0:
                if main:
                    with trainer.ema_weights(), acc.autocast():
                        grid = validation_grid(backbone, config, val_prompts)
                    write_png(out_dir / "validation" / f"step-{step:06d}.png", grid)
                    if writer is not None:
                        writer.add_image("validation", grid, step)
                acc.wait_for_everyone()
            stop_now = _any_process(acc, bool(should_stop is not None and should_stop()))
            if checkpoints is not None:
                checkpoints.after_step(metrics, stopping=stop_now)
            if stop_now:
                interrupted = True
                say(f"stopped at step {step} by request")
                break
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.flush()
            writer.close()

    last = checkpoints.last if checkpoints is not None else None
    if interrupted:
        return TrainResult(None, None, trainer.step_count, history, True, last)
    if checkpoints is not None:
        checkpoints.at_end()
        last = checkpoints.last
    lora_path = out_dir / f"{config.run.output_name}.safetensors"
    config_path = out_dir / f"{config.run.output_name}.toml"
    if main:
        export_lora(trainer, config, backbone, lora_path)
        write_text_atomic(config_path, to_toml(config))
        say(f"LoRA written: {lora_path}\nconfig: {config_path}")
    acc.wait_for_everyone()
    return TrainResult(lora_path, config_path, trainer.step_count, history, False, last)


# ------------------------------------------------------------------------------------------------------------
# the command line's composition: accelerate, signals, resume, checkpoints


def _make_accelerator(config: TrainConfig):
    from accelerate import Accelerator

    mp = config.optim.mixed_precision
    if mp == "fp16" and not torch.cuda.is_available():
        raise ConfigError("optim.mixed_precision = \"fp16\" needs a CUDA GPU; use \"bf16\" or \"no\" on CPU")
    _forget_previous_single_process_run()
    return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())


def _forget_previous_single_process_run() -> None:
    """accelerate keeps one process-wide state that refuses a second Accelerator with another precision.
    Several trainings in one process (a notebook, the tests) are normal here, so a single-process run starts
    from a fresh state; a launched multi-process run is left alone."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    try:
        from accelerate.state import AcceleratorState, GradientState
    except ImportError:  # pragma: no cover
        return
    if getattr(AcceleratorState, "_shared_state", None):
        AcceleratorState._reset_state()
        GradientState._reset_state()


class _StopFlag:
    """Ctrl-C / SIGTERM: the first signal asks the loop to save a checkpoint and stop after the current step; a
    second Ctrl-C aborts at once (KeyboardInterrupt)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.requested = False
        self.log = log
        self._saved: dict[int, Any] = {}

    def _handler(self, signum, frame):  # noqa: ARG002
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.log(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step "
                 f"(Ctrl-C again to abort without saving; --resume latest continues)")

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._saved.items():
            signal.signal(sig, old)


def train_from_config(
    config: TrainConfig,
    *,
    accelerator: Any = None,
    log: Callable[[str], None] | None = None,
    step_callback: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """The command line's run: :func:`build_run` with accelerate, then :func:`run_training` with Ctrl-C /
    SIGTERM handling, resuming (``run.resume``) and :class:`RunCheckpoints`.

    Args:
        accelerator: an ``accelerate.Accelerator`` (default: one is created with ``optim.mixed_precision``).
        log: message sink (default: ``print`` on the main process).
        step_callback: called after each optimizer step as ``callback(step, metrics)``.
    """
    run = build_run(config, accelerator=accelerator or _make_accelerator(config), log=log)
    checkpoints = RunCheckpoints(run)
    checkpoints.resume()
    with _StopFlag(run.log) as stop:
        return run_training(run, progress=step_callback, should_stop=lambda: stop.requested, checkpoints=checkpoints)


def _any_process(acc: Any, flag: bool) -> bool:
    """True on every process when ``flag`` is set on any (a signal may reach the processes at different steps)."""
    if acc.num_processes == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.to(acc.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _resume_neutral(config: TrainConfig) -> TrainConfig:
    """The configuration without the keys that may change between a run and its resumption."""
    return config.model_copy(update={
        "run": config.run.model_copy(update={"resume": "", "max_steps": 0}),
        "logging": config.logging.model_copy(update={"progress_bar": False}),
    })
