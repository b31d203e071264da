"""The dual-model guider for ComfyUI: :class:`rdt_lib.mix.DualDenoiser` with ComfyUI's model calls plugged in.

Imports ComfyUI (``comfy.*``) at import time; the node module imports this one lazily, at first use.

Per model evaluation (``predict_noise(x, sigma, model_options, seed)``, which returns the denoised x0) the
tuned weight ``w`` comes from the step index of ``sigma`` in ``model_options['transformer_options']
['sample_sigmas']`` (the sigmas the sampler actually runs; with ``denoise < 1`` those are the last steps of a
longer list, so step 0 is the first step run and the schedule is spread over the steps run). Each model's
prediction is guided with its own CFG scale through ComfyUI's ``sampling_function`` / ``cfg_function`` and
the two are mixed ``(1 - w) * base + w * tuned``; a model with weight 0 is not evaluated.

How the tuned model is run (:attr:`DualModelGuider.mode`):

- ``"base"``: the schedule is ``base``; the tuned model is not used (not even loaded).
- ``"rows"``: the tuned MODEL is the base MODEL plus plain LoRA patches (``tuned.is_clone(base)``), on whole
  weights or on output-row slices of fused ones (ComfyUI's SD3 / Flux LoRA key maps put q / k / v on the fused
  qkv weight with offsets). Only the base weights are loaded; the LoRA terms are added at forward time by hooks
  on the patched layers, to the tuned rows only. Where both models are needed, one ``calc_cond_batch`` call
  with the conds ``[positive, negative, positive, negative]`` (base pair, tuned pair) batches all rows into one
  forward pass; a ``model_function_wrapper`` reads ``cond_or_uncond`` to tell the hooks which chunks are the
  tuned ones.
- ``"weights"``: the tuned MODEL is the base plus other patches (LoHa, LoKr, diffs, ...): still one weight
  copy; weight functions (``ModelPatcher.add_weight_wrapper``) apply ComfyUI's ``calculate_weight`` to each
  patched weight on the forward passes of the tuned model; base and tuned are two passes.
- ``"models"``: two independent checkpoints; the tuned one is loaded beside the base through ComfyUI's
  model management (``set_additional_models``), so ComfyUI offloads them as usual.

Only ``set_conds`` and ``predict_noise`` of ``CFGGuider`` are overridden (their signatures are stable across
ComfyUI versions).
"""

from __future__ import annotations

import math
import uuid

import torch

import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers

from rdt_lib.mix import DualDenoiser
from rdt_lib.schedules import Schedule, parse_schedule

from .forward_lora import TunedRows, attach_row_loras, tuned_chunk_positions
from .lora_patches import extra_patches, plan_forward_patches
from .model_pair import check_model_pair

__all__ = ["DualModelGuider", "check_model_pair"]

TUNED_KEY = "rdt_tuned_model"


def _cfg1_skip(cfg: float, model_options: dict) -> bool:
    return math.isclose(cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False)


