"""Dual-model sampling nodes (category ``rdt/sampling``): combined generation and AIG inside ComfyUI.

- ``RDTDualModelKSampler``: a KSampler over two models mixed by a schedule (same noise, sigmas, previews and
  progress bar as KSampler; with the schedule ``base`` it gives KSampler's result on the base model).
- ``RDTDualModelGuider``: the same as a GUIDER for ``SamplerCustomAdvanced``.
- ``RDTSchedule``: a schedule picked from a list with its parameter, validated when the graph is queued;
  outputs ``RDT_SCHEDULE`` and an IMAGE plot of the tuned weight per step.

At sampling step ``i`` (0 = noisiest) of the ``N`` steps run, the tuned model gets weight ``w(i, N)`` and the
sampler sees ``(1 - w) * base + w * tuned`` (each model's x0 prediction after its own CFG). The step index is
found from sigma in the sampler's sigma list, so two-evaluation samplers (Heun, dpm_2), ancestral / SDE and
multistep samplers all get the weight of the step they are in. With ``denoise < 1`` KSampler runs only the last
``steps`` steps of a longer schedule; the index counts the steps actually run (0 .. steps - 1), so the whole
schedule is spread over them (``switch:K`` switches after K of the steps run).

``comfy`` is imported inside the functions, so this module imports without ComfyUI.
"""

from __future__ import annotations

from rdt_lib.schedules import ACCEPTED_FORMS, Schedule, parse_schedule

__all__ = [
    "SCHEDULE_KINDS",
    "schedule_from_choice",
    "resolve_schedule",
    "RDTDualModelKSampler",
    "RDTDualModelGuider",
    "RDTSchedule",
    "NODE_CLASS_MAPPINGS",
    "NODE_DISPLAY_NAME_MAPPINGS",
]

CATEGORY = "rdt/sampling"
DEFAULT_SCHEDULE = "switch@0.75"
SCHEDULE_TYPE = "RDT_SCHEDULE"

#: The RDTSchedule choices and what their ``value`` / ``text`` inputs mean.
SCHEDULE_KINDS = {
    "switch at step": "value = K, the first tuned step index (an integer >= 0): switch:K",
    "switch at fraction": "value = F in [0, 1], tuned where i / N >= F: switch@F",
    "linear": "w = i / N (value unused)",
    "power": "value = P > 0, w = (i / N) ** P",
    "cosine": "w = (1 - cos(pi i / N)) / 2 (value unused)",
    "keyframes": "text = P0=W0,P1=W1,... progress P in [0, 1] strictly increasing, weight W in [0, 1]",
    "base": "base model only (value unused)",
    "tuned": "tuned model only (value unused)",
    "custom spec": f"text = a schedule spec; accepted: {ACCEPTED_FORMS}",
}


def schedule_from_choice(kind: str, value: float = 0.0, text: str = "") -> Schedule:
    """The schedule an RDTSchedule node's inputs describe; ``ValueError`` saying what is wrong and accepted."""
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; accepted: {', '.join(SCHEDULE_KINDS)}")
    if kind == "switch at step":
        if float(value) != int(value) or value < 0:
            raise ValueError(f"'switch at step' needs an integer step index value >= 0, got {value}")
        return parse_schedule(f"switch:{int(value)}")
    if kind == "switch at fraction":
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"'switch at fraction' needs a value in [0, 1], got {value}")
        return parse_schedule(f"switch@{float(value)!r}")
    if kind == "power":
        if not float(value) > 0.0:
            raise ValueError(f"'power' needs an exponent value > 0, got {value}")
        return parse_schedule(f"power:{float(value)!r}")
    if kind == "keyframes":
        body = (text or "").strip()
        if not body:
            raise ValueError("'keyframes' needs the points in text, e.g. 0=0,0.5=0.2,1=1 (progress=weight)")
        return parse_schedule(body if body.lower().startswith("keyframes:") else f"keyframes:{body}")
    if kind == "custom spec":
        if not (text or "").strip():
            raise ValueError(f"'custom spec' needs a schedule spec in text; accepted: {ACCEPTED_FORMS}")
        return parse_schedule(text)
    return parse_schedule(kind)


