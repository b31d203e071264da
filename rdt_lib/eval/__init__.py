"""The evaluation sweep: ``python -m rdt_lib.eval`` samples a base and a reward-tuned model under several
schedules (both alone, combined generation, AIG, LoRA scaling), scores the images with reward models and DINO
diversity, and draws the reward-diversity Pareto front.

- :mod:`.config`: the settings (``--help`` lists them); :mod:`.prompts`: prompt sets; :mod:`.models`: the two
  models and the schedules; :mod:`.cache`: the on-disk image cache; :mod:`.embedding`: DINO embeddings;
  :mod:`.sweep`: :func:`run_sweep`; :mod:`.report`: the files of a run; :mod:`.cli`: the command line.
"""

from .config import EvalConfig, load_config
from .sweep import SweepResult, run_sweep

__all__ = ["EvalConfig", "load_config", "run_sweep", "SweepResult"]
