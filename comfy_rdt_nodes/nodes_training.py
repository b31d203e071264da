"""Training node (category ``rdt/training``): ``RDTTrainRewardLoRA`` trains a reward LoRA with the rdt trainer.

The node turns its inputs into the trainer's own :class:`rdt_lib.train.config.TrainConfig` (every input's type,
default, range and help come from that schema's declarations) and runs the library's single training loop
(:func:`rdt_lib.train.run.build_run` + :func:`rdt_lib.train.run.run_training`, the same front door the headless
``python -m rdt_lib.train`` uses) with an injected backbone over ComfyUI's MODEL / CLIP / VAE
(:class:`comfy_rdt_nodes.comfy_backbone.ComfyBackbone`), the injected ``REWARD_MODEL`` networks, ComfyUI's
progress bar and ComfyUI's interrupt as the stop flag.

What it leaves behind:

- ``models/loras/<name>.safetensors``: kohya keys ``lora_unet_<diffusers path>`` (mapped by ComfyUI's LoraLoader
  for SD1.5 and SDXL), written atomically, with the trainer's metadata (objective, rewards, base checkpoint,
  steps). It is rewritten at every checkpoint, when interrupted and at the end, and always says how many steps it
  holds (``rdt_steps``).
- ``<output>/rdt_training/<name>/checkpoint-<step>/``: resumable trainer state (``if_exists = resume``).

The MODEL the other nodes see is not changed: training works on a clone, the LoRA layers are taken out of
ComfyUI's UNet again and the weight objects, ``requires_grad`` flags, train/eval flags and global RNG state are
restored, also after an error or an interrupt. The output MODEL is a clone of the input with the trained LoRA as
ordinary patches (``comfy.lora.load_lora`` + ``add_patches``, as LoraLoader does).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rdt_lib.train.config import ConfigError, config_from_dict, setting_spec, validate_config

from .comfy_backbone import ComfyBackbone, UnsupportedModelError, autograd_usable, model_family

log = logging.getLogger(__name__)

__all__ = ["RDTTrainRewardLoRA", "TrainInputError", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS",
           "parse_prompts", "node_config", "lora_file_name"]

IF_EXISTS = ("refuse", "resume", "overwrite")
MAX_REWARDS = 3
CHECKPOINT_SUBDIR = "rdt_training"


class TrainInputError(ValueError):
    """A node input that cannot be trained with; the message says what was wrong and what is accepted."""


# ---------------------------------------------------------------------------------------------------------------
# inputs from the trainer's schema


# the node input -> the config key it sets (error messages name both)
INPUT_KEYS: dict[str, str] = {
    "objective": "run.objective",
    "steps": "run.max_steps",
    "learning_rate": "optim.lr",
    "lora_rank": "lora.rank",
    "lora_alpha": "lora.alpha",
    "k": "objective.k",
    "sampling_steps": "objective.num_steps",
    "batch_size": "optim.batch_size",
    "grad_accumulation": "optim.grad_accum",
    "kl_coeff": "regularizers.kl_coeff",
    "l2_init_coeff": "regularizers.l2_init_coeff",
    "seed": "run.seed",
    "resolution": "model.resolution",
    "cfg": "sampling.cfg_scale",
    "checkpoint_every": "checkpoint.every",
    "gradient_checkpointing": "optim.gradient_checkpointing",
}
# node defaults where the trainer's default is a long run's value (the range and help still come from the schema)
NODE_DEFAULTS: dict[str, Any] = {"steps": 100, "lora_rank": 8, "lora_alpha": 8.0,
                                 "checkpoint_every": 50, "cfg": 7.5}
# upper ends of widgets whose setting has no upper bound in the schema (UI limits only)
UI_MAX: dict[str, float] = {"steps": 1_000_000, "lora_rank": 1024, "lora_alpha": 4096.0, "k": 1000,
                            "sampling_steps": 1000, "batch_size": 4096, "grad_accumulation": 4096,
                            "kl_coeff": 1000.0, "l2_init_coeff": 1000.0, "learning_rate": 1.0, "resolution": 8192,
                            "cfg": 100.0, "checkpoint_every": 1_000_000, "seed": 2**48,
                            "reward_weight": 100.0}


def _widget(name: str, key: str) -> tuple:
    """A ComfyUI input declaration from the trainer setting ``key``'s type, default, range and help."""
    spec = setting_spec(key)
    default = NODE_DEFAULTS.get(name, spec.default)
    tooltip = f"{spec.help} [{spec.key}]"
    if spec.choices:
        return (list(spec.choices), {"default": default, "tooltip": tooltip})
    if spec.type is bool:
        return ("BOOLEAN", {"default": bool(default), "tooltip": tooltip})
    lo = spec.ge if spec.ge is not None else spec.gt
    hi = spec.le if spec.le is not None else spec.lt
    if hi is None:
        hi = UI_MAX.get(name)
    if spec.type is int or name in ("k",):
        opts: dict[str, Any] = {"default": int(default if isinstance(default, int) else 1), "tooltip": tooltip,
                                "min": int(lo) if lo is not None else 0}
        if hi is not None:
            opts["max"] = int(hi)
        if name == "resolution":
            opts["step"] = 8
        return ("INT", opts)
    opts = {"default": float(default if default is not None else 0.0), "tooltip": tooltip,
            "min": float(lo) if lo is not None else -float(UI_MAX.get(name, 1e6)),
            "step": 1e-6 if name == "learning_rate" else 0.01}
    if hi is not None:
        opts["max"] = float(hi)
    if name == "learning_rate":
        opts["round"] = False
    return ("FLOAT", opts)


