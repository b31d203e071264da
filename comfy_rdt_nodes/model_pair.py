"""Whether two ComfyUI MODELs can be mixed: the same latent format and the same model type.

Duck-typed on ``ModelPatcher`` (``.model`` is the ``BaseModel`` with a ``latent_format``); no ComfyUI import.
"""

from __future__ import annotations

__all__ = ["check_model_pair"]


def _describe(model) -> str:
    inner = getattr(model, "model", None)
    return f"{type(inner).__name__} ({type(getattr(inner, 'latent_format', None)).__name__} latents)"


def check_model_pair(base, tuned) -> None:
    """Raise ``ValueError`` unless both MODELs share a latent format and a model type (the conditioning is
    prepared once, by the base model, for both)."""
    for name, m in (("base", base), ("tuned", tuned)):
        if not hasattr(m, "model") or not hasattr(m, "clone"):
            raise ValueError(f"the {name} input is not a ComfyUI MODEL (got {type(m).__name__})")
    b, t = base.model, tuned.model
    if type(b.latent_format) is not type(t.latent_format):
        raise ValueError(
            f"the base and tuned models use different latent formats: base {_describe(base)}, tuned "
            f"{_describe(tuned)}; both models must share a latent format (e.g. two SD1.5 models, or two SDXL models)"
        )
    if type(b) is not type(t):
        raise ValueError(
            f"the base and tuned models are of different model types: base {_describe(base)}, tuned "
            f"{_describe(tuned)}; accepted: two models of the same type (e.g. an SD1.5 checkpoint and its "
            "fine-tune, or a model and the same model after a LoRA loader)"
        )
