"""Measuring the reward-diversity trade-off.

- :mod:`.diversity`: pairwise cosine diversity (ImageReFL), Vendi score, spectral distance (AIG).
- :mod:`.pareto`: the Pareto front of a table of schedules and its plot.
- :mod:`.mode_coverage`: mode statistics of the 2-D toy's samples.
"""

from .diversity import grouped_diversity, pairwise_cosine_diversity, spectral_distance, vendi_score
from .mode_coverage import ModeStatistics, mode_statistics
from .pareto import pareto_figure, pareto_front, save_figure

__all__ = [
    "ModeStatistics",
    "mode_statistics",
    "pairwise_cosine_diversity",
    "grouped_diversity",
    "vendi_score",
    "spectral_distance",
    "pareto_front",
    "pareto_figure",
    "save_figure",
]