def parse_prompts(text: str) -> list[str]:
    """One prompt per non-empty line (surrounding whitespace dropped; lines starting with '#' skipped)."""
    return [line.strip() for line in (text or "").splitlines() if line.strip() and not line.strip().startswith("#")]


_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]*$")


def lora_file_name(name: str) -> str:
    """The LoRA file's stem from the ``lora_name`` input (a trailing ``.safetensors`` is dropped; sub-folders of
    ``models/loras`` with '/' are allowed; no '..', no absolute paths)."""
    stem = (name or "").strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    parts = [p for p in stem.replace("\\", "/").split("/")]
    if not stem or any(not p or p in (".", "..") or not _NAME_OK.match(p) for p in parts) or stem.startswith("/"):
        raise TrainInputError(f"lora_name {name!r} is not a usable file name: use letters, digits, spaces, '_', '-', "
                              "'.' (optionally 'folder/name'), e.g. 'rdt_reward_lora'")
    return "/".join(parts)


def _explain(err: ConfigError) -> str:
    """A config error in the node's words: config keys followed by the node input that sets them."""
    text = str(err)
    for name, key in sorted(INPUT_KEYS.items(), key=lambda kv: -len(kv[1])):
        text = text.replace(key, f"{name} ({key})")
    text = text.replace("regularizers.random_eta_range", "random_eta (regularizers.random_eta_range)")
    return text


@dataclass
class RewardInput:
    """One ``REWARD_MODEL`` input and its weight."""

    handle: Any
    weight: float
    label: str = ""

    @property
    def name(self) -> str:
        return str(getattr(self.handle, "name", "") or "")

    @property
    def model(self) -> Any:
        return getattr(self.handle, "reward", self.handle)


def collect_rewards(reward_model: Any, reward_weight: float, optional: dict[str, Any]) -> list[RewardInput]:
    """The connected reward models with their weights (labels ``name``, ``name#i`` for repeats, as the headless
    trainer labels them)."""
    if reward_model is None:
        raise TrainInputError("no reward model: connect a REWARD_MODEL (RDT Reward Model Loader) to reward_model")
    items = [RewardInput(reward_model, float(reward_weight))]
    for i in range(2, MAX_REWARDS + 1):
        handle = optional.get(f"reward_model_{i}")
        if handle is not None:
            items.append(RewardInput(handle, float(optional.get(f"reward_weight_{i}", 1.0))))
    labels: set[str] = set()
    for i, item in enumerate(items):
        if not item.name:
            raise TrainInputError(f"reward input {i + 1} is not a REWARD_MODEL from the RDT Reward Model Loader")
        item.label = item.name if item.name not in labels else f"{item.name}#{i}"
        labels.add(item.label)
    return items


