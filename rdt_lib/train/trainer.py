"""The reward-training loop: one LoRA adapter, one objective, one reward function.

This is the core the headless trainer (``python -m rdt_lib.train``) and the demo share: batches of
prompts and per-sample seeds drawn from a seeded generator, the objective's loss, gradient
accumulation, clipping and AdamW with linear warm-up on the adapter's parameters only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..backbones.base import Backbone
from ..lora import lora_parameters
from ..objectives.base import Objective, RewardFn

__all__ = ["TrainerSettings", "RewardTrainer"]


@dataclass
class TrainerSettings:
    """Optimisation settings of :class:`RewardTrainer`.

    Args:
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: optimizer steps of linear warm-up from 0 to ``lr``.
        grad_clip: max global gradient norm (0 = no clipping).
        batch_size: prompts per micro-batch.
        grad_accum: micro-batches per optimizer step.
        seed: seeds the prompt order and the per-sample noise seeds.
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    grad_clip: float = 10.0
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0


class RewardTrainer:
    """Train the LoRA adapter ``adapter`` of ``backbone.network`` to maximise ``reward_fn``.

    Args:
        backbone: the model; its network must already carry the adapter (:func:`rdt_lib.lora.add_lora`).
        objective: the loss (e.g. :class:`rdt_lib.objectives.DraftK`).
        reward_fn: ``reward_fn(images, prompts) -> Tensor[B]``, differentiable, higher is better.
        prompts: the training prompts, drawn uniformly with replacement.
        adapter: the adapter to train (only its parameters are optimised).
    """

    def __init__(
        self,
        backbone: Backbone,
        objective: Objective,
        reward_fn: RewardFn,
        prompts: Sequence[str],
        *,
        adapter: str = "tuned",
        settings: TrainerSettings | None = None,
    ) -> None:
        self.backbone = backbone
        self.objective = objective
        self.reward_fn = reward_fn
        self.prompts = list(prompts)
        if not self.prompts:
            raise ValueError("no training prompts given")
        self.settings = settings or TrainerSettings()
        self.params = lora_parameters(backbone.network, adapter)
        if not self.params:
            raise ValueError(f"the network has no LoRA adapter {adapter!r}; add one with rdt_lib.lora.add_lora first")
        for p in self.params.values():
            p.requires_grad_(True)
        s = self.settings
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / s.warmup_steps) if s.warmup_steps > 0 else 1.0
        )
        self.generator = torch.Generator().manual_seed(s.seed)
        self.step_count = 0

    def next_batch(self) -> tuple[list[str], list[int]]:
        """Draw ``batch_size`` prompts and one noise seed per sample from the trainer's generator."""
        n = self.settings.batch_size
        idx = torch.randint(0, len(self.prompts), (n,), generator=self.generator).tolist()
        seeds = torch.randint(0, 2**31 - 1, (n,), generator=self.generator).tolist()
        return [self.prompts[i] for i in idx], seeds

    def step(self) -> dict[str, float]:
        """One optimizer step (``grad_accum`` micro-batches). Returns loss, reward, grad norm and lr."""
        s = self.settings
        self.backbone.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, reward_sum = 0.0, 0.0
        for _ in range(s.grad_accum):
            prompts, seeds = self.next_batch()
            out = self.objective(self.backbone, self.reward_fn, prompts, seeds)
            (out.loss / s.grad_accum).backward()
            loss_sum += out.loss.item()
            reward_sum += out.rewards.float().mean().item()
        params = list(self.params.values())
        if s.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, s.grad_clip))
        else:
            grad_norm = float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)))
        lr = self.lr_scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.step_count += 1
        self.backbone.network.eval()
        return {
            "loss": loss_sum / s.grad_accum,
            "reward": reward_sum / s.grad_accum,
            "grad_norm": grad_norm if math.isfinite(grad_norm) else float("nan"),
            "lr": lr,
        }

    def train(
        self,
        num_steps: int,
        *,
        progress: bool = False,
        callback: Callable[[int, dict[str, float]], None] | None = None,
    ) -> list[dict[str, float]]:
        """Run ``num_steps`` optimizer steps; returns each step's metrics."""
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
