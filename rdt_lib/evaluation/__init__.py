"""Measuring the reward-diversity trade-off."""

from .mode_coverage import ModeStatistics, mode_statistics

__all__ = ["ModeStatistics", "mode_statistics"]