def node_config(*, objective: str, prompts: Sequence[str], steps: int, learning_rate: float, lora_rank: int,
                lora_alpha: float, k: int, sampling_steps: int, batch_size: int, grad_accumulation: int,
                kl_coeff: float, l2_init_coeff: float, random_eta: bool, seed: int, resolution: int,
                cfg: float | None, checkpoint_every: int, gradient_checkpointing: bool, rewards: Sequence[RewardInput],
                name: str, output_dir: str, base_name: str, resume: bool, dataset: str = "",
                family: str = "sd15"):
    """The :class:`TrainConfig` of one node run (validated; :class:`TrainInputError` in the node's words).

    The trainer's defaults apply to everything the node has no input for (AdamW settings, gradient clipping,
    DDIM sampling, ...); TensorBoard, the tqdm bar and validation grids are off (ComfyUI shows progress itself).
    """
    data: dict[str, Any] = {
        "run": {"objective": objective, "max_steps": int(steps), "seed": int(seed), "output_dir": output_dir,
                "output_name": Path(name).name, "resume": "latest" if resume else ""},
        "model": {"path": base_name, "kind": family, "resolution": int(resolution)},
        "lora": {"rank": int(lora_rank), "alpha": float(lora_alpha)},
        "objective": {"num_steps": int(sampling_steps), "k": int(k) if objective == "draft" else 1},
        "rewards": [{"name": r.name, "weight": float(r.weight)} for r in rewards],
        "regularizers": {"kl_coeff": float(kl_coeff), "l2_init_coeff": float(l2_init_coeff),
                         "random_eta_range": [0.0, 1.0] if random_eta else []},
        "optim": {"lr": float(learning_rate), "batch_size": int(batch_size), "grad_accum": int(grad_accumulation),
                  "gradient_checkpointing": bool(gradient_checkpointing)},
        "data": {"prompts": list(prompts), "dataset": dataset},
        "sampling": {} if cfg is None else {"cfg_scale": float(cfg)},
        "validation": {"every": 0},
        "logging": {"tensorboard": False, "progress_bar": False},
        "checkpoint": {"every": int(checkpoint_every)},
    }
    if objective in ("refl", "imagerefl"):
        n = int(sampling_steps)
        # the ReFL stop range scales with the schedule: steps [30, 39] of 40 by default
        data["objective"]["refl_stop_range"] = [max(0, min(n - 1, round(n * 0.75))), n - 1]
        data["objective"]["imagerefl_start_step"] = max(0, min(n - 1, round(n * 0.75)))
    try:
        config = config_from_dict(data)
        validate_config(config, check_inputs=False)
    except ConfigError as err:
        raise TrainInputError(_explain(err)) from None
    return config


def _check_inputs(objective: str, prompts: list[str], resolution: int, k: int, sampling_steps: int,
                  images: Any, captions: list[str]) -> None:
    """The checks the node makes before touching any model (each names the input to change)."""
    if objective != "imagerefl" and not prompts:
        raise TrainInputError("no prompts: write the training prompts into 'prompts', one per line")
    if resolution % 8:
        raise TrainInputError(f"resolution must be a multiple of 8 (the VAE's downscale factor), got {resolution}; "
                              f"e.g. {max(8, resolution // 8 * 8)} or {resolution // 8 * 8 + 8}")
    if objective == "draft" and k > sampling_steps:
        raise TrainInputError(f"K = {k} is larger than sampling_steps = {sampling_steps}: DRaFT-K backpropagates "
                              f"through the last K of the sampling steps; use K <= {sampling_steps}")
    if objective == "imagerefl":
        if images is None:
            raise TrainInputError("objective 'imagerefl' needs real images: connect an IMAGE batch to 'images' and "
                                  "give their captions in 'captions' (one per line, or one for all)")
        n = int(images.shape[0])
        if not captions:
            captions = prompts
        if len(captions) not in (1, n):
            raise TrainInputError(f"'captions' has {len(captions)} lines for {n} images; give one caption per "
                                  "image or one for all")


