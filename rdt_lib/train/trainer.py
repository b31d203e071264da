"""The reward-training loop: one LoRA adapter, one objective, one (possibly combined) reward.

This is the core the headless trainer (``python -m rdt_lib.train``, :mod:`.run`) and the demo share:

- Batches: every optimizer step draws the *global* batch (``batch_size * grad_accum * processes`` rows: data
  indices and per-row noise seeds, plus one seed per step) from the trainer's seeded generator, identically on
  every process; process ``r`` takes rows ``[a*B*W + r*B, a*B*W + (r+1)*B)`` of micro-batch ``a``. A run on W
  processes therefore sees exactly the samples of a one-process run with the same global batch, and per-batch
  choices (ReFL stop step, random eta) depend only on the step and the micro-batch index.
- Gradients: each micro-batch's loss is divided by ``grad_accum``; with per-reward gradient normalisation (R0)
  each reward's gradient is computed separately (``torch.autograd.grad``) and normalised before summing. The L2
  pull to the initial weights is added once per step. Across processes the LoRA gradients are averaged with one
  explicit all-reduce (the networks are not DDP-wrapped: the backbone calls its network directly), then clipped.
- Optimisation: AdamW on the adapter's parameters only, linear warm-up then constant / linear / cosine decay,
  optional EMA of the LoRA weights (with the usual ``min(decay, (1 + n) / (10 + n))`` warm-up), fp16 loss
  scaling when autocasting to fp16 on CUDA.
- Non-finite losses: the step is skipped on every process (the decision is all-reduced), a warning is issued,
  and :class:`NonFiniteLossError` is raised after ``max_nonfinite_steps`` skipped steps in a row.
- State: :meth:`RewardTrainer.state_dict` / :meth:`load_state_dict` hold everything a resumed run needs to
  continue bit-for-bit (LoRA, initial LoRA, EMA, optimizer, lr schedule, loss scaler, generator, counters).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from ..backbones.base import Backbone
from ..lora import lora_parameters
from ..objectives.base import Batch, Objective, RewardFn
from ..objectives.regularizers import l2_to_init, normalized_reward_gradients

__all__ = ["TrainerSettings", "RewardTrainer", "NonFiniteLossError", "DataSource", "PromptSource", "lr_factor"]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a NaN / inf loss or gradient."""


def _declared(key: str) -> Any:
    """The default of setting ``key`` as declared in :mod:`.config` (one set of defaults for both)."""
    from .config import setting_spec

    default = setting_spec(key).default
    return tuple(default) if isinstance(default, list) else default


_SETTING_KEYS = {
    "lr": "optim.lr", "weight_decay": "optim.weight_decay", "betas": "optim.betas", "eps": "optim.eps",
    "warmup_steps": "optim.warmup_steps", "lr_schedule": "optim.lr_schedule", "max_steps": "run.max_steps",
    "grad_clip": "optim.grad_clip", "batch_size": "optim.batch_size", "grad_accum": "optim.grad_accum",
    "seed": "run.seed", "ema_decay": "optim.ema_decay", "l2_init_coeff": "regularizers.l2_init_coeff",
    "per_reward_grad_norm": "regularizers.per_reward_grad_norm", "max_nonfinite_steps": "run.max_nonfinite_steps",
}


