"""rdt: reward fine-tuning of text-to-image diffusion models without losing diversity.

- :mod:`rdt_lib.schedules`: the tuned model's weight per sampling step (``parse_schedule``).
- :mod:`rdt_lib.sampling`: ``sample()`` with one model or a base + tuned pair (combined generation, Annealed
  Importance Guidance, LoRA scaling), on the sigma-space core: :mod:`rdt_lib.model_sampling`,
  :mod:`rdt_lib.sigma_schedules`, :mod:`rdt_lib.samplers`, :mod:`rdt_lib.denoisers`, :mod:`rdt_lib.mix`.
- :mod:`rdt_lib.backbones`: the models (Stable Diffusion via diffusers, a 2-D toy).
- :mod:`rdt_lib.lora`: peft LoRA adapters, one copy of the weights for both models.
- :mod:`rdt_lib.objectives` and :mod:`rdt_lib.train`: reward training (DRaFT-K, ...), ``python -m rdt_lib.train``.
- :mod:`rdt_lib.rewards`: differentiable reward models.
- :mod:`rdt_lib.evaluation`: measuring reward and diversity.
"""

__version__ = "0.1.0"

from .schedules import Schedule, parse_schedule  # noqa: E402

__all__ = ["Schedule", "parse_schedule", "__version__"]
