"""Dual-model denoising: two guided models mixed by a schedule into one denoiser.

At step index ``i`` of ``N`` the tuned model gets weight ``w = schedule.weight(i, N)`` and the denoiser
returns ``(1 - w) * guided_base + w * guided_tuned``, where each model's prediction is taken after its
own classifier-free guidance ``uncond + cfg * (cond - uncond)`` (SPEC.md section 1). A model whose
weight is 0 at a step is not evaluated. When both models are the same network (the tuned one being a
LoRA adapter on it) their rows go through one batched forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .backbones.base import Backbone, Conditioning
from .schedules import Schedule, parse_schedule

__all__ = ["ModelBranch", "GuidedModel", "DualModelDenoiser"]


@dataclass(frozen=True)
class ModelBranch:
    """One model of the pair.

    Args:
        backbone: the backbone whose network makes the prediction.
        adapter: the LoRA adapter active for this model; ``None`` = the network's base weights
            (all adapters disabled). A full fine-tune is a separate backbone with ``adapter=None``.
        cfg_scale: classifier-free guidance scale for this model (1 = conditional prediction only, no
            unconditional pass); ``None`` takes the backbone's usual scale (7.5 SD1.5, 5 SDXL, 1 toy).
        lora_scale: multiplier of the adapter's contribution (the "LoRA scaling" baseline; 1 = as trained).
    """

    backbone: Backbone
    adapter: str | None = None
    cfg_scale: float | None = None
    lora_scale: float = 1.0

    @property
    def guidance(self) -> float:
        scale = self.backbone.default_cfg if self.cfg_scale is None else float(self.cfg_scale)
        if not self.backbone.conditional and scale != 1.0:
            raise ValueError(
                f"{type(self.backbone).__name__} is unconditional: classifier-free guidance is not available, "
                f"so cfg_scale must be 1 (got {scale})"
            )
        return scale


class GuidedModel:
    """A branch bound to its encoded prompts: produces the rows it needs and combines them with CFG."""

    def __init__(self, branch: ModelBranch, cond: Conditioning, uncond: Conditioning | None) -> None:
        self.branch = branch
        self.cfg = branch.guidance
        if self.cfg != 1.0 and uncond is None:
            raise ValueError("a CFG scale other than 1 needs the unconditional (negative-prompt) conditioning")
        self.cond = cond
        self.uncond = uncond if self.cfg != 1.0 else None

    @classmethod
    def encode(cls, branch: ModelBranch, prompts: Sequence[str], negative_prompts: Sequence[str]) -> "GuidedModel":
        """Encode ``prompts`` (and, for CFG, ``negative_prompts``) with the branch's backbone."""
        bb = branch.backbone
        with torch.no_grad():
            cond = bb.encode_prompts(prompts)
            uncond = bb.encode_prompts(negative_prompts, negative=True) if branch.guidance != 1.0 else None
        return cls(branch, cond, uncond)

    @property
    def rows_per_sample(self) -> int:
        return 1 if self.uncond is None else 2

    def conditioning(self) -> Conditioning:
        """The rows this model evaluates: ``[uncond; cond]`` with CFG, ``cond`` without."""
        return self.cond if self.uncond is None else Conditioning.cat([self.uncond, self.cond])

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        """Guided prediction from this model's network output rows (as ordered by :meth:`conditioning`)."""
        if self.uncond is None:
            return out
        uncond, cond = out.chunk(2)
        return uncond + self.cfg * (cond - uncond)

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Guided prediction for latents ``x`` at timestep ``t`` (training-timestep units)."""
        xs = x if self.uncond is None else torch.cat([x, x])
        out = self.branch.backbone.predict(
            xs, t, self.conditioning(), self.branch.adapter, lora_scale=self.branch.lora_scale
        )
        return self.combine(out)


def _can_share_pass(a: GuidedModel, b: GuidedModel) -> bool:
    """Both models are rows of one forward pass: same network, and at most one scaled adapter."""
    if a.branch.backbone is not b.branch.backbone:
        return False
    scaled = {(m.branch.adapter, m.branch.lora_scale) for m in (a, b) if m.branch.adapter is not None}
    return len(scaled) <= 1


class DualModelDenoiser:
    """A denoiser ``(x, t, step, num_steps) -> prediction`` mixing a base and a tuned model by a schedule.

    Args:
        base, tuned: the two models, already bound to their prompts (:meth:`GuidedModel.encode`).
        schedule: the tuned model's weight per step (a :class:`Schedule` or a spec string).
        batched: evaluate both models in one forward pass where they share a network.
    """

    def __init__(
        self,
        base: GuidedModel,
        tuned: GuidedModel | None,
        schedule: Schedule | str,
        *,
        batched: bool = True,
    ) -> None:
        self.base = base
        self.tuned = tuned
        self.schedule = parse_schedule(schedule)
        self.batched = batched
        self.evaluations = {"base": 0, "tuned": 0, "joint": 0}
        if tuned is None and self.schedule.needs_tuned:
            raise ValueError(f"schedule {self.schedule} needs a tuned model; only 'base' runs without one")

    def weight(self, step: int, num_steps: int) -> float:
        """The tuned model's weight at step index ``step`` of ``num_steps``."""
        return self.schedule.weight(step, num_steps)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int, num_steps: int) -> torch.Tensor:
        w = self.weight(step, num_steps)
        if w == 0.0:
            self.evaluations["base"] += 1
            return self.base.predict(x, t)
        assert self.tuned is not None
        if w == 1.0:
            self.evaluations["tuned"] += 1
            return self.tuned.predict(x, t)
        if self.batched and _can_share_pass(self.base, self.tuned):
            pred_base, pred_tuned = self._joint(x, t)
        else:
            self.evaluations["base"] += 1
            self.evaluations["tuned"] += 1
            pred_base, pred_tuned = self.base.predict(x, t), self.tuned.predict(x, t)
        return (1.0 - w) * pred_base + w * pred_tuned

    def _joint(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both models' guided predictions from one forward pass over their stacked rows."""
        self.evaluations["joint"] += 1
        base, tuned = self.base, self.tuned
        assert tuned is not None
        n_base = base.rows_per_sample
        n_tuned = tuned.rows_per_sample
        b = x.shape[0]
        xs = torch.cat([x] * (n_base + n_tuned))
        cond = Conditioning.cat([base.conditioning(), tuned.conditioning()])
        adapters = [base.branch.adapter] * (n_base * b) + [tuned.branch.adapter] * (n_tuned * b)
        scale = tuned.branch.lora_scale if tuned.branch.adapter is not None else base.branch.lora_scale
        out = tuned.branch.backbone.predict(xs, t, cond, adapters, lora_scale=scale)
        out_base, out_tuned = out[: n_base * b], out[n_base * b:]
        return base.combine(out_base), tuned.combine(out_tuned)