@dataclass
class TrainerSettings:
    """Optimisation settings of :class:`RewardTrainer`; each default is the one declared for the config key named
    in brackets (:mod:`.config`, ``python -m rdt_lib.train --help``).

    Args:
        lr: peak AdamW learning rate [optim.lr].
        weight_decay: AdamW weight decay [optim.weight_decay].
        betas: AdamW betas [optim.betas].
        eps: AdamW epsilon [optim.eps].
        warmup_steps: optimizer steps of linear warm-up from 0 to ``lr`` [optim.warmup_steps].
        lr_schedule: after warm-up: ``constant``, ``linear`` (to 0 at ``max_steps``) or ``cosine``
            [optim.lr_schedule].
        max_steps: the run's length in optimizer steps, for the linear / cosine schedules [run.max_steps].
        grad_clip: max global gradient norm (0 = no clipping) [optim.grad_clip].
        batch_size: rows per micro-batch per process [optim.batch_size].
        grad_accum: micro-batches per optimizer step [optim.grad_accum].
        seed: seeds the data order, the per-sample noise seeds and the per-batch choices [run.seed].
        ema_decay: EMA decay of the LoRA weights in [0, 1) (0 = off) [optim.ema_decay].
        l2_init_coeff: R0's ``coeff * sum((w - w_init)^2)`` on the LoRA weights (0 = off)
            [regularizers.l2_init_coeff].
        per_reward_grad_norm: R0's per-reward gradient normalisation (needs an objective that reports its reward
            losses separately) [regularizers.per_reward_grad_norm].
        max_nonfinite_steps: consecutive skipped (NaN / inf) steps before :class:`NonFiniteLossError`
            [run.max_nonfinite_steps].
    """

    lr: float = _declared("optim.lr")
    weight_decay: float = _declared("optim.weight_decay")
    betas: tuple[float, float] = _declared("optim.betas")
    eps: float = _declared("optim.eps")
    warmup_steps: int = _declared("optim.warmup_steps")
    lr_schedule: str = _declared("optim.lr_schedule")
    max_steps: int = _declared("run.max_steps")
    grad_clip: float = _declared("optim.grad_clip")
    batch_size: int = _declared("optim.batch_size")
    grad_accum: int = _declared("optim.grad_accum")
    seed: int = _declared("run.seed")
    ema_decay: float = _declared("optim.ema_decay")
    l2_init_coeff: float = _declared("regularizers.l2_init_coeff")
    per_reward_grad_norm: bool = _declared("regularizers.per_reward_grad_norm")
    max_nonfinite_steps: int = _declared("run.max_nonfinite_steps")

    @classmethod
    def from_config(cls, config: Any) -> "TrainerSettings":
        """The settings of a :class:`~.config.TrainConfig`."""
        def get(key: str) -> Any:
            section, name = key.split(".")
            value = getattr(getattr(config, section), name)
            return tuple(value) if isinstance(value, list) else value

        return cls(**{name: get(key) for name, key in _SETTING_KEYS.items()})


