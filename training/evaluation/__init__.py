"""Evaluation: metrics with bootstrap confidence intervals, plots, comparison tables."""