class DualModelGuider(comfy.samplers.CFGGuider):
    """A ComfyUI GUIDER mixing a base and a tuned MODEL by a schedule over the sampler's steps.

    Args:
        base: the base MODEL (``ModelPatcher``); it is cloned, not changed.
        tuned: the tuned MODEL or ``None`` (only the ``base`` schedule runs without one).
        schedule: a :class:`~rdt_lib.schedules.Schedule` or a spec string (``rdt_lib.schedules`` syntax).
        cfg_base, cfg_tuned: each model's CFG scale (1 skips that model's negative pass).
    """

    def __init__(self, base, tuned, schedule: Schedule | str, cfg_base: float = 8.0, cfg_tuned: float = 8.0) -> None:
        self.schedule = parse_schedule(schedule)
        if tuned is None and self.schedule.needs_tuned:
            raise ValueError(
                f"schedule {self.schedule} needs a tuned model, but no tuned MODEL is connected; connect one, or "
                "use the schedule 'base'"
            )
        patcher = base.clone()
        self.tuned_patcher = None
        self.plan = None
        self._rows = TunedRows()
        if tuned is None or not self.schedule.needs_tuned:
            self.mode = "base"
        else:
            check_model_pair(base, tuned)
            if tuned.is_clone(base):
                if set(tuned.object_patches) != set(base.object_patches) or any(
                    tuned.object_patches[k] is not base.object_patches[k] for k in base.object_patches
                ):
                    raise ValueError(
                        "the tuned MODEL is the base MODEL with other object patches (e.g. a ModelSampling node on one "
                        "of them): apply such nodes to the base before the LoRA loader, so both models share them"
                    )
                extra = extra_patches(base.patches, tuned.patches)
                self.plan = plan_forward_patches(base.model, extra)
                self.mode = self.plan.mode
                if self.mode == "weights":
                    for key, entries in self.plan.patches.items():
                        patcher.add_weight_wrapper(key, self._weight_function(key, entries))
                    # a new patch id makes ComfyUI (re)load this clone's weights, so the weight functions are set
                    patcher.patches_uuid = uuid.uuid4()
            else:
                self.mode = "models"
                self.tuned_patcher = tuned
                patcher.set_additional_models(TUNED_KEY, [tuned])
        super().__init__(patcher)
        self.cfg_base = float(cfg_base)
        self.cfg_tuned = float(cfg_tuned)
        self.cfg = self.cfg_base
        self._ctx: tuple[dict, int | None] = ({}, None)
        self._tuned_options_cache: tuple | None = None
        self.dual = DualDenoiser(
            self._eval_base,
            None if self.mode == "base" else self._eval_tuned,
            self.schedule,
            joint=self._eval_joint if self.mode == "rows" else None,
        )

    # -- CFGGuider overrides ---------------------------------------------------------------------------------
    def set_conds(self, positive, negative) -> None:
        self.inner_set_conds({"positive": positive, "negative": negative})

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 - ComfyUI's signature
        sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        if sigmas is None:
            raise RuntimeError("the dual-model guider needs the sampler's sigmas (transformer_options['sample_sigmas'])")
        self._ctx = (model_options, seed)
        try:
            return self.dual(x, timestep, sigmas=sigmas)
        finally:
            self._ctx = ({}, None)

    # -- evaluations -----------------------------------------------------------------------------------------
    def _conds(self):
        return self.conds.get("positive", None), self.conds.get("negative", None)

    def _eval_base(self, x, sigma):
        model_options, seed = self._ctx
        pos, neg = self._conds()
        return comfy.samplers.sampling_function(self.inner_model, x, sigma, neg, pos, self.cfg_base,
                                                model_options=model_options, seed=seed)

    def _tuned_options(self, model_options: dict) -> dict:
        sigmas = model_options["transformer_options"]["sample_sigmas"]
        cached = self._tuned_options_cache
        if cached is not None and cached[0] is sigmas:
            return cached[1]
        opts = comfy.model_patcher.create_model_options_clone(self.tuned_patcher.model_options)
        topts = opts.setdefault("transformer_options", {})
        topts["sample_sigmas"] = sigmas
        comfy.patcher_extension.merge_nested_dicts(topts.setdefault("wrappers", {}), self.tuned_patcher.wrappers,
                                                   copy_dict1=False)
        self._tuned_options_cache = (sigmas, opts)
        return opts

    def _eval_tuned(self, x, sigma):
        model_options, seed = self._ctx
        pos, neg = self._conds()
        if self.mode == "models":
            model = self.tuned_patcher.model
            if hasattr(model, "current_patcher"):
                model.current_patcher = self.tuned_patcher
            return comfy.samplers.sampling_function(model, x, sigma, neg, pos, self.cfg_tuned,
                                                    model_options=self._tuned_options(model_options), seed=seed)
        layers = self.plan.layers if self.mode == "rows" else []
        with attach_row_loras(layers, self._rows), self._rows.scoped(self._rows.set_all):
            return comfy.samplers.sampling_function(self.inner_model, x, sigma, neg, pos, self.cfg_tuned,
                                                    model_options=model_options, seed=seed)

    def _eval_joint(self, x, sigma):
        """Base and tuned guided predictions from one batched forward pass (``rows`` mode)."""
        model_options, seed = self._ctx
        if "sampler_calc_cond_batch_function" in model_options:  # someone else batches the conds: two passes
            return self._eval_base(x, sigma), self._eval_tuned(x, sigma)
        pos, neg = self._conds()
        neg_b = None if _cfg1_skip(self.cfg_base, model_options) else neg
        neg_t = None if _cfg1_skip(self.cfg_tuned, model_options) else neg
        conds = [pos, neg_b, pos, neg_t]
        rows = self._rows
        previous = model_options.get("model_function_wrapper")

        def mark_tuned_rows(apply_model, args):
            chunks = list(args["cond_or_uncond"])
            tuned = tuned_chunk_positions(chunks, first_tuned=2)
            with rows.scoped(rows.set_chunks, tuned, len(chunks)):
                if previous is not None:
                    return previous(apply_model, args)
                return apply_model(args["input"], args["timestep"], **args["c"])

        options = dict(model_options)
        options["model_function_wrapper"] = mark_tuned_rows
        with attach_row_loras(self.plan.layers, rows):
            out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, sigma, options)
        results = []
        for (c, u, scale), pair in zip(((pos, neg_b, self.cfg_base), (pos, neg_t, self.cfg_tuned)),
                                       (out[0:2], out[2:4])):
            pair = list(pair)
            for fn in model_options.get("sampler_pre_cfg_function", []):
                pair = fn({"conds": [c, u], "conds_out": pair, "cond_scale": scale, "timestep": sigma, "input": x,
                           "sigma": sigma, "model": self.inner_model, "model_options": model_options})
            results.append(comfy.samplers.cfg_function(self.inner_model, pair[0], pair[1], scale, x, sigma,
                                                       model_options=model_options, cond=c, uncond=u))
        return results[0], results[1]

    # -- "weights" mode ---------------------------------------------------------------------------------------
    def _weight_function(self, key: str, entries: list):
        rows = self._rows

        def apply_tuned_patches(weight: torch.Tensor) -> torch.Tensor:
            if rows.mode == "off":
                return weight
            import comfy.lora

            out = comfy.lora.calculate_weight(entries, weight.to(torch.float32, copy=True), key)
            return out.to(weight.dtype)

        return apply_tuned_patches