def memory_error_message(err: BaseException, *, batch_size: int, resolution: int, k: int,
                         gradient_checkpointing: bool) -> str:
    """What to lower after an out-of-memory error during training."""
    tips = [f"batch_size (now {batch_size})", f"resolution (now {resolution or 'native'})",
            f"K (now {k}: every gradient step keeps the UNet's activations)"]
    if not gradient_checkpointing:
        tips.append("or turn gradient_checkpointing on")
    return ("out of memory while training the reward LoRA; lower " + ", ".join(tips)
            + f". ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")


# ---------------------------------------------------------------------------------------------------------------
# files


def lora_paths(name: str) -> tuple[Path, Path]:
    """(LoRA file in ``models/loras``, checkpoint directory in the output folder) under ComfyUI."""
    import folder_paths

    loras = Path(folder_paths.get_folder_paths("loras")[0])
    return loras / f"{name}.safetensors", Path(folder_paths.get_output_directory()) / CHECKPOINT_SUBDIR / name


def base_checkpoint_name(prompt: Any, unique_id: Any) -> str:
    """The ``ckpt_name`` of the loader feeding this node's ``model`` input (followed through MODEL-passing nodes
    by their ``model`` input), or ``"unknown"``."""
    try:
        node = prompt[str(unique_id)]
        for _ in range(64):
            link = node["inputs"].get("model")
            if not isinstance(link, list):
                break
            node = prompt[str(link[0])]
            for key in ("ckpt_name", "unet_name"):
                if isinstance(node["inputs"].get(key), str):
                    return node["inputs"][key]
    except (KeyError, TypeError, AttributeError):
        pass
    return "unknown"


def _write_dataset(folder: Path, images: torch.Tensor, captions: list[str]) -> str:
    """ImageReFL: the IMAGE batch ``[N, H, W, 3]`` in [0, 1] as the trainer's image-folder dataset (PNG + .txt)."""
    import numpy as np
    from PIL import Image

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if len(captions) == 1:
        captions = captions * int(images.shape[0])
    for i, (img, cap) in enumerate(zip(images, captions)):
        arr = (img.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr[..., :3]).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(cap, encoding="utf-8")
    return str(folder)


# ---------------------------------------------------------------------------------------------------------------
# the plot