def lr_factor(step: int, warmup: int, schedule: str, max_steps: int) -> float:
    """Learning-rate multiplier at 0-based optimizer step ``step``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or max_steps <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}; accepted: constant, linear, cosine")


class DataSource(Protocol):
    """Training data: ``len()`` items; ``get(indices)`` -> (prompts, images ``[B, 3, H, W]`` in [0, 1] or None)."""

    def __len__(self) -> int: ...

    def get(self, indices: Sequence[int]) -> tuple[list[str], torch.Tensor | None]: ...


class PromptSource:
    """Prompts only (DRaFT, ReFL)."""

    def __init__(self, prompts: Sequence[str]) -> None:
        self.prompts = list(prompts)
        if not self.prompts:
            raise ValueError("no training prompts given")

    def __len__(self) -> int:
        return len(self.prompts)

    def get(self, indices: Sequence[int]) -> tuple[list[str], torch.Tensor | None]:
        return [self.prompts[i] for i in indices], None


def _dist_info(accelerator: Any) -> tuple[int, int]:
    if accelerator is not None:
        return int(accelerator.num_processes), int(accelerator.process_index)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class RewardTrainer:
    """Train the LoRA adapter ``adapter`` of ``backbone.network`` to maximise ``reward_fn``.

    Args:
        backbone: the model; its network must already carry the adapter (:func:`rdt_lib.lora.add_lora`).
        objective: the loss (:mod:`rdt_lib.objectives`), called as ``objective(backbone, reward_fn, batch)``.
        reward_fn: ``reward_fn(images, prompts) -> Tensor[B]`` or a ``CombinedReward``; differentiable, higher is
            better.
        data: the training prompts (drawn uniformly with replacement) or a :class:`DataSource`.
        adapter: the adapter to train (only its parameters are optimised; they are kept in float32).
        settings: :class:`TrainerSettings`.
        accelerator: an ``accelerate.Accelerator`` for autocast and multi-process runs (None: one process, no
            autocast, unless ``torch.distributed`` is initialised).
    """

    def __init__(
        self,
        backbone: Backbone,
        objective: Objective,
        reward_fn: RewardFn,
        data: Sequence[str] | DataSource,
        *,
        adapter: str = "tuned",
        settings: TrainerSettings | None = None,
        accelerator: Any = None,
    ) -> None:
        self.backbone = backbone
        self.objective = objective
        self.reward_fn = reward_fn
        self.data: DataSource = data if hasattr(data, "get") else PromptSource(data)  # type: ignore[arg-type]
        if len(self.data) == 0:
            raise ValueError("the training data is empty")
        self.adapter = adapter
        self.settings = s = settings or TrainerSettings()
        self.accelerator = accelerator
        self.world_size, self.rank = _dist_info(accelerator)
        self.params = lora_parameters(backbone.network, adapter)
        if not self.params:
            raise ValueError(f"the network has no LoRA adapter {adapter!r}; add one with rdt_lib.lora.add_lora first")
        for p in self.params.values():
            if p.dtype != torch.float32:
                p.data = p.data.float()  # trainable weights stay float32 under mixed precision
            p.requires_grad_(True)
        self.param_list = list(self.params.values())
        self.init_weights = {k: p.detach().clone() for k, p in self.params.items()}
        self.ema = {k: p.detach().clone() for k, p in self.params.items()} if s.ema_decay > 0 else None
        self.ema_updates = 0
        self.optimizer = torch.optim.AdamW(self.param_list, lr=s.lr, betas=tuple(s.betas), eps=s.eps,
                                           weight_decay=s.weight_decay)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, s.warmup_steps, s.lr_schedule, s.max_steps))
        device = backbone.device
        fp16 = accelerator is not None and getattr(accelerator, "mixed_precision", "no") == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16 and device.type == "cuda")
        self.generator = torch.Generator().manual_seed(s.seed)
        self.step_count = 0
        self.nonfinite_in_row = 0

    # ------------------------------------------------------------------------------------------------ batches
    def next_batches(self) -> list[Batch]:
        """Draw the next global batch and return this process's micro-batches (``grad_accum`` of them)."""
        s = self.settings
        b, a, w = s.batch_size, s.grad_accum, self.world_size
        n = b * a * w
        idx = torch.randint(0, len(self.data), (n,), generator=self.generator).tolist()
        seeds = torch.randint(0, 2**31 - 1, (n,), generator=self.generator).tolist()
        step_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator).item())
        batches = []
        for j in range(a):
            lo = j * b * w + self.rank * b
            prompts, images = self.data.get(idx[lo: lo + b])
            batches.append(Batch(prompts, seeds[lo: lo + b], images=images, batch_seed=step_seed * 64 + j,
                                 step=self.step_count))
        return batches

    # ------------------------------------------------------------------------------------------------ one step
    def _autocast(self):
        if self.accelerator is not None and getattr(self.accelerator, "mixed_precision", "no") != "no":
            return self.accelerator.autocast()
        return contextlib.nullcontext()

    def _reward_weights(self) -> dict[str, float]:
        weights = dict(getattr(self.reward_fn, "weights", {}) or {})
        scale = float(getattr(self.objective, "loss_scale", 1.0))
        return {k: abs(v) * scale for k, v in weights.items()} if weights else {"reward": scale}

    def _accumulate(self, grads: Sequence[torch.Tensor | None]) -> None:
        for p, g in zip(self.param_list, grads):
            if g is None:
                continue
            p.grad = g.detach().clone() if p.grad is None else p.grad + g.detach()

    def _all_reduce(self, vec: torch.Tensor, op: str = "mean") -> torch.Tensor:
        if self.world_size == 1:
            return vec
        import torch.distributed as dist

        device = self.param_list[0].device if dist.get_backend() == "nccl" else torch.device("cpu")
        out = vec.detach().to(device).clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        out = out / self.world_size if op == "mean" else out
        return out.to(vec.device)

    def _reduce_grads(self) -> None:
        """Average the LoRA gradients over processes (one flat all-reduce)."""
        if self.world_size == 1:
            return
        for p in self.param_list:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).float() for p in self.param_list])
        flat = self._all_reduce(flat, "mean")
        offset = 0
        for p in self.param_list:
            n = p.numel()
            p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
            offset += n

    def step(self) -> dict[str, float]:
        """One optimizer step (``grad_accum`` micro-batches on every process).

        Returns:
            ``loss``, ``reward`` (means over the global batch), ``reward/<name>``, ``kl`` etc. when the
            objective reports them, ``grad_norm`` (before clipping), ``lr``, ``skipped`` (1.0 when the step was
            skipped for a non-finite loss or gradient) and ``step`` (optimizer steps done).

        Raises:
            NonFiniteLossError: ``max_nonfinite_steps`` consecutive steps were skipped.
        """
        s = self.settings
        net = self.backbone.network
        net.train()
        self.optimizer.zero_grad(set_to_none=True)
        scale = 1.0 / s.grad_accum
        sums: dict[str, float] = {}
        nonfinite = False
        split = s.per_reward_grad_norm
        loss_scaler = float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0
        try:
            for batch in self.next_batches():
                with self._autocast():
                    out = self.objective(self.backbone, self.reward_fn, batch)
                loss_value = float(out.loss.detach())
                finite = math.isfinite(loss_value)
                for key, value in {"loss": loss_value, **out.metrics}.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * scale
                if not finite:
                    nonfinite = True
                    continue
                if split and out.reward_losses:
                    grads, norms = normalized_reward_gradients(out.reward_losses, self.param_list,
                                                               self._reward_weights())
                    self._accumulate([None if g is None else g * (scale * loss_scaler) for g in grads])
                    for label, norm in norms.items():
                        sums[f"grad_norm/{label}"] = sums.get(f"grad_norm/{label}", 0.0) + norm * scale
                    if out.aux_loss is not None and out.aux_loss.requires_grad:
                        self.scaler.scale(out.aux_loss * scale).backward()
                elif out.loss.requires_grad:
                    self.scaler.scale(out.loss * scale).backward()
                del out
            if s.l2_init_coeff > 0:
                l2 = l2_to_init(self.params, self.init_weights)
                sums["l2_init"] = float(l2.detach())
                self.scaler.scale(s.l2_init_coeff * l2).backward()
        finally:
            net.eval()

        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        self._reduce_grads()
        keys = sorted(sums)
        stats = self._all_reduce(torch.tensor([sums[k] for k in keys] + [float(nonfinite)], dtype=torch.float64),
                                 "mean")
        metrics = {k: float(v) for k, v in zip(keys, stats[:-1].tolist())}
        nonfinite_loss = float(stats[-1]) > 0
        sq = sum(float((p.grad.float() ** 2).sum()) for p in self.param_list if p.grad is not None)
        grad_norm = math.sqrt(sq) if math.isfinite(sq) else float("nan")
        lr = self.lr_scheduler.get_last_lr()[0]
        metrics.update(grad_norm=grad_norm, lr=lr, skipped=0.0)

        if nonfinite_loss or not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            metrics["skipped"] = 1.0
            if self.scaler.is_enabled() and not nonfinite_loss:
                # fp16 overflow: the loss scaler's normal back-off, not a training failure
                self.scaler.update(new_scale=float(self.scaler.get_scale()) / 2)
                metrics["step"] = float(self.step_count)
                return metrics
            if self.scaler.is_enabled():
                self.scaler.update(new_scale=float(self.scaler.get_scale()))
            self.nonfinite_in_row += 1
            what = "loss" if nonfinite_loss else "gradient"
            if self.nonfinite_in_row >= s.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_row} consecutive steps had a non-finite (NaN/inf) {what}; stopping at "
                    f"optimizer step {self.step_count}. Try a lower learning rate (optim.lr), gradient clipping "
                    f"(optim.grad_clip), mixed_precision = \"no\" or \"bf16\" instead of fp16, or check the reward "
                    f"and its normalisation.")
            warnings.warn(f"non-finite {what} at optimizer step {self.step_count}: step skipped "
                          f"({self.nonfinite_in_row}/{s.max_nonfinite_steps} in a row)", RuntimeWarning, stacklevel=2)
            metrics["step"] = float(self.step_count)
            return metrics

        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.param_list, s.grad_clip)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.lr_scheduler.step()
        self._update_ema()
        self.step_count += 1
        self.nonfinite_in_row = 0
        metrics["step"] = float(self.step_count)
        return metrics

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        self.ema_updates += 1
        n = self.ema_updates
        decay = min(self.settings.ema_decay, (1 + n) / (10 + n))
        for k, p in self.params.items():
            self.ema[k].lerp_(p.detach().to(self.ema[k].dtype), 1.0 - decay)

    # ------------------------------------------------------------------------------------------------ weights
    def lora_state(self, *, ema: bool = False) -> dict[str, torch.Tensor]:
        """The adapter's weights by parameter name (the EMA copy with ``ema=True`` when EMA is on); CPU copies."""
        src = self.ema if (ema and self.ema is not None) else {k: p.detach() for k, p in self.params.items()}
        return {k: v.detach().to("cpu").clone() for k, v in src.items()}

    @contextlib.contextmanager
    def ema_weights(self):
        """Temporarily load the EMA weights into the network (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        saved = {k: p.detach().clone() for k, p in self.params.items()}
        try:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(self.ema[k])
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(saved[k])

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs; flat tensor dicts (``lora``, ``lora_init``, ``ema``) and plain state."""
        state: dict[str, Any] = {
            "lora": self.lora_state(),
            "lora_init": {k: v.detach().cpu().clone() for k, v in self.init_weights.items()},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": {k: v for k, v in self.lr_scheduler.state_dict().items() if k != "lr_lambdas"},
            "trainer": {
                "step": self.step_count,
                "generator": self.generator.get_state(),
                "nonfinite_in_row": self.nonfinite_in_row,
                "ema_updates": self.ema_updates,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "world_size": self.world_size,
            },
        }
        if self.ema is not None:
            state["ema"] = self.lora_state(ema=True)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (e.g. from :meth:`CheckpointManager.load`)."""
        missing = [k for k in ("lora", "optimizer", "lr_scheduler", "trainer") if k not in state]
        if missing:
            raise ValueError(f"trainer state lacks {missing}; is this a reward-trainer checkpoint?")
        lora = state["lora"]
        if set(lora) != set(self.params):
            extra, lacking = sorted(set(lora) - set(self.params)), sorted(set(self.params) - set(lora))
            raise ValueError(f"checkpoint LoRA does not match the model's adapter (rank / target modules changed?): "
                             f"{len(lacking)} missing, {len(extra)} unexpected, e.g. {(lacking or extra)[:3]}")
        with torch.no_grad():
            for k, p in self.params.items():
                if p.shape != lora[k].shape:
                    raise ValueError(f"checkpoint LoRA weight {k} has shape {tuple(lora[k].shape)}, the model "
                                     f"{tuple(p.shape)} (lora.rank changed?)")
                p.copy_(lora[k].to(p.device, p.dtype))
        if "lora_init" in state:
            self.init_weights = {k: v.to(self.params[k].device, torch.float32) for k, v in state["lora_init"].items()}
        self.optimizer.load_state_dict(state["optimizer"])
        sched = dict(state["lr_scheduler"])
        sched.setdefault("lr_lambdas", [None])
        self.lr_scheduler.load_state_dict(sched)
        tr = state["trainer"]
        self.step_count = int(tr["step"])
        self.generator.set_state(tr["generator"])
        self.nonfinite_in_row = int(tr.get("nonfinite_in_row", 0))
        self.ema_updates = int(tr.get("ema_updates", 0))
        if tr.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(tr["scaler"])
        saved_world = int(tr.get("world_size", self.world_size))
        if saved_world != self.world_size:
            warnings.warn(f"resuming a {saved_world}-process run on {self.world_size} processes: the global batch "
                          f"changes, so the run will not match an uninterrupted one", RuntimeWarning, stacklevel=2)
        if self.ema is not None:
            if "ema" in state:
                self.ema = {k: v.to(self.params[k].device, torch.float32) for k, v in state["ema"].items()}
            else:
                warnings.warn("checkpoint has no EMA weights; EMA restarts from the current weights",
                              RuntimeWarning, stacklevel=2)
                self.ema = {k: p.detach().clone() for k, p in self.params.items()}

    # ------------------------------------------------------------------------------------------------ loop
    def train(
        self,
        num_steps: int,
        *,
        progress: bool = False,
        callback: Callable[[int, dict[str, float]], None] | None = None,
    ) -> list[dict[str, float]]:
        """Run ``num_steps`` optimizer steps (skipped non-finite steps count); returns each step's metrics."""
        history = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_steps, desc="reward fine-tuning", leave=False)
        try:
            for _ in range(num_steps):
                metrics = self.step()
                history.append(metrics)
                if bar is not None:
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", reward=f"{metrics['reward']:.3f}")
                    bar.update(1)
                if callback is not None:
                    callback(self.step_count, metrics)
        finally:
            if bar is not None:
                bar.close()
        return history
