"""Evaluation: bits-per-byte, task scoring, sweeps and reports."""