def plot_history(history: Sequence[dict[str, float]], title: str) -> torch.Tensor:
    """Reward and loss per optimizer step as an IMAGE ``[1, H, W, 3]`` in [0, 1] (matplotlib, Agg)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = [int(h.get("step", i + 1)) for i, h in enumerate(history)]
    reward = [h.get("reward", float("nan")) for h in history]
    loss = [h.get("loss", float("nan")) for h in history]
    ax.plot(steps, reward, marker="o", color="tab:green", label="reward")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward", color="tab:green")
    ax2 = ax.twinx()
    ax2.plot(steps, loss, marker=".", color="tab:red", label="loss")
    ax2.set_ylabel("loss", color="tab:red")
    ax.set_title(title, fontsize=9)
    if not history:
        ax.text(0.5, 0.5, "no steps trained in this run", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(np.float32) / 255.0
    return torch.from_numpy(arr.copy())[None]


# ---------------------------------------------------------------------------------------------------------------
# restoring what training touches


@contextlib.contextmanager
def _restored_flags(modules: Sequence[torch.nn.Module]):
    """Restore every parameter's ``requires_grad`` and every module's train/eval flag on exit."""
    grads = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    modes = [(sub, sub.training) for m in modules for sub in m.modules()]
    try:
        yield
    finally:
        for p, flag in grads:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        for sub, flag in modes:
            sub.training = flag


def _reward_checkpointing(rewards: Sequence[RewardInput]):
    states = [(r.model, bool(getattr(r.model, "gradient_checkpointing", False))) for r in rewards]

    @contextlib.contextmanager
    def cm():
        try:
            yield
        finally:
            for model, flag in states:
                if hasattr(model, "enable_gradient_checkpointing"):
                    model.enable_gradient_checkpointing(flag)
    return cm()


# ---------------------------------------------------------------------------------------------------------------
# the training run (shared by the node and the tests)


@dataclass
class NodeRunResult:
    lora_path: Path
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    interrupted: bool = False


def train_lora_in_comfy(model: Any, clip: Any, vae: Any, rewards: Sequence[RewardInput], config: Any, *,
                        lora_path: Path, progress: Callable[[int, dict[str, float]], None] | None = None,
                        should_stop: Callable[[], bool] | None = None) -> NodeRunResult:
    """Train ``config`` on ComfyUI's MODEL / CLIP / VAE with the library's training loop; write ``lora_path``.

    Runs inside ``torch.inference_mode(False)`` with gradients on and the global RNG state forked; restores
    everything it changes on ComfyUI's objects on the way out (also after an exception).
    """
    import comfy.model_management as mm

    from rdt_lib.lora_io import load_lora_safetensors
    from rdt_lib.train import run as train_run

    patcher = model.clone()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=devices):
        backbone = ComfyBackbone(patcher, clip, vae, resolution=config.model.resolution or None)
        prompts = list(config.data.prompts)
        backbone.precompute_prompts(prompts + [config.sampling.negative_prompt])
        if config.run.objective == "imagerefl":
            folder = Path(config.data.dataset)
            backbone.precompute_prompts(p.read_text(encoding="utf-8").strip() for p in sorted(folder.glob("*.txt")))
        reward_patchers = [r.handle.patcher for r in rewards if getattr(r.handle, "patcher", None) is not None]
        mm.load_models_gpu([patcher, vae.patcher] + reward_patchers, force_full_load=True)
        device = backbone.device
        for r in rewards:  # a reward loaded partially or elsewhere scores where the images are
            if {p.device for p in r.model.parameters()} != {device}:
                r.model.to(device)
        watched = [backbone.unet, vae.first_stage_model] + [r.model for r in rewards]
        try:
            with _restored_flags(watched), _reward_checkpointing(rewards), autograd_usable(watched):
                run = train_run.build_run(config, backbone=backbone, rewards={r.label: r.model for r in rewards},
                                          log=log.info)
                checkpoints = train_run.RunCheckpoints(run)
                if config.run.resume:
                    checkpoints.resume()
                lora_path.parent.mkdir(parents=True, exist_ok=True)
                every = config.checkpoint.every

                def on_step(step: int, metrics: dict[str, float]) -> None:
                    if every > 0 and step % every == 0 and metrics.get("skipped", 0) == 0:
                        train_run.export_lora(run.trainer, config, backbone, lora_path)  # the file follows the run
                    if progress is not None:
                        progress(step, metrics)

                result = train_run.run_training(run, progress=on_step, should_stop=should_stop,
                                                checkpoints=checkpoints)
                train_run.export_lora(run.trainer, config, backbone, lora_path)
                steps, history = run.trainer.step_count, result.history
        finally:
            backbone.network.restore()
    tensors, _ = load_lora_safetensors(lora_path)
    return NodeRunResult(lora_path, steps, history, tensors, interrupted=result.interrupted)


def model_with_lora(model: Any, tensors: dict[str, torch.Tensor], strength: float = 1.0) -> Any:
    """A clone of ``model`` with the LoRA as ordinary weight patches (what LoraLoader does)."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(tensors, key_map)
    tuned = model.clone()
    loaded = tuned.add_patches(patches, strength)
    missing = [k for k in patches if k not in loaded]
    if missing or len(patches) * 3 != len(tensors):
        raise RuntimeError(f"the trained LoRA did not map onto the model: {len(patches)} of {len(tensors) // 3} "
                           f"layers mapped, {len(missing)} not applied")
    return tuned


