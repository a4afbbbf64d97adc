"""Comparing results: paired statistics across students (`compare`) and attention heads."""
