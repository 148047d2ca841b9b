"""Optuna sweeps over training runs: `recurchat sweep` (study.py), what varies (space.py), results (summary.py)."""