# ---------------------------------------------------------------------------------------------------------------
# the node


@dataclass
class TrainPlan:
    """A checked node run: the trainer config, the rewards and where the LoRA goes."""

    config: Any
    rewards: list[RewardInput]
    name: str
    lora_path: Path
    steps: int
    batch_size: int
    resolution: int
    k: int
    gradient_checkpointing: bool


class RDTTrainRewardLoRA:
    """Train a reward LoRA on a checkpoint (DRaFT-K / DRaFT+ / DRaFT-LV / ReFL / ImageReFL) with the rdt trainer."""

    CATEGORY = "rdt/training"
    FUNCTION = "train"
    OUTPUT_NODE = True  # it saves a file: a graph of loaders and this node alone is a valid prompt
    RETURN_TYPES = ("MODEL", "STRING", "IMAGE")
    RETURN_NAMES = ("model", "lora_name", "reward_loss_plot")
    OUTPUT_TOOLTIPS = ("the input MODEL with the trained LoRA applied as patches (the tuned model for the Dual-Model "
                       "KSampler)", "the saved LoRA file, relative to models/loras",
                       "reward and loss per optimizer step")
    DESCRIPTION = ("Trains a LoRA on the UNet's attention layers to maximise the connected reward models, with the "
                   "rdt trainer (one loop with python -m rdt_lib.train). Saves models/loras/<lora_name>.safetensors "
                   "(rewritten at each checkpoint; interrupting saves what was trained).")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        w = _widget
        required = {
            "model": ("MODEL", {"tooltip": "the SD1.5 or SDXL model to train on (it is not changed)"}),
            "clip": ("CLIP", {"tooltip": "the checkpoint's CLIP, encodes the prompts"}),
            "vae": ("VAE", {"tooltip": "the checkpoint's VAE; the reward's gradient flows through its decoder"}),
            "reward_model": ("REWARD_MODEL", {"tooltip": "reward to maximise (RDT Reward Model Loader)"}),
            "reward_weight": ("FLOAT", {**w("reward_weight", "rewards.N.weight")[1], "min": -100.0, "max": 100.0}),
            "prompts": ("STRING", {"multiline": True, "default": "a photo of a cat\na watercolor landscape",
                                   "tooltip": "training prompts, one per line"}),
            "objective": w("objective", "run.objective"),
            "steps": w("steps", "run.max_steps"),
            "learning_rate": w("learning_rate", "optim.lr"),
            "lora_rank": w("lora_rank", "lora.rank"),
            "lora_alpha": w("lora_alpha", "lora.alpha"),
            "k": w("k", "objective.k"),
            "sampling_steps": w("sampling_steps", "objective.num_steps"),
            "batch_size": w("batch_size", "optim.batch_size"),
            "grad_accumulation": w("grad_accumulation", "optim.grad_accum"),
            "kl_coeff": w("kl_coeff", "regularizers.kl_coeff"),
            "l2_init_coeff": w("l2_init_coeff", "regularizers.l2_init_coeff"),
            "random_eta": ("BOOLEAN", {"default": False, "tooltip": "R0: a random DDIM eta in [0, 1] per training "
                                                                    "step [regularizers.random_eta_range]"}),
            "seed": (w("seed", "run.seed")[0], {**w("seed", "run.seed")[1], "control_after_generate": True}),
            "resolution": w("resolution", "model.resolution"),
            "lora_name": ("STRING", {"default": "rdt_reward_lora",
                                     "tooltip": "file name in models/loras (without .safetensors)"}),
            "if_exists": (list(IF_EXISTS), {"default": "refuse", "tooltip": "when models/loras/<lora_name> exists: "
                                            "refuse, resume from its checkpoint, or overwrite it"}),
        }
        optional = {
            "cfg": w("cfg", "sampling.cfg_scale"),
            "checkpoint_every": w("checkpoint_every", "checkpoint.every"),
            "gradient_checkpointing": w("gradient_checkpointing", "optim.gradient_checkpointing"),
            "images": ("IMAGE", {"tooltip": "imagerefl: the real images to start from"}),
            "captions": ("STRING", {"multiline": True, "default": "",
                                    "tooltip": "imagerefl: one caption per image (or one for all); empty = prompts"}),
        }
        for i in range(2, MAX_REWARDS + 1):
            optional[f"reward_model_{i}"] = ("REWARD_MODEL", {"tooltip": f"optional reward {i}"})
            optional[f"reward_weight_{i}"] = ("FLOAT", {**w("reward_weight", "rewards.N.weight")[1],
                                                        "min": -100.0, "max": 100.0})
        return {"required": required, "optional": optional,
                "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"}}

    def plan(self, model, clip, vae, reward_model, reward_weight, prompts, objective, steps, learning_rate,
             lora_rank, lora_alpha, k, sampling_steps, batch_size, grad_accumulation, kl_coeff, l2_init_coeff,
             random_eta, seed, resolution, lora_name, if_exists, cfg=7.5, checkpoint_every=50,
             gradient_checkpointing=False, images=None, captions="", prompt=None, unique_id=None,
             **optional) -> "TrainPlan":
        """Check every input (before any model is touched) and build the run's config and file paths.

        Raises:
            TrainInputError: naming the input to change and what is accepted.
        """
        prompt_list = parse_prompts(prompts)
        caption_list = parse_prompts(captions)
        _check_inputs(objective, prompt_list, int(resolution), int(k), int(sampling_steps), images, caption_list)
        if if_exists not in IF_EXISTS:
            raise TrainInputError(f"if_exists must be one of {', '.join(IF_EXISTS)}, got {if_exists!r}")
        if clip is None or vae is None:
            raise TrainInputError("clip and vae must be connected (the checkpoint's CLIP and VAE)")
        rewards = collect_rewards(reward_model, reward_weight, optional)
        try:
            family = model_family(model)
        except UnsupportedModelError as err:
            raise TrainInputError(str(err)) from None
        name = lora_file_name(lora_name)
        lora_path, ckpt_dir = lora_paths(name)
        resume = False
        if lora_path.exists() or ckpt_dir.exists():
            if if_exists == "refuse":
                raise TrainInputError(f"models/loras/{name}.safetensors (or its checkpoints in {ckpt_dir}) exists "
                                      "already; choose another lora_name, or set if_exists to 'resume' (continue "
                                      "training from its last checkpoint) or 'overwrite'")
            if if_exists == "resume":
                if not ckpt_dir.is_dir() or not any(ckpt_dir.glob("checkpoint-*")):
                    raise TrainInputError(f"cannot resume {name}: there is no checkpoint in {ckpt_dir}; set "
                                          "if_exists to 'overwrite' to start again")
                resume = True
            else:
                shutil.rmtree(ckpt_dir, ignore_errors=True)
        dataset = ""
        if objective == "imagerefl":
            dataset = _write_dataset(ckpt_dir / "images", images, caption_list or prompt_list)
        config = node_config(
            objective=objective, prompts=prompt_list, steps=steps, learning_rate=learning_rate, lora_rank=lora_rank,
            lora_alpha=lora_alpha, k=k, sampling_steps=sampling_steps, batch_size=batch_size,
            grad_accumulation=grad_accumulation, kl_coeff=kl_coeff, l2_init_coeff=l2_init_coeff,
            random_eta=random_eta, seed=seed, resolution=resolution, cfg=cfg, checkpoint_every=checkpoint_every,
            gradient_checkpointing=gradient_checkpointing, rewards=rewards, name=name, output_dir=str(ckpt_dir),
            base_name=base_checkpoint_name(prompt, unique_id), resume=resume, dataset=dataset, family=family)

        return TrainPlan(config, rewards, name, lora_path, int(steps), int(batch_size), int(resolution), int(k),
                         bool(gradient_checkpointing))

    def train(self, model, clip, vae, reward_model, reward_weight, prompts, objective, steps, learning_rate,
              lora_rank, lora_alpha, k, sampling_steps, batch_size, grad_accumulation, kl_coeff, l2_init_coeff,
              random_eta, seed, resolution, lora_name, if_exists, cfg=7.5, checkpoint_every=50,
              gradient_checkpointing=False, images=None, captions="", prompt=None, unique_id=None, **optional):
        plan = self.plan(model, clip, vae, reward_model, reward_weight, prompts, objective, steps, learning_rate,
                         lora_rank, lora_alpha, k, sampling_steps, batch_size, grad_accumulation, kl_coeff,
                         l2_init_coeff, random_eta, seed, resolution, lora_name, if_exists, cfg, checkpoint_every,
                         gradient_checkpointing, images, captions, prompt, unique_id, **optional)
        config, rewards, name, lora_path = plan.config, plan.rewards, plan.name, plan.lora_path

        # ---- training with ComfyUI's progress bar and interrupt
        import comfy.model_management as mm
        import comfy.utils

        steps = plan.steps
        bar = comfy.utils.ProgressBar(steps, node_id=unique_id)
        interrupt: list[BaseException] = []

        def progress(step: int, metrics: dict[str, float]) -> None:
            text = f"step {step}/{steps}  loss {metrics.get('loss', float('nan')):.4g}  " \
                   f"reward {metrics.get('reward', float('nan')):.4g}"
            log.info("RDTTrainRewardLoRA %s", text)
            _send_text(text, unique_id)
            try:
                bar.update_absolute(step, int(steps))
            except mm.InterruptProcessingException as err:
                interrupt.append(err)

        def should_stop() -> bool:
            return bool(interrupt) or mm.processing_interrupted()

        try:
            result = train_lora_in_comfy(model, clip, vae, rewards, config, lora_path=lora_path, progress=progress,
                                         should_stop=should_stop)
        except mm.OOM_EXCEPTION as err:
            if not _is_oom(err):
                raise
            raise RuntimeError(memory_error_message(err, batch_size=plan.batch_size, resolution=plan.resolution,
                                                    k=plan.k, gradient_checkpointing=plan.gradient_checkpointing)
                               ) from None
        if result.interrupted:
            log.info("RDTTrainRewardLoRA interrupted at step %d; %s holds those steps", result.steps, lora_path)
            if interrupt:
                raise interrupt[0]
            mm.throw_exception_if_processing_interrupted()
        tuned = model_with_lora(model, result.tensors)
        title = f"{name}: {config.run.objective}, {result.steps} steps, rewards {', '.join(r.label for r in rewards)}"
        plot = plot_history(result.history, title)
        rel = f"{name}.safetensors"
        return {"ui": {"text": (f"saved models/loras/{rel} ({result.steps} steps)",)}, "result": (tuned, rel, plot)}


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, getattr(torch.cuda, "OutOfMemoryError", ())) or "out of memory" in str(err).lower()


def _send_text(text: str, node_id: Any) -> None:
    """Show ``text`` on the node (ComfyUI's progress text) when a server is running."""
    try:
        from server import PromptServer

        if PromptServer.instance is not None and node_id is not None:
            PromptServer.instance.send_progress_text(text, str(node_id))
    except Exception:  # noqa: BLE001 - progress text is cosmetic (older ComfyUI, no server in tests)
        pass


NODE_CLASS_MAPPINGS = {"RDTTrainRewardLoRA": RDTTrainRewardLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"RDTTrainRewardLoRA": "RDT Train Reward LoRA"}