def resolve_schedule(spec: str, override: Schedule | None) -> Schedule:
    """The schedule a sampler node runs: the RDT_SCHEDULE input if connected, else the spec string."""
    if override is not None:
        if not isinstance(override, Schedule):
            raise ValueError(f"the schedule input must be an RDT_SCHEDULE (from an RDT Schedule node), got {type(override).__name__}")
        return override
    return parse_schedule(spec)


def _validate_spec(schedule) -> bool | str:
    if schedule is None:  # linked from another node: checked when the node runs
        return True
    try:
        parse_schedule(schedule)
    except ValueError as err:
        return str(err)
    return True


def _sampler_lists():
    import comfy.samplers

    return comfy.samplers.KSampler.SAMPLERS, comfy.samplers.KSampler.SCHEDULERS


_SCHEDULE_TIP = (
    "the tuned model's weight per step (rdt_lib.schedules syntax): " + ACCEPTED_FORMS
    + ". Ignored when an RDT_SCHEDULE is connected."
)


def _model_inputs() -> dict:
    return {
        "base_model": ("MODEL", {"tooltip": "The base model."}),
        "positive": ("CONDITIONING", {"tooltip": "Positive conditioning, used by both models."}),
        "negative": ("CONDITIONING", {"tooltip": "Negative conditioning, used by both models."}),
    }


def _cfg_inputs() -> dict:
    return {
        "cfg_base": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                               "tooltip": "CFG scale of the base model."}),
        "cfg_tuned": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                "tooltip": "CFG scale of the tuned model (1 skips its negative pass)."}),
    }


def _optional_inputs() -> dict:
    return {
        "tuned_model": ("MODEL", {"tooltip": "The reward-tuned model: the base after a LoRA loader (one copy of the "
                                             "weights is kept) or another checkpoint of the same type."}),
        "schedule_input": (SCHEDULE_TYPE, {"tooltip": "An RDT Schedule; overrides the schedule text."}),
    }


def _make_guider(base_model, tuned_model, schedule, cfg_base, cfg_tuned, positive, negative):
    from .comfy_guider import DualModelGuider

    guider = DualModelGuider(base_model, tuned_model, schedule, cfg_base=cfg_base, cfg_tuned=cfg_tuned)
    guider.set_conds(positive, negative)
    return guider


class RDTDualModelKSampler:
    """KSampler over a base and a tuned model mixed by a schedule."""

    @classmethod
    def INPUT_TYPES(cls):
        samplers, schedulers = _sampler_lists()
        required = _model_inputs()
        required.update({
            "latent_image": ("LATENT", {"tooltip": "The latent image to denoise."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "The noise seed (the same noise as KSampler)."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
        })
        required.update(_cfg_inputs())
        required.update({
            "sampler_name": (samplers,),
            "scheduler": (schedulers,),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "As KSampler; the schedule is spread over the steps actually run."}),
            "schedule": ("STRING", {"default": DEFAULT_SCHEDULE, "multiline": False, "tooltip": _SCHEDULE_TIP}),
        })
        return {"required": required, "optional": _optional_inputs()}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Samples with two models in one trajectory: at each step the tuned model's weight w from the "
                   "schedule mixes the guided predictions (1 - w) * base + w * tuned (combined generation, AIG).")

    @classmethod
    def VALIDATE_INPUTS(cls, schedule=None):
        return _validate_spec(schedule)

    def sample(self, base_model, positive, negative, latent_image, seed, steps, cfg_base, cfg_tuned, sampler_name,
               scheduler, denoise, schedule=DEFAULT_SCHEDULE, tuned_model=None, schedule_input=None):
        import comfy.model_management
        import comfy.sample
        import comfy.samplers
        import comfy.utils
        import latent_preview

        sched = resolve_schedule(schedule, schedule_input)
        guider = _make_guider(base_model, tuned_model, sched, cfg_base, cfg_tuned, positive, negative)
        latent = latent_image
        samples_in = comfy.sample.fix_empty_latent_channels(base_model, latent["samples"])
        noise = comfy.sample.prepare_noise(samples_in, seed, latent.get("batch_index"))
        sigmas = comfy.samplers.KSampler(base_model, steps=steps, device=base_model.load_device, sampler=sampler_name,
                                         scheduler=scheduler, denoise=denoise,
                                         model_options=base_model.model_options).sigmas
        callback = latent_preview.prepare_callback(base_model, steps)
        disable_pbar = not comfy.utils.PROGRESS_BAR_ENABLED
        samples = guider.sample(noise, samples_in, comfy.samplers.sampler_object(sampler_name), sigmas,
                                denoise_mask=latent.get("noise_mask"), callback=callback, disable_pbar=disable_pbar,
                                seed=seed)
        out = latent.copy()
        out["samples"] = samples.to(comfy.model_management.intermediate_device())
        return (out,)


class RDTDualModelGuider:
    """The dual-model mix as a GUIDER for SamplerCustomAdvanced."""

    @classmethod
    def INPUT_TYPES(cls):
        required = _model_inputs()
        required.update(_cfg_inputs())
        required["schedule"] = ("STRING", {"default": DEFAULT_SCHEDULE, "multiline": False, "tooltip": _SCHEDULE_TIP})
        return {"required": required, "optional": _optional_inputs()}

    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    CATEGORY = CATEGORY
    DESCRIPTION = "A GUIDER mixing a base and a tuned model by a schedule over the sampler's steps."

    @classmethod
    def VALIDATE_INPUTS(cls, schedule=None):
        return _validate_spec(schedule)

    def get_guider(self, base_model, positive, negative, cfg_base, cfg_tuned, schedule=DEFAULT_SCHEDULE,
                   tuned_model=None, schedule_input=None):
        sched = resolve_schedule(schedule, schedule_input)
        return (_make_guider(base_model, tuned_model, sched, cfg_base, cfg_tuned, positive, negative),)


class RDTSchedule:
    """Pick a schedule; see it plotted over a number of steps."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "kind": (list(SCHEDULE_KINDS), {"default": "switch at fraction",
                                                "tooltip": "; ".join(f"{k}: {v}" for k, v in SCHEDULE_KINDS.items())}),
                "value": ("FLOAT", {"default": 0.75, "min": 0.0, "max": 10000.0, "step": 0.01,
                                    "tooltip": "K (switch at step), F (switch at fraction) or P (power)."}),
                "text": ("STRING", {"default": "", "multiline": False,
                                    "tooltip": "keyframes: P0=W0,P1=W1,...; custom spec: " + ACCEPTED_FORMS}),
                "plot_steps": ("INT", {"default": 20, "min": 1, "max": 1000,
                                       "tooltip": "Number of steps the plot shows (use the sampler's steps)."}),
            }
        }

    RETURN_TYPES = (SCHEDULE_TYPE, "IMAGE")
    RETURN_NAMES = ("schedule", "plot")
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = "A tuned-model weight schedule for the dual-model sampler, and a plot of it."

    @classmethod
    def VALIDATE_INPUTS(cls, kind=None, value=None, text=None):
        if kind is None or value is None:
            return True
        try:
            schedule_from_choice(kind, value, text or "")
        except ValueError as err:
            return str(err)
        return True

    def build(self, kind, value, text, plot_steps):
        from .schedule_plot import plot_schedule

        sched = schedule_from_choice(kind, value, text)
        return (sched, plot_schedule(sched, plot_steps))


NODE_CLASS_MAPPINGS = {
    "RDTDualModelKSampler": RDTDualModelKSampler,
    "RDTDualModelGuider": RDTDualModelGuider,
    "RDTSchedule": RDTSchedule,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RDTDualModelKSampler": "Dual-Model KSampler (rdt)",
    "RDTDualModelGuider": "Dual-Model Guider (rdt)",
    "RDTSchedule": "Schedule (rdt)",
}
